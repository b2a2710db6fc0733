"""A zoo preset trained on a lent GPU within the device tool's limits: `bash benchmarks/gpu_session.sh zoo`.

The limits decide the design (/work/.library/device/README.md; the arithmetic: docs/zoo.md, "GPU presets"). Per
call at most 64 MiB travel (the repository's tracked files, 51 MB of them with the zoo's weights, and the
carried ignored paths), at most 8 files of under 16 MiB come back from $OUT (64 MiB in all), a command runs at most
10 minutes; a warm machine keeps the ignored files of earlier calls but goes back after 30 s idle; a session has 15
minutes of device time. Hence:

- the CIFAR-10 training parquet (114 MB) travels in parts over back-to-back calls: `stage-data` writes the parts and
  says what each call carries; every call checks what has arrived against the staging manifest's sha256;
- training resumes exactly from its per-epoch checkpoint while the machine stays warm, but not across device
  sessions: a checkpoint (weights, momentum, average, soft labels) weighs 136 MB for PreActResNet-18 and 556 MB for
  WRN-34-10, so a preset's training fits one call and an unfinished one starts over on a fresh machine;
- the export comes back as safetensors shards (huggingface_hub's splitter, its index recording each shard's sha256
  and the tensors' fingerprint), as many per call as fit; `join` rebuilds a model.safetensors of the same sha256;
- AutoAttack keeps a state file, which comes back with every call; carried in with the shards, it resumes on a fresh
  machine of a later session, on the same weights.

From the repository root:

    python benchmarks/gpu_zoo.py stage-data --source ../shared/datasets/cifar10     # here: the parts and the plan
    bash benchmarks/gpu_session.sh zoo                                                # there, call after call
    python benchmarks/gpu_zoo.py receive /work/.device/...                            # here: what a call brought back
    python benchmarks/gpu_zoo.py join runs/gpu_zoo/NAME/shards FOLDER                 # shards -> a model folder

Layout (the same on both machines):

    .gpu_data/zoo/cifar10/             test-00000-of-00001.parquet, train-00000-of-0000N.parquet (the first rows:
                                       class names for an evaluation-only session), train-0000k-of-0000N.parquet
    .gpu_data/zoo/cifar10.staged.json  each staged file's rows, bytes and sha256, and the calls that carry them
    runs/gpu/NAME/                     the training run (sglr_zoo.rundir)
    runs/gpu_zoo/NAME/                 shards/ (model-0000k-of-0000N.safetensors, model.safetensors.index.json,
                                       config.json), model/ (joined from shards/), results_nN.json,
                                       autoattack_state_nN.json, status.json; returned.json (device only)
    $OUT/NAME/                         zoo_run.tgz (the run's and runs/gpu_zoo/NAME's files but weights) and shards
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: the repository's package
from sglr_zoo.errors import UserError  # noqa: E402
from sglr_zoo.files import MiB, write_atomic  # noqa: E402
from sglr_zoo.rundir import RunDir  # noqa: E402

TRAVEL_LIMIT = 64 * MiB  # the working tree that travels per call, carried paths included
RETURN_FILES, RETURN_LIMIT, RETURN_FILE_LIMIT = 8, 64 * MiB, 16 * MiB  # what may come back from $OUT per call
DATA_ROOT = Path(".gpu_data/zoo")  # the zoo stage's SGLR_ZOO_DATA: the dataset is DATA_ROOT/cifar10
DATASET = "cifar10"
RUNS, WORKS = Path("runs/gpu"), Path("runs/gpu_zoo")
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
SHARDS_FORMAT = "sglr_zoo.weight_shards/1"
STAGED_FORMAT = "sglr_zoo.staged_data/1"
ROW_OVERHEAD = 16  # parquet bytes per row beside the PNG: offsets, the label, validity (measured: 9)
PART_SLACK = 16 * 1024  # a parquet file's own metadata (measured: 10-12 KB, the features schema)
MANIFEST_BYTES = 8 * 1024  # the staging manifest, carried in call 1
GRACE_S = 30  # after SIGINT, the seconds a child has to stop before SIGKILL
END_S = GRACE_S + 15  # of a call's budget, kept after each child's limit: its stopping, the shards, the tar
MIN_TRAIN_S, MIN_EVAL_S = 60, 30  # less time left than this: the step waits for the next call
TGZ_RESERVE = 2 * MiB  # of a call's return bytes, kept for the tar and the log


# ---- the travel budget and the staged data (here) ------------------------------------------------------------------

def _git_files(repo: Path, *args: str) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", *args], cwd=repo, capture_output=True, check=True).stdout
    return [repo / name for name in listed.decode().split("\0") if name]


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (a link counts as itself)."""
    if path.is_dir() and not path.is_symlink():
        return sum(p.lstat().st_size for p in path.rglob("*") if p.is_symlink() or p.is_file())
    return path.lstat().st_size if path.exists() or path.is_symlink() else 0


def travel_room(repo: Path = Path("."), margin: int = MiB) -> int:
    """Bytes that carried paths may take in one call: 64 MiB less the tracked and untracked-not-ignored files (and a
    shared/ folder), which travel with every call, less a margin."""
    sent = [*_git_files(repo), *_git_files(repo, "--others", "--exclude-standard")]
    used = sum(_size(p) for p in sent) + _size(repo / "shared")
    return TRAVEL_LIMIT - margin - used


def _is_ignored(repo: Path, path: Path) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=repo).returncode == 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_split(source: Path, split: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(source.glob(f"{split}-*.parquet"))
    if not files:
        raise UserError(f"--source {source}: no {split}-*.parquet (expected uoft-cs/cifar10's parquet layout)")
    return pa.concat_tables([pq.read_table(f) for f in files])


def staged_manifest(data_dir: Path) -> Path:
    return data_dir.with_name(f"{data_dir.name}.staged.json")


def stage_data(source: Path, data_dir: Path, *, room: int, first_extra: int = 0, n_train: int | None = None,
               val_size: int = 1000, n_test: int = 1000, head_rows: int = 100,
               first_carry: tuple[str, ...] = ()) -> dict[str, Any]:
    """Writes the training rows of `source` (all, or the first n_train and the last val_size, so that the trainer's
    validation split is the full set's) as parquet parts that each fit one call's `room` beside the repository, the
    first n_test test rows, and the manifest; checks each part against the source rows; returns the manifest.

    Call 1 carries `first_carry` (first_extra bytes: wheels), the manifest, the test rows, the head part (the first
    head_rows training rows: the class names for an evaluation-only session) and part 1; call k carries part k.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    train, test = _read_split(source, "train"), _read_split(source, "test")
    if n_train is not None:
        if n_train + val_size > len(train):
            raise UserError(f"--n-train {n_train} and --val-size {val_size}: more than the {len(train)} training rows")
        train = train.take([*range(n_train), *range(len(train) - val_size, len(train))])
    if not 0 < head_rows < len(train):
        raise UserError(f"--head-rows {head_rows}: must be in [1, {len(train) - 1}]")
    data_dir.mkdir(parents=True, exist_ok=True)
    for old in [*data_dir.glob("*.parquet"), staged_manifest(data_dir)]:
        old.unlink(missing_ok=True)
    test_file = data_dir / "test-00000-of-00001.parquet"
    pq.write_table(test.slice(0, min(n_test, len(test))), test_file, compression="none")
    head_file = data_dir / "head.parquet"  # renamed below, once the number of parts is known
    pq.write_table(train.slice(0, head_rows), head_file, compression="none")
    row_bytes = (pc.binary_length(train.column("img").combine_chunks().field("bytes")).to_numpy(zero_copy_only=False)
                 + ROW_OVERHEAD).tolist()
    first_room = room - first_extra - test_file.stat().st_size - head_file.stat().st_size - MANIFEST_BYTES
    bounds, start = [(0, head_rows)], head_rows
    while start < len(train):
        limit, stop, total = (first_room if len(bounds) == 1 else room) - PART_SLACK, start, 0
        while stop < len(train) and total + row_bytes[stop] <= limit:
            total, stop = total + row_bytes[stop], stop + 1
        if stop == start:
            raise UserError(f"no training row fits the {room / MiB:.2f} MiB a call may carry beside the repository"
                            + (" and call 1's other files" if len(bounds) == 1 else "")
                            + "; make the tracked files smaller or carry fewer wheels")
        bounds.append((start, stop))
        start = stop
    files = {}
    for k, (a, b) in enumerate(bounds):
        path = data_dir / f"train-{k:05d}-of-{len(bounds):05d}.parquet"
        part = train.slice(a, b - a)
        if k == 0:
            head_file.rename(path)
        else:
            pq.write_table(part, path, compression="none")
        if not pq.read_table(path).equals(part):
            raise RuntimeError(f"{path} does not read back as the rows it was written from")
        files[path.name] = {"split": "train", "rows": [a, b], "bytes": path.stat().st_size, "sha256": _sha256(path),
                            "call": max(k, 1)}
    files[test_file.name] = {"split": "test", "rows": [0, pq.read_metadata(test_file).num_rows],
                             "bytes": test_file.stat().st_size, "sha256": _sha256(test_file), "call": 1}
    manifest = {"format": STAGED_FORMAT, "source": str(source), "train_rows": len(train), "n_train": n_train,
                "val_size": val_size, "head": f"train-00000-of-{len(bounds):05d}.parquet", "files": files,
                "room": room, "first_carry": list(first_carry)}
    write_atomic(staged_manifest(data_dir), json.dumps(manifest, indent=2).encode())
    calls = carry_plan(manifest, data_dir)
    for k, call in enumerate(calls, start=1):
        carried = sum(_size(Path(p)) for p in call)
        if carried > room:
            raise RuntimeError(f"call {k} would carry {carried:,} bytes, more than the {room:,} it may; lower "
                               "ROW_OVERHEAD's guess")
    return manifest


def carry_plan(manifest: dict[str, Any], data_dir: Path) -> list[list[str]]:
    """The paths each staging call carries (relative to the repository root, as the device tool's carry)."""
    calls: dict[int, list[str]] = {1: [*manifest["first_carry"], str(staged_manifest(data_dir))]}
    for name, entry in sorted(manifest["files"].items()):
        calls.setdefault(entry["call"], []).append(str(data_dir / name))
    return [calls[k] for k in sorted(calls)]


def check_data(data_dir: Path, need: str) -> dict[str, Any]:
    """What has arrived of the staged data, each file checked against the manifest's sha256; `need` "train" asks for
    every file, "eval" for the test rows and the head part only."""
    manifest_path = staged_manifest(data_dir)
    if not manifest_path.is_file():
        return {"ready": False, "missing": [str(manifest_path)], "corrupt": [], "have": []}
    manifest = json.loads(manifest_path.read_text())
    wanted = [name for name, entry in sorted(manifest["files"].items())
              if need == "train" or entry["split"] == "test" or name == manifest["head"]]
    have, missing, corrupt = [], [], []
    for name in wanted:
        path, entry = data_dir / name, manifest["files"][name]
        if not path.is_file():
            missing.append(str(path))
        elif path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            corrupt.append(str(path))
        else:
            have.append(name)
    # Files of an earlier staging (another part count) would be read as training rows too.
    stray = sorted(p.name for p in data_dir.glob("*.parquet") if p.name not in manifest["files"])
    return {"ready": not (missing or corrupt or stray), "missing": missing, "corrupt": corrupt, "stray": stray,
            "have": have, "train_rows": manifest["train_rows"]}


# ---- weight shards (both machines) ----------------------------------------------------------------------------------

def split_weights(folder: Path, shards: Path, max_shard: int, file_limit: int = RETURN_FILE_LIMIT) -> dict[str, Any]:
    """Writes a model folder's model.safetensors as safetensors shards of at most `max_shard` tensor bytes
    (huggingface_hub's split; a larger tensor gets a shard of its own), config.json beside them, and the index last
    (model.safetensors.index.json: huggingface_hub's and transformers' format, plus our record). Returns the index."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sglr_zoo.models.folder import weights_fingerprint

    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    with safe_open(str(weights), "pt") as opened:
        metadata = opened.metadata() or {}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard)
    names = {f: f if split.is_sharded else "model-00001-of-00001.safetensors" for f in split.filename_to_tensors}
    shards.mkdir(parents=True, exist_ok=True)
    for old in [shards / INDEX, *shards.glob("model-*.safetensors")]:
        old.unlink(missing_ok=True)  # the index first: a folder without one holds no complete set
    files = {}
    for filename, keys in split.filename_to_tensors.items():
        path = shards / names[filename]
        save_file({key: tensors[key] for key in keys}, str(path), metadata={"format": "pt"})
        if path.stat().st_size >= file_limit:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes, not under the {file_limit:,} a file may have to "
                            f"come back (its largest tensor: {max(keys, key=lambda k: tensors[k].nbytes)}); lower "
                            "SHARD_MIB")
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    shutil.copyfile(folder / CONFIG, shards / CONFIG)
    files[CONFIG] = {"bytes": (shards / CONFIG).stat().st_size, "sha256": _sha256(shards / CONFIG)}
    record = {"format": SHARDS_FORMAT, "source_sha256": _sha256(weights), "source_metadata": metadata,
              "weights_fingerprint": weights_fingerprint(tensors), "files": files}
    index = {"metadata": {"total_size": split.metadata["total_size"], "sglr_zoo": record},
             "weight_map": {key: names[filename] for key, filename in split.tensor_to_filename.items()}}
    write_atomic(shards / INDEX, json.dumps(index, indent=2).encode())
    return index


def read_index(shards: Path) -> dict[str, Any] | None:
    """The shards' index, or None when there is none (yet)."""
    path = shards / INDEX
    if not path.is_file():
        return None
    index = json.loads(path.read_text())
    if index.get("metadata", {}).get("sglr_zoo", {}).get("format") != SHARDS_FORMAT:
        raise UserError(f"{path}: not an index of {SHARDS_FORMAT} (written by `gpu_zoo.py split`)")
    return index


def shard_problems(shards: Path, index: dict[str, Any]) -> dict[str, list[str]]:
    """The index's files that are missing from `shards` or differ from their recorded size and sha256."""
    problems: dict[str, list[str]] = {"missing": [], "corrupt": []}
    for name, entry in index["metadata"]["sglr_zoo"]["files"].items():
        path = shards / name
        if not path.is_file():
            problems["missing"].append(name)
        elif path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            problems["corrupt"].append(name)
    return problems


def join_shards(shards: Path, out: Path) -> dict[str, Any]:
    """Rebuilds the model folder the shards came from in `out` (model.safetensors, config.json): every shard's
    sha256 is checked, then the tensors' fingerprint (the evaluator's weights_sha256); the rebuilt file is written
    with the original's metadata, so that its sha256 is the original's too (reported, as `same_file`)."""
    from safetensors.torch import load_file, save_file

    from sglr_zoo.models.folder import weights_fingerprint

    index = read_index(shards)
    if index is None:
        raise UserError(f"{shards}: no {INDEX}; bring back (or carry) the shards' index first")
    problems = shard_problems(shards, index)
    if problems["missing"] or problems["corrupt"]:
        raise UserError(f"{shards}: shards missing {problems['missing']} or not as recorded {problems['corrupt']}")
    record, tensors = index["metadata"]["sglr_zoo"], {}
    for name in sorted(set(index["weight_map"].values())):
        part = load_file(str(shards / name))
        if set(part) != {key for key, file in index["weight_map"].items() if file == name} or set(part) & set(tensors):
            raise UserError(f"{shards / name}: holds other tensors than the index maps to it")
        tensors.update(part)
    fingerprint = weights_fingerprint(tensors)
    if fingerprint != record["weights_fingerprint"]:
        raise UserError(f"{shards}: the joined tensors' fingerprint {fingerprint} is not the recorded "
                        f"{record['weights_fingerprint']}")
    out.mkdir(parents=True, exist_ok=True)
    partial = out / ".model.safetensors.partial"
    save_file(tensors, str(partial), metadata=record["source_metadata"] or None)
    os.replace(partial, out / "model.safetensors")
    shutil.copyfile(shards / CONFIG, out / CONFIG)
    sha256 = _sha256(out / "model.safetensors")
    return {"model": str(out), "sha256": sha256, "same_file": sha256 == record["source_sha256"],
            "weights_fingerprint": fingerprint, "shards": len(set(index["weight_map"].values()))}


# ---- one device call (there) ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Work:
    """runs/gpu_zoo/NAME: what the zoo stage keeps beside the training run."""

    root: Path
    aa_n: int

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def results(self) -> Path:
        return self.root / f"results_n{self.aa_n}.json"

    @property
    def state(self) -> Path:
        return self.root / f"autoattack_state_n{self.aa_n}.json"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def returned(self) -> Path:
        return self.root / "returned.json"


def run_child(command: list[str], timeout: float, env: dict[str, str]) -> tuple[int, bool]:
    """Runs `command`, passing its output on line by line (progress bars and blank lines dropped); after `timeout`
    seconds it gets SIGINT (the CLI stops, saying that a rerun resumes), GRACE_S later SIGKILL. Returns (exit code,
    whether the time ran out)."""
    print(f"$ {shlex.join(command)}   # at most {timeout:.0f} s", flush=True)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                             env=env)
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        child.send_signal(signal.SIGINT)
        try:
            child.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()

    timer = threading.Timer(max(timeout, 0), stop)
    timer.daemon = True
    timer.start()
    try:
        for line in child.stdout:  # universal newlines: tqdm's \r updates are lines too
            if line.strip() and not line.rstrip().endswith(("/s]", "s/it]")):
                print(line, end="", flush=True)
    finally:
        timer.cancel()
    return child.wait(), expired.is_set()


def _results_summary(path: Path, fingerprint: str | None = None) -> dict[str, Any] | None:
    """n, clean, robust accuracies and the sanity verdict of a results file, or None when it is absent or belongs
    to other weights than `fingerprint`."""
    from sglr_zoo.results import Results

    if not path.is_file():
        return None
    results = Results.load(path)
    if fingerprint is not None and results.weights_sha256 != fingerprint:
        return None
    return {"file": str(path), "n": results.n_examples, "clean": results.clean_accuracy, **results.robust_accuracy,
            "sanity_passed": all(c.passed is not False for c in results.sanity.values()),
            "weights_sha256": results.weights_sha256}


def _last_epoch(run: RunDir) -> int:
    dirs = run.checkpoint_dirs()
    return int(dirs[-1].name.split("_")[1]) if dirs else 0


def _fill_out(work: Work, out: Path, index: dict[str, Any], return_files: int, return_bytes: int) -> None:
    """Copies into `out` the shards not yet returned, as many as the call's return limits leave room for (the files
    already in $OUT, the tar still to come); records them in returned.json."""
    returned = json.loads(work.returned.read_text()) if work.returned.is_file() else {}
    files = index["metadata"]["sglr_zoo"]["files"]
    root = out.parent
    present = [p for p in root.rglob("*") if p.is_file()]
    room_files = return_files - len(present) - 1  # the tar
    room_bytes = return_bytes - sum(p.stat().st_size for p in present) - TGZ_RESERVE
    for name in sorted(n for n in files if n != CONFIG and returned.get(n) != files[n]["sha256"]):
        if room_files < 1 or files[name]["bytes"] > room_bytes:
            break
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work.shards / name, out / name)
        returned[name] = files[name]["sha256"]
        room_files, room_bytes = room_files - 1, room_bytes - files[name]["bytes"]
    write_atomic(work.returned, json.dumps(returned, indent=2).encode())


def _small_files(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """What the tar brings back: everything but weights, checkpoints, the lock and the device's own bookkeeping."""
    parts = Path(info.name).parts
    if "checkpoints" in parts or info.name.endswith((".safetensors", ".partial")) or parts[-1] in (
            ".lock", "returned.json"):
        return None
    return info if info.isfile() or info.isdir() else None


def device(recipe: str, overrides: list[str], *, name: str, out: Path, budget_s: float, aa_n: int,
           aa_timeout: float, shard_bytes: int, return_bytes: int = RETURN_LIMIT, return_files: int = RETURN_FILES,
           file_limit: int = RETURN_FILE_LIMIT, export: str = "last", data_root: Path = DATA_ROOT) -> dict[str, Any]:
    """One device call's share of the zoo stage, each step skipped when an earlier call did it: check the staged
    data, train (resuming), split the export into shards and join them (the evaluated model is the rebuilt one),
    AutoAttack with its state file, then $OUT/NAME/: the shards not yet returned and zoo_run.tgz. With the shards'
    index carried in and no run here, the call is an evaluation-only one of a later session (AutoAttack resumes on the
    joined weights). Returns the status, also written to runs/gpu_zoo/NAME/status.json and printed."""
    deadline = time.monotonic() + budget_s
    run, work = RunDir(RUNS / name), Work(WORKS / name, aa_n)
    work.root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SGLR_ZOO_DATA": str(data_root.resolve())}
    python = [sys.executable, "-m", "sglr_zoo.cli"]
    evaluation_only = read_index(work.shards) is not None and not run.root.exists()
    status: dict[str, Any] = {"name": name, "recipe": recipe, "overrides": overrides, "stage": "staging",
                              "mode": "evaluation only" if evaluation_only else "train"}

    def left() -> float:
        return deadline - time.monotonic()

    def finish(stage: str, next_step: str) -> dict[str, Any]:
        status.update(stage=stage, next=next_step, seconds_left=round(left()))
        write_atomic(work.status, json.dumps(status, indent=2).encode())
        (out / name).mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / name / "zoo_run.tgz", "w:gz") as tar:
            for root in (run.root, work.root):
                if root.is_dir():
                    tar.add(str(root), filter=_small_files)
        print(f"zoo status: {json.dumps(status)}", flush=True)
        return status

    data_dir = data_root / DATASET
    status["data"] = check_data(data_dir, "eval" if evaluation_only else "train")
    if not status["data"]["ready"]:
        data = status["data"]
        stray = f"; remove {data['stray']}, left by another staging" if data.get("stray") else ""
        return finish("staging", f"carry {data['missing'] + data['corrupt']}{stray} (`gpu_zoo.py stage-data` "
                                 "printed each call's list), in calls back to back: the machine goes back after 30 s "
                                 "idle")
    if not evaluation_only and not run.finished.is_file():
        if left() - END_S < MIN_TRAIN_S:
            return finish("training", "call again: too little of this call's budget was left to train")
        command = [*python, "train", recipe, *overrides, f"run.output_dir={RUNS}", f"run.name={name}"]
        code, timed_out = run_child(command, left() - END_S, env)
        status["train"] = {"exit_code": code, "timed_out": timed_out, "last_checkpoint_epoch": _last_epoch(run)}
        if not run.finished.is_file():
            if code and not timed_out:
                return finish("failed", f"the trainer failed (exit code {code}): see zoo.log")
            return finish("training", f"call again at once: training resumes from epoch {_last_epoch(run)}'s "
                                      "checkpoint on this warm machine (on a fresh one it starts over)")
    if not evaluation_only:
        source = run.export(export) / "model.safetensors"
        index = read_index(work.shards)
        if index is None or index["metadata"]["sglr_zoo"]["source_sha256"] != _sha256(source):
            index = split_weights(run.export(export), work.shards, shard_bytes, file_limit)
        status["results_trainer"] = _results_summary(run.results(export))
    index = read_index(work.shards)
    problems = shard_problems(work.shards, index)
    status["shards"] = {"files": sorted(n for n in index["metadata"]["sglr_zoo"]["files"] if n != CONFIG),
                        **problems, "weights_fingerprint": index["metadata"]["sglr_zoo"]["weights_fingerprint"]}
    if problems["missing"] or problems["corrupt"]:
        wanted = [str(work.shards / n) for n in problems["missing"] + problems["corrupt"]]
        return finish("carrying weights", f"carry {wanted} (`gpu_zoo.py receive` printed each call's list)")
    fingerprint = index["metadata"]["sglr_zoo"]["weights_fingerprint"]
    model_weights = work.model / "model.safetensors"
    if not model_weights.is_file() or _sha256(model_weights) != index["metadata"]["sglr_zoo"]["source_sha256"]:
        status["join"] = join_shards(work.shards, work.model)
    if evaluation_only:  # the shards came from there: nothing to bring back
        files = index["metadata"]["sglr_zoo"]["files"]
        write_atomic(work.returned, json.dumps({n: e["sha256"] for n, e in files.items()}).encode())
    _fill_out(work, out / name, index, return_files, return_bytes)
    returned = json.loads(work.returned.read_text())
    status["shards"]["left"] = [n for n in status["shards"]["files"] if n not in returned]
    done = _results_summary(work.results, fingerprint)
    if done is None:
        limit = min(left() - END_S, aa_timeout or math.inf)
        if limit < MIN_EVAL_S:
            return finish("evaluating", "call again: AutoAttack resumes from its state file")
        command = [*python, "eval", str(work.model), "--attacks", "clean,pgd20,autoattack", "--n", str(aa_n),
                   "--state-path", str(work.state), "--out", str(work.results), "--dataset", "uoft-cs/cifar10"]
        code, timed_out = run_child(command, limit, env)
        status["eval"] = {"exit_code": code, "timed_out": timed_out}
        done = _results_summary(work.results, fingerprint)
        if done is None and code and not timed_out:
            return finish("failed", f"the evaluation failed (exit code {code}): see zoo.log")
    status["results"] = done
    if done is None:
        state = json.loads(work.state.read_text()) if work.state.is_file() else {}
        status["autoattack_done"] = sorted(state.get("per_attack", {}))
        return finish("evaluating", "call again at once: AutoAttack resumes from its state file; in a later session, "
                                    "`gpu_zoo.py receive` prints what to carry")
    if status["shards"]["left"]:
        return finish("returning", f"call again: {len(status['shards']['left'])} shards still to come back")
    return finish("done", "run `python benchmarks/gpu_zoo.py receive FILES_AT` here")


# ---- what came back (here) ------------------------------------------------------------------------------------------

def _extract(tgz: Path, repo: Path, name: str) -> None:
    """Extracts a zoo_run.tgz into the repository: only files under runs/gpu/NAME and runs/gpu_zoo/NAME."""
    allowed = (RUNS / name, WORKS / name)
    with tarfile.open(tgz) as tar:
        members = tar.getmembers()
        for member in members:
            path = Path(member.name)
            if not any(path == root or root in path.parents for root in allowed):
                raise UserError(f"{tgz}: {member.name} lies outside {', '.join(map(str, allowed))}")
        tar.extractall(repo, members=members, filter="data")


def receive(files_at: Path, repo: Path = Path("."), aa_n: int = 500) -> list[dict[str, Any]]:
    """Takes what device calls brought back (FILES_AT/NAME/: zoo_run.tgz and shards) into runs/gpu_zoo/NAME and
    runs/gpu/NAME; once every shard is here, joins them into runs/gpu_zoo/NAME/model and, when the run's export
    folder came back (its config.json and results), into it too, so that the run directory is whole. Returns, per
    run, what is here, and what a later session carries to finish AutoAttack."""
    reports = []
    for folder in sorted(p for p in files_at.iterdir() if p.is_dir()):
        name = folder.name
        work = Work(repo / WORKS / name, aa_n)
        if (folder / "zoo_run.tgz").is_file():
            _extract(folder / "zoo_run.tgz", repo, name)
        index = read_index(work.shards)
        if index is None:
            reports.append({"name": name, **_status(work)})
            continue
        files = index["metadata"]["sglr_zoo"]["files"]
        for shard in sorted(folder.glob("model-*.safetensors")):
            if shard.name not in files or _sha256(shard) != files[shard.name]["sha256"]:
                raise UserError(f"{shard}: not a shard of {work.shards / INDEX} (or not as recorded there)")
            shutil.copyfile(shard, work.shards / shard.name)
        report: dict[str, Any] = {"name": name, **_status(work), **shard_problems(work.shards, index)}
        if not report["missing"] and not report["corrupt"]:
            report["join"] = join_shards(work.shards, work.model)
            run = RunDir(repo / RUNS / name)
            for which in run.exports():  # the export whose results (the trainer's) belong to these weights
                if not (run.export(which) / "model.safetensors").exists() and _matches(run, which, index):
                    shutil.copyfile(work.model / "model.safetensors", run.export(which) / "model.safetensors")
                    report["restored"] = str(run.export(which))
            if _results_summary(work.results, index["metadata"]["sglr_zoo"]["weights_fingerprint"]) is None:
                report["resume_autoattack"] = resume_plan(work, repo)
        reports.append(report)
    return reports


def _matches(run: RunDir, which: str, index: dict[str, Any]) -> bool:
    """Whether the export's results (the trainer's final evaluation) belong to the shards' weights."""
    summary = _results_summary(run.results(which), index["metadata"]["sglr_zoo"]["weights_fingerprint"])
    return summary is not None


def _status(work: Work) -> dict[str, Any]:
    """What the last call said: its stage, the next step, the results."""
    status = json.loads(work.status.read_text()) if work.status.is_file() else {}
    return {key: status.get(key) for key in ("stage", "next", "results_trainer", "results")}


def resume_plan(work: Work, repo: Path = Path("."), data_root: Path = DATA_ROOT,
                room: int | None = None) -> list[list[str]]:
    """The paths each call of an evaluation-only session carries (relative to the repository root): the wheels, the
    staged test rows and head part with the manifest, the AutoAttack state, the shards' index and config, then the
    shards, as many a call as fit in `room` (default: beside the repository's own files)."""
    room = travel_room(repo) if room is None else room
    data_dir = data_root / DATASET
    if not (repo / staged_manifest(data_dir)).is_file():
        raise UserError(f"no {staged_manifest(data_dir)} here: run `gpu_zoo.py stage-data` first (a later session "
                        "carries its test rows)")
    manifest = json.loads((repo / staged_manifest(data_dir)).read_text())
    first = [*manifest["first_carry"], str(staged_manifest(data_dir))]
    first += [str(data_dir / n) for n, e in manifest["files"].items() if e["split"] == "test" or n == manifest["head"]]
    first += [str(p.relative_to(repo)) for p in (work.state, work.shards / INDEX, work.shards / CONFIG) if p.is_file()]
    calls, used = [first], sum(_size(repo / p) for p in first)
    index = read_index(work.shards)
    for name in sorted(n for n in index["metadata"]["sglr_zoo"]["files"] if n != CONFIG):
        size = _size(work.shards / name)
        if used + size > room or len(calls[-1]) >= 8:
            calls.append([])
            used = 0
        calls[-1].append(str((work.shards / name).relative_to(repo)))
        used += size
    return calls


# ---- the command line -----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    stage = commands.add_parser("stage-data", help="here: the training data as parts that fit a call each")
    stage.add_argument("--source", type=Path, required=True, help="uoft-cs/cifar10's parquet folder")
    stage.add_argument("--out", type=Path, default=DATA_ROOT / DATASET)
    stage.add_argument("--n-train", type=int, default=None, help="the first N training rows (and the validation "
                                                                 "tail) only; default all")
    stage.add_argument("--val-size", type=int, default=1000, help="the recipe's data.val_size (default %(default)s)")
    stage.add_argument("--n-test", type=int, default=1000)
    stage.add_argument("--head-rows", type=int, default=100)
    stage.add_argument("--room-mib", type=float, default=None,
                       help="what a call may carry beside the repository; default: 64 MiB less the files that travel "
                            "anyway (tracked and not ignored), less 1 MiB")
    stage.add_argument("--wheels", default=".whl", help="carried in call 1 when it exists (default %(default)s)")

    dev = commands.add_parser("device", help="there: one call's share of training and evaluating a preset")
    dev.add_argument("recipe")
    dev.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                     help="recipe overrides (toy runs)")
    dev.add_argument("--name", default=None, help="the run's name (default: the recipe's stem)")
    dev.add_argument("--out", type=Path, required=True, help="the device tool's $OUT")
    dev.add_argument("--budget", type=float, required=True, help="seconds this call may take")
    dev.add_argument("--aa-n", type=int, default=500)
    dev.add_argument("--aa-timeout", type=float, default=0, help="seconds of AutoAttack a call; 0: what the budget "
                                                                 "leaves")
    dev.add_argument("--shard-mib", type=float, default=14)
    dev.add_argument("--return-mib", type=float, default=RETURN_LIMIT / MiB)
    dev.add_argument("--return-files", type=int, default=RETURN_FILES)
    dev.add_argument("--file-mib", type=float, default=RETURN_FILE_LIMIT / MiB)
    dev.add_argument("--export", choices=("best", "last"), default="last")
    dev.add_argument("--data-root", type=Path, default=DATA_ROOT)

    back = commands.add_parser("receive", help="here: take in what device calls brought back")
    back.add_argument("files_at", type=Path)
    back.add_argument("--aa-n", type=int, default=500)

    join = commands.add_parser("join", help="safetensors shards -> a model folder")
    join.add_argument("shards", type=Path)
    join.add_argument("out", type=Path)
    args = parser.parse_args(argv)

    try:
        if args.command == "stage-data":
            repo = Path(".")
            if not _is_ignored(repo, args.out):
                raise UserError(f"{args.out} is not ignored by git, so it would travel with every call: add "
                                f"/{args.out.parts[0]}/ to .gitignore or .git/info/exclude")
            wheels = Path(args.wheels)
            room = int(args.room_mib * MiB) if args.room_mib else travel_room(repo)
            manifest = stage_data(args.source, args.out, room=room, first_extra=_size(wheels),
                                  n_train=args.n_train, val_size=args.val_size, n_test=args.n_test,
                                  head_rows=args.head_rows, first_carry=(str(wheels),) if wheels.exists() else ())
            calls = carry_plan(manifest, args.out)
            print(f"staged {manifest['train_rows']:,} training rows in {len(calls)} calls of at most "
                  f"{room / MiB:.2f} MiB beside the repository; each runs `bash benchmarks/gpu_session.sh zoo`, back "
                  "to back (the machine goes back after 30 s idle); the last one trains:")
            for k, call in enumerate(calls, start=1):
                print(f"  call {k}: {sum(_size(Path(p)) for p in call) / MiB:6.2f} MiB  carry {json.dumps(call)}")
        elif args.command == "device":
            status = device(args.recipe, args.overrides, name=args.name or Path(args.recipe).stem, out=args.out,
                            budget_s=args.budget, aa_n=args.aa_n, aa_timeout=args.aa_timeout,
                            shard_bytes=int(args.shard_mib * MiB), return_bytes=int(args.return_mib * MiB),
                            return_files=args.return_files, file_limit=int(args.file_mib * MiB),
                            export=args.export, data_root=args.data_root)
            print(f"zoo: {status['stage']}; next: {status['next']}")
            if status["stage"] == "failed":
                sys.exit(1)
        elif args.command == "receive":
            for report in receive(args.files_at, aa_n=args.aa_n):
                print(json.dumps(report, indent=2))
        else:
            print(json.dumps(join_shards(args.shards, args.out), indent=2))
    except UserError as error:
        print(f"gpu_zoo.py {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
