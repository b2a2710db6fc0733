"""Training checkpoints that load no pickle: writing, reading, verifying and rotating them.

A checkpoint is a folder of safetensors and JSON files, written and read by us (accelerate's `save_state` writes
pickles and loads them with `weights_only=False`):

    checkpoints/epoch_NNNN/
      model.safetensors           the model's weights and buffers (the unwrapped, uncompiled model)
      objective.safetensors       the objective's state: SGLR's soft-label bank, a weight teacher
      average.safetensors         the run's weight average, when `average.decay` is on: the model's keys,
                                  so `sglr-zoo eval ARCH --weights` reads it as it reads model.safetensors
      optimizer.json/.safetensors the optimizer's state dict: its structure in JSON, its tensors in safetensors
      scaler.json                 fp16's gradient scaler, when there is one
      state.json                  epoch, global step, best epoch, metrics history
      recipe.json                 the resolved recipe
      rng_R.json                  process R's random states: torch CPU (and CUDA), python `random`, numpy
      manifest.json               written last: each file's size and sha256

It is written into `.partial_epoch_NNNN/` (each file through a temporary name, fsynced), the manifest last, and
the folder is renamed to `epoch_NNNN/` and its parent fsynced: a crash at any point leaves the previous checkpoint
intact. A link planted at either name is removed, never followed. Loading opens only the files the manifest lists,
only `.safetensors` and `.json`, each only when it is a regular file no larger than the manifest says, checked
against its size and sha256 before it is parsed; anything else in the folder (a planted `custom_checkpoint_0.pkl`)
is never opened. A checkpoint verifies when every listed file does and parses, the files a resume needs are listed
and its manifest's epoch is its folder's: `run.resume: auto` takes the newest that verifies.

Which checkpoint a run resumes from is sglr_zoo.resume's; how state dicts and random states become these files'
bytes, sglr_zoo.serialization's.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, NoReturn, Protocol

import safetensors.torch
import torch
from accelerate import Accelerator
from torch import nn

from sglr_zoo.errors import UserError
from sglr_zoo.files import TEXT_LIMIT, WriteFailed, fsync_dir, read_regular, write_atomic
from sglr_zoo.recipe import Recipe
from sglr_zoo.rundir import CHECKPOINT_PATTERN, RunDir, checkpoint_dirs, checkpoint_epoch
from sglr_zoo.serialization import join_tensors, json_bytes, rng_state, set_rng_state, split_tensors, tensor_bytes

FORMAT = "sglr-zoo-checkpoint/1"
MANIFEST = "manifest.json"
SAFE_SUFFIXES = (".safetensors", ".json")
MODEL, OBJECTIVE, STATE, RECIPE = "model.safetensors", "objective.safetensors", "state.json", "recipe.json"
AVERAGE = "average.safetensors"
NEEDED = (MODEL, OBJECTIVE, "optimizer.json", STATE, RECIPE)  # and each process's rng_R.json
# What the JSON files hold: an object, with at least these keys ("rng": every rng_R.json)
JSON_KEYS = {"optimizer.json": ("state", "param_groups"), STATE: ("epoch", "global_step"),
             "rng": ("python", "numpy", "torch")}


class Stateful(Protocol):
    """The run state kept in state.json (training's RunState): a JSON-ready dict out, the same dict back in."""

    epoch: int
    epoch_step: int  # where run.max_steps stopped the run inside `epoch`; 0: the epoch is whole
    global_step: int

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ---- reading a checkpoint ------------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry(data: bytes) -> dict[str, Any]:
    """A file's record in the manifest."""
    return {"sha256": _sha256(data), "size": len(data)}


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


class CheckpointReader:
    """Reads a checkpoint's files through its manifest: listed, safe formats, regular files, sizes and sha256
    verified."""

    def __init__(self, folder: Path):
        self.folder = folder
        path = folder / MANIFEST
        try:
            manifest = json.loads(read_regular(path, TEXT_LIMIT, "checkpoint manifest"))
        except FileNotFoundError:
            raise UserError(f"{path} not found: not a complete checkpoint (one written by an older sglr-zoo holds "
                            "pickles, which are never loaded)") from None
        except RecursionError:
            raise UserError(f"{path}: not a manifest (its JSON is nested too deeply to read)") from None
        except (OSError, ValueError) as error:
            raise UserError(f"{path}: not a readable manifest ({error})") from None
        if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
                and isinstance(manifest.get("files"), dict) and _is_count(manifest.get("epoch"), 1)
                and _is_count(manifest.get("num_processes", 1), 1)):
            raise UserError(f"{path}: not a {FORMAT} manifest")
        named = CHECKPOINT_PATTERN.fullmatch(folder.name)
        if named and int(named.group(1)) != manifest["epoch"]:
            raise UserError(f"{path}: says epoch {manifest['epoch']}, but its folder is {folder.name}: the checkpoint "
                            "was renamed or altered; delete it, or resume from another one")
        files = manifest["files"]
        for name, record in files.items():
            if Path(name).name != name or name.startswith("."):
                raise UserError(f"{path}: {name!r} is not a file name in the checkpoint folder")
            if not name.endswith(SAFE_SUFFIXES):
                raise UserError(f"{path}: lists {name}, which is not one of the safe formats "
                                f"({', '.join(SAFE_SUFFIXES)}); the checkpoint is refused")
            if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)
                    and _is_count(record.get("size"), 0)):
                raise UserError(f"{path}: the entry for {name} needs sha256 and size")
        self.epoch: int = manifest["epoch"]
        self.num_processes: int = manifest.get("num_processes", 1)
        self.files: dict[str, dict] = files

    def unlisted(self) -> list[str]:
        """Files in the folder that the manifest does not list: never opened."""
        return sorted(p.name for p in self.folder.iterdir() if p.name not in self.files and p.name != MANIFEST)

    def read(self, name: str) -> bytes:
        """A listed file's bytes, after checking that it is a regular file no larger than the manifest says, and its
        size and sha256."""
        record = self.files.get(name)
        if record is None:
            raise UserError(f"{self.folder / MANIFEST}: does not list {name}; the checkpoint is incomplete")
        path = self.folder / name
        try:
            data = read_regular(path, record["size"], f"file its {MANIFEST} lists at {record['size']:,} bytes")
        except FileNotFoundError:
            raise UserError(f"{path}: missing, though {MANIFEST} lists it; the checkpoint is incomplete") from None
        except OSError as error:
            raise UserError(f"{path}: cannot be read ({error.strerror or error})") from None
        if len(data) != record["size"] or _sha256(data) != record["sha256"]:
            raise UserError(f"{path}: its size or sha256 differs from the manifest's: the file is corrupt or was "
                            "replaced; the checkpoint is refused")
        return data

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except ValueError as error:
            raise UserError(f"{self.folder / name}: not valid JSON ({error})") from None
        except RecursionError:
            raise UserError(f"{self.folder / name}: not a checkpoint file (its JSON is nested too deeply to read)"
                            ) from None

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return safetensors.torch.load(self.read(name))
        except safetensors.SafetensorError as error:
            raise UserError(f"{self.folder / name}: not a valid safetensors file ({error})") from None

    def tree(self, stem: str) -> Any:
        """A state dict saved as `stem.json` + `stem.safetensors`."""
        tensors = self.tensors(f"{stem}.safetensors") if f"{stem}.safetensors" in self.files else {}
        try:
            return join_tensors(self.json(f"{stem}.json"), tensors)
        except (KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{self.folder / stem}.json: names a tensor that {stem}.safetensors lacks "
                            f"({error})") from None
        except RecursionError:
            raise UserError(f"{self.folder / stem}.json: not a checkpoint file (its JSON is nested too deeply to "
                            "read)") from None

    def verify(self) -> None:
        """Checks that the files a resume needs are listed, and reads, checks and parses every listed file: a
        checkpoint that verifies loads (when it fits the recipe)."""
        rngs = (f"rng_{index}.json" for index in range(self.num_processes))  # stops at the first missing one
        missing = next((name for name in itertools.chain(NEEDED, rngs) if name not in self.files), None)
        if missing:
            raise UserError(f"{self.folder / MANIFEST}: does not list {missing}; the checkpoint is incomplete")
        for name in sorted(self.files):
            if name.endswith(".json"):
                tree = self.tree(name.removesuffix(".json"))  # with its tensors, when it has a .safetensors half
                keys = JSON_KEYS.get("rng" if name.startswith("rng_") else name, ())
                if not (isinstance(tree, dict) and all(key in tree for key in keys)):
                    raise UserError(f"{self.folder / name}: not a checkpoint's {name}: a JSON object"
                                    f"{' with ' + ', '.join(keys) if keys else ''} was expected")
            elif name.removesuffix(".safetensors") + ".json" not in self.files:
                self.tensors(name)


def latest_checkpoint(folder: Path, state: Stateful | None = None) -> Path | None:
    """The newest checkpoint in a run's checkpoints/ folder that verifies (`CheckpointReader.verify`) and whose run
    state `state` accepts (loaded into a copy); a newer one that does not is skipped with a warning naming the
    reason."""
    for candidate in reversed(checkpoint_dirs(folder)):
        try:
            reader = CheckpointReader(candidate)
            reader.verify()
            if state is not None:
                _load_state(copy.deepcopy(state), reader)
        except UserError as error:
            warnings.warn(f"skipping checkpoint {candidate}: {error}", stacklevel=2)
            continue
        return candidate
    return None


def _load_state(state: Stateful, reader: CheckpointReader) -> None:
    try:
        state.load_state_dict(reader.json(STATE))
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{reader.folder / STATE}: not this run's state ({error})") from None


def _load_into(module: nn.Module, reader: CheckpointReader, name: str, strip: str = "") -> None:
    try:
        module.load_state_dict({key.removeprefix(strip): value for key, value in reader.tensors(name).items()})
    except RuntimeError as error:  # missing, unexpected or mis-shaped keys
        first = str(error).strip().splitlines()[0]
        raise UserError(f"{reader.folder / name} does not fit this recipe's {name.split('.')[0]}: {first}") from None


# ---- writing a checkpoint ------------------------------------------------------------------------------------

class Checkpointer:
    """Saves and restores everything a run needs to continue bit for bit: weights, objective, optimizer, run state,
    recipe and every process's random states. The main process writes the shared files, each process its own RNG.

    Args:
        accelerator: the run's Accelerator (process index, barriers, fp16's gradient scaler).
        run: the run directory.
        model: the unwrapped, uncompiled model (its parameters are the trained ones).
        objective: the objective (SGLR's bank and teacher are its state dict).
        optimizer: the optimizer.
        state: the run state (epoch, global step, ...), saved as JSON.
        recipe: the resolved recipe.
        average: the averaged copy of the model (sglr_zoo.averaging's `.module`), when the run keeps one.
    """

    def __init__(self, accelerator: Accelerator, run: RunDir, *, model: nn.Module, objective: nn.Module,
                 optimizer: torch.optim.Optimizer, state: Stateful, recipe: Recipe, average: nn.Module | None = None):
        self.accelerator, self.run, self.model, self.objective = accelerator, run, model, objective
        self.optimizer, self.state, self.recipe, self.average = optimizer, state, recipe, average

    def save(self, epoch: int) -> Path:
        """Writes `checkpoints/epoch_NNNN` atomically, then keeps the newest `run.keep_checkpoints` up to it.

        A failed write raises UserError naming the file (and that the disk is full when it is) and the newest
        intact checkpoint; the half-written folder is removed.
        """
        accelerator, partial, final = self.accelerator, self.run.partial_checkpoint(epoch), self.run.checkpoint(epoch)
        try:
            if accelerator.is_main_process:
                _remove(partial)  # left by a killed run
                partial.mkdir(parents=True)
            accelerator.wait_for_everyone()
            write_atomic(partial / f"rng_{accelerator.process_index}.json", json_bytes(rng_state()))
            if accelerator.is_main_process:
                files = self._write_shared(partial)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                for index in range(accelerator.num_processes):
                    name = f"rng_{index}.json"
                    files[name] = _entry(read_regular(partial / name, TEXT_LIMIT, "random state"))
                manifest = {"format": FORMAT, "epoch": epoch, "global_step": self.state.global_step,
                            "num_processes": accelerator.num_processes, "files": dict(sorted(files.items()))}
                write_atomic(partial / MANIFEST, json_bytes(manifest))
                fsync_dir(partial)
                # One of this epoch already there (a run.max_steps stop inside it, or one that did not verify) is
                # set aside, never deleted before its successor has its name: see finish_interrupted_save.
                replaced = self.run.replaced_checkpoint(epoch)
                _remove(replaced)
                if final.is_dir() and not final.is_symlink():
                    final.rename(replaced)
                else:
                    _remove(final)
                partial.rename(final)
                fsync_dir(final.parent)
                _remove(replaced)
                rotate_checkpoints(self.run, epoch, self.recipe.run.keep_checkpoints)
        except OSError as error:
            self._fail(partial, WriteFailed(Path(error.filename or partial), error))
        except WriteFailed as error:
            self._fail(partial, error)
        accelerator.wait_for_everyone()
        return final

    def _write_shared(self, partial: Path) -> dict[str, dict[str, Any]]:
        """Writes the files all processes share; returns their manifest records (from the bytes written: nothing
        is read back)."""
        files = {}

        def write(name: str, data: bytes) -> None:
            write_atomic(partial / name, data)
            files[name] = _entry(data)

        write(MODEL, tensor_bytes(self.model.state_dict()))
        write(OBJECTIVE, tensor_bytes(self.objective.state_dict()))
        if self.average is not None:
            write(AVERAGE, tensor_bytes(self.average.state_dict()))
        trees = {"optimizer": self.optimizer.state_dict()}
        if self.accelerator.scaler is not None:
            trees["scaler"] = self.accelerator.scaler.state_dict()
        for stem, value in trees.items():
            tensors: dict[str, torch.Tensor] = {}
            tree = split_tensors(value, tensors)
            if tensors:
                write(f"{stem}.safetensors", tensor_bytes(tensors))
            write(f"{stem}.json", json_bytes(tree))
        write(STATE, json_bytes(self.state.state_dict()))
        write(RECIPE, json_bytes(self.recipe.to_dict()))
        return files

    def _fail(self, partial: Path, error: WriteFailed) -> NoReturn:
        shutil.rmtree(partial, ignore_errors=True)  # frees what it took on a full disk
        intact = latest_checkpoint(self.run.checkpoints)
        where = (f"the newest intact checkpoint is {intact}: `run.resume: auto` continues from it" if intact else
                 "there is no intact checkpoint yet")
        raise UserError(f"{error}; {where}") from error

    def load(self, folder: Path) -> None:
        """Restores a checkpoint written by `save` into the model, objective, optimizer, run state and this process's
        random states. Only the manifest's files are read, each verified; files it does not list are never opened."""
        reader = CheckpointReader(folder)
        if self.accelerator.is_main_process and (unlisted := reader.unlisted()):
            warnings.warn(f"{folder}: ignoring {', '.join(unlisted)}: not in its {MANIFEST} (never opened)",
                          stacklevel=2)
        _load_into(self.model, reader, MODEL)
        _load_into(self.objective, reader, OBJECTIVE)
        if self.average is not None:  # before 2026-12-06 saved with timm ModelEmaV3's "module." on every key
            _load_into(self.average, reader, AVERAGE, strip="module.")
        try:
            self.optimizer.load_state_dict(reader.tree("optimizer"))
            if self.accelerator.scaler is not None and "scaler.json" in reader.files:
                self.accelerator.scaler.load_state_dict(reader.tree("scaler"))
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise UserError(f"{folder}: its optimizer state does not fit this recipe ({error!r})") from None
        _load_state(self.state, reader)
        rng_file = f"rng_{self.accelerator.process_index}.json"  # open_run refuses another number of processes
        try:
            set_rng_state(reader.json(rng_file))
        except (KeyError, TypeError, ValueError, RuntimeError) as error:  # RuntimeError: a byte out of range
            raise UserError(f"{folder / rng_file}: not a random state ({error!r})") from None


def finish_interrupted_save(run: RunDir) -> None:
    """Completes what a kill between `save`'s renames left: a `.partial_epoch_NNNN` whose manifest was written
    (so every file was) and that verifies becomes `epoch_NNNN` when that name is free; a set-aside
    `.replaced_epoch_NNNN` is restored when nothing took its name, else deleted."""
    for epoch, partial in _numbered(run.checkpoints, ".partial_epoch_"):
        final = run.checkpoint(epoch)
        if not final.exists() and not final.is_symlink() and (partial / MANIFEST).is_file():
            try:
                CheckpointReader(partial).verify()
            except UserError:
                continue
            partial.rename(final)
            fsync_dir(run.checkpoints)
    for epoch, replaced in _numbered(run.checkpoints, ".replaced_epoch_"):
        final = run.checkpoint(epoch)
        if final.exists() or final.is_symlink():
            _remove(replaced)
        else:
            replaced.rename(final)
            fsync_dir(run.checkpoints)


def _numbered(folder: Path, prefix: str) -> list[tuple[int, Path]]:
    """The real folders (no links) named `prefix` + a checkpoint number in `folder`."""
    if not folder.is_dir():
        return []
    found = [(p.name.removeprefix(prefix), p) for p in folder.iterdir() if p.name.startswith(prefix)]
    return [(int(number), p) for number, p in found if number.isdigit() and p.is_dir() and not p.is_symlink()]


def rotate_checkpoints(run: RunDir, epoch: int, keep: int) -> None:
    """Deletes all but the newest `keep - 1` checkpoints before `epoch` (just written, always kept). Newer ones
    (left unverifiable by a crash; the run resumed before them) are left for this run to overwrite: rotation never
    trades the checkpoint just written for another."""
    older = [c for c in checkpoint_dirs(run.checkpoints) if checkpoint_epoch(c) < epoch]
    for folder in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(folder)


def _remove(path: Path) -> None:
    """Deletes a folder and its content, or a file or link itself: never what a link planted at `path` points to
    (shutil.rmtree follows no link inside the folder either)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
