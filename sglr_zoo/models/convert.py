"""Foreign checkpoints into our registered architectures: safe reading, the usual wrappers, strict loading.

Robust CIFAR models are published in many layouts (the SGLR authors' code, kuangliu's pytorch-cifar, TRADES,
RobustBench). Each of our model files has a timm-style `checkpoint_filter_fn` that renames its family's layouts;
this module reads the file safely (safetensors, or `torch.load(weights_only=True)` after a first pass that reads
only shapes, so that a small file cannot ask for more memory than it holds), removes the wrappers that training
scripts add (`{"state_dict": ...}`, `module.`, RobustBench's normaliser), and loads strictly with the
normalisation the user states, since foreign models differ on it and the weights do not say.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

from sglr_zoo.errors import UserError
from sglr_zoo.files import WriteFailed, open_regular, write_atomic
from sglr_zoo.models import WEIGHTS_LIMIT, check_normalization, is_sglr_arch, save_pretrained, sha256_of

__all__ = ["NORMALIZATIONS", "ImportedModel", "check_state_dict", "import_checkpoint", "parse_normalization",
           "read_checkpoint", "save_imported", "unwrap_state_dict"]

PICKLE_SUFFIXES = (".pt", ".pth", ".tar", ".bin", ".ckpt")  # torch.save files (the SGLR code writes .tar)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "none": None,  # the model takes [0, 1] images as they are (the SGLR authors' code, TRADES, most AT code)
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")  # where training scripts nest weights
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
# Input-normalisation buffers: RobustBench's model classes (mu, sigma) and its normalize_model wrapper.
NORMALIZATION_KEY = re.compile(r"(?:(?:normalize|normalizer|norm_layer)\.)?(mu|sigma|mean|std)")


@dataclass
class ImportedModel:
    """A foreign checkpoint loaded into one of our architectures, and what the import did to get there."""

    model: nn.Module
    arch: str
    num_classes: int
    normalization: str
    source_sha256: str
    dropped: list[str] = field(default_factory=list)  # keys no forward pass uses (e.g. TRADES' sub_block1)
    checkpoint_normalization: dict[str, list[float]] = field(default_factory=dict)  # buffers found in the file


def parse_normalization(text: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """`none`, `cifar10`, `cifar100`, `MEAN,STD` (one value for every channel) or `M1,M2,M3,S1,S2,S3`; means in
    [0, 1] and standard deviations in (0, 1], as for images in [0, 1]."""
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 6):
        raise UserError(f"--normalization {text!r}: give none, {', '.join(n for n in NORMALIZATIONS if n != 'none')}, "
                        "MEAN,STD or three means then three positive stds (e.g. 0.5,0.5,0.5,0.25,0.25,0.25)")
    half = len(values) // 2
    mean, std = values[:half], values[half:]
    return check_normalization(mean * 3, std * 3, f"--normalization {text!r}") if half == 1 else \
        check_normalization(mean, std, f"--normalization {text!r}")


def read_checkpoint(path: str | Path) -> object:
    """The object stored in a `.safetensors` file, or in a torch.save file read with `weights_only=True`.

    A torch.save file is first read as shapes only (`FakeTensorMode`: nothing is allocated, no data is read): a
    tensor that asks for more memory than its stored data holds (a stride-0 or expanded view: a small file that
    asks for gigabytes), or storages larger than the file, are refused before the real read.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: give a checkpoint file (.safetensors, {', '.join(PICKLE_SUFFIXES)})")
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise UserError(f"{path}: unknown checkpoint type {path.suffix or '(no suffix)'!r}; give a .safetensors file "
                        f"or a torch.save file ({', '.join(PICKLE_SUFFIXES)})")
    fd = open_regular(path, WEIGHTS_LIMIT, "checkpoint file")
    size = os.fstat(fd).st_size
    os.close(fd)
    if path.suffix == ".safetensors":  # no strides: every tensor's data is in the file, which the reader checks
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise UserError(f"{path}: not a readable safetensors file ({error})") from None
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        shapes = _torch_load(path)
    _check_tensor_sizes(shapes, path, size)
    return _torch_load(path)


def _torch_load(path: Path) -> object:
    """`torch.load(weights_only=True)`, its refusals one UserError in our own words: torch's message advises
    `weights_only=False`, which must never be taken for a file from elsewhere."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if name := re.search(r"GLOBAL ([\w.]+)", text):  # a global weights_only does not allow: code to import
            raise UserError(f"{path}: refused: the file holds more than tensors (it names {name.group(1)}), and "
                            "loading it could run code. Ask its author for the weights as safetensors, or for a "
                            "torch.save of the state dict alone") from None
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s*Please use|\n\n|$)", text, re.S)
        raise UserError(f"{path}: not a readable torch.save file of tensors "
                        f"({_first_sentence(found.group(1) if found else '')})") from None
    except EOFError:
        raise UserError(f"{path}: not a readable torch.save file (it ends early)") from None
    except (RuntimeError, OSError, ValueError, RecursionError, MemoryError) as error:
        raise UserError(f"{path}: not a readable torch.save file ({_first_sentence(str(error))})") from None


def _first_sentence(text: str) -> str:
    """The first sentence of an error message, or "unreadable content"; never torch's advice about weights_only."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    sentence = line.split(". ")[0].rstrip(".")[:200]
    return sentence if sentence and "weights_only" not in sentence else "unreadable content"


def _check_tensor_sizes(obj: object, path: Path, file_size: int) -> None:
    """Refuses tensors (anywhere in the loaded object) whose shape asks for more elements than their stored data
    holds, and storages that together exceed the file: their memory would be allocated from nothing."""
    storages = {}
    for where, tensor in _tensors(obj):
        stored = tensor.untyped_storage().nbytes()
        asked = tensor.numel() * tensor.element_size()
        extent = 0 if tensor.numel() == 0 else (tensor.storage_offset() + 1 + sum(
            (size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))) * tensor.element_size()
        if asked > stored or extent > stored:
            raise UserError(f"{path}: refused: tensor {where} has shape {tuple(tensor.shape)} ({asked:,} bytes) but "
                            f"only {stored:,} bytes of stored data (an expanded or stride-0 view); a checkpoint "
                            "stores every weight. Re-save it with torch.save(model.state_dict(), ...)")
        storages[tensor.untyped_storage()._cdata] = stored
    if sum(storages.values()) > file_size:
        raise UserError(f"{path}: refused: its tensors claim {sum(storages.values()):,} bytes of data but the file has "
                        f"{file_size:,}; the file is damaged or forged")


def _tensors(obj: object) -> Iterator[tuple[str, torch.Tensor]]:
    """(key path, tensor) for every tensor in nested dicts, lists, tuples and sets, each container once."""
    stack, seen = [("", obj)], set()
    while stack:
        where, item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield where or "(the file itself)", item
        elif isinstance(item, (dict, list, tuple, set, frozenset)) and id(item) not in seen:
            seen.add(id(item))
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((f"{where}.{key}" if where else str(key), value) for key, value in pairs)


def unwrap_state_dict(obj: object, where: str) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """The bare state dict inside a checkpoint, and the input-normalisation buffers it carried (removed).

    Handles `{"state_dict": ...}`-style containers, `module.` / `_orig_mod.` prefixes and RobustBench's
    `normalize.mean` + `model.*` wrapper.
    """
    while isinstance(obj, dict) and not _is_state_dict(obj):
        nested = [k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)]
        if not nested:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise UserError(f"{where}: no state dict found; top-level keys: {keys}. Expected tensors, or one of "
                            f"{', '.join(CONTAINER_KEYS)} holding them")
        obj = obj[nested[0]]
    if not isinstance(obj, dict):
        raise UserError(f"{where}: holds a {type(obj).__name__}, not a state dict of tensors")
    state = dict(obj)
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    normalization = {k: v.flatten().tolist() for k, v in state.items() if NORMALIZATION_KEY.fullmatch(k)}
    state = {k: v for k, v in state.items() if k not in normalization}
    if state and all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state, normalization


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raises a UserError naming the first missing, unexpected or wrongly shaped key (in the model's order)."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise UserError(f"{where}: missing key {key} {tuple(tensor.shape)}: the checkpoint's layout differs "
                            "from the architecture (check --arch)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(f"{where}: {key} has shape {tuple(state[key].shape)} in the checkpoint but "
                            f"{tuple(tensor.shape)} in the architecture (check --arch and its width/depth)")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise UserError(f"{where}: unexpected key {unexpected[0]} {tuple(state[unexpected[0]].shape)} "
                        f"({len(unexpected)} in all): the checkpoint's layout differs from the architecture")


def import_checkpoint(path: str | Path, arch: str, normalization: str) -> ImportedModel:
    """Loads a foreign checkpoint strictly into `arch` (one of our `*_cifar` architectures), in eval mode.

    `normalization` is what the foreign model's own code applied to [0, 1] inputs (see `parse_normalization`);
    our model applies it inside. The number of classes is read from the classifier's weights.
    """
    path = Path(path)
    if not is_sglr_arch(arch):
        ours = ", ".join(n for n in timm.list_models("*_cifar"))
        raise UserError(f"--arch {arch!r}: foreign checkpoints import into our CIFAR architectures: {ours}")
    mean_std = parse_normalization(normalization)
    state, found_normalization = unwrap_state_dict(read_checkpoint(path), str(path))
    _check_finite(state, path)
    filter_fn = importlib.import_module(timm.models.model_entrypoint(arch).__module__).checkpoint_filter_fn
    with torch.device("meta"):  # the filters take the model, timm's signature; a shape-only one costs nothing
        probe = timm.create_model(arch)
    renamed = filter_fn(state, probe)
    dropped = [k for k in state if not filter_fn({k: state[k]}, probe)]  # filters rename key by key, or drop
    classifier = probe.pretrained_cfg["classifier"]
    if f"{classifier}.weight" not in renamed:
        raise UserError(f"{path}: no classifier weights ({classifier}.weight after renaming) for {arch}; "
                        f"first keys: {', '.join(list(renamed)[:5])}")
    num_classes = renamed[f"{classifier}.weight"].shape[0]
    mean, std = mean_std if mean_std else (None, None)
    model = timm.create_model(arch, num_classes=num_classes, mean=mean, std=std)
    check_state_dict(model, renamed, f"{path} does not fit {arch}")
    model.load_state_dict(renamed, strict=True)
    digest = sha256_of(path)
    return ImportedModel(model.eval(), arch, num_classes, normalization, digest, dropped, found_normalization)


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuses NaN or infinite weights: a model holding them gives NaN logits, which no evaluation should score."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{path}: refused: {key} holds {count:,} NaN or infinite value(s); the checkpoint is "
                            "damaged or its training diverged")


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def save_imported(imported: ImportedModel, out: str | Path, *, source_name: str) -> Path:
    """Writes a model folder (model.safetensors + config.json, timm's layout) that every command accepts.

    config.json records where the weights came from under `sglr_zoo_import`.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose a new folder")
    try:
        save_pretrained(imported.model, out)
        config_path = out / "config.json"
        config = json.loads(config_path.read_text())
        config["sglr_zoo_import"] = {"source": source_name, "source_sha256": imported.source_sha256,
                                     "normalization": imported.normalization, "dropped_keys": imported.dropped}
        write_atomic(config_path, (json.dumps(config, indent=2) + "\n").encode())
    except OSError as error:  # a full disk: one line naming the file
        raise WriteFailed(Path(error.filename or out), error) from error
    return out
