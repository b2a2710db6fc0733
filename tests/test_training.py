"""The trainer: lr schedules, a tiny end-to-end run and its files, kill/resume, divergence, 1 vs 2 processes."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

import sglr_zoo
import sglr_zoo.cli
import sglr_zoo.training as training
from sglr_zoo import hardware, loop
from sglr_zoo.checkpoint import latest_checkpoint
from sglr_zoo.data import load_splits, to_float
from sglr_zoo.errors import UserError
from sglr_zoo.evaluate import evaluate, load_results
from sglr_zoo.models import create_model
from sglr_zoo.monitoring import metric_columns
from sglr_zoo.recipe import Recipe, ScheduleConfig, from_dict, load_recipe
from sglr_zoo.replicas import check_processes
from sglr_zoo.rundir import ModelFolder, RunDir
from sglr_zoo.schedule import lr_factor
from sglr_zoo.threads import ThreadClaims
from sglr_zoo.training import RunState, TrainingDiverged, train
from tests.conftest import write_parquet_dataset

REPO = Path(__file__).resolve().parents[1]
TIMING = {"img_per_s", "epoch_s"}  # the only metrics allowed to differ between identical runs

# A tiny SGLR run: 64 train images, batch 16, refined labels from epoch 2, PGD-1.
TINY = {
    "data": {"augment": True},
    "model": {"arch": "preactresnet_tiny_cifar"},
    "attack": {"steps": 1},
    "method": {"name": "sglr", "start_epoch": 2},
    "schedule": {"epochs": 2, "name": "cosine"},
    "eval": {"n": 16, "steps": 1, "batch_size": 16},
    "run": {"batch_size": 16, "name": "run", "mixed_precision": "no"},
}
# BatchNorm-free (a one-block ViT) and without randomness in the batch, so 1 and 2 processes do the same math.
VIT = {
    **TINY,
    "data": {"augment": False},
    "model": {"arch": "vit_tiny_patch16_224",
              "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}},
    "attack": {"steps": 2, "random_start": False},
}


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/conftest.py


def make_recipe(base: dict, dataset: Path, output_dir: Path, *overrides: str) -> Recipe:
    return from_dict(base, [f"data.dataset={dataset}", f"run.output_dir={output_dir}", *overrides])


def run_train(recipe: Recipe) -> Path:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train(recipe, command="pytest")


def write_recipe(path: Path, base: dict, dataset: Path, *overrides: str) -> Path:
    """The recipe as a YAML file (for train.py in a subprocess); the run goes beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(make_recipe(base, dataset, path.parent, *overrides).to_dict()))
    return path


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def read_metrics(run_dir: Path) -> tuple[list[str], list[dict]]:
    with (run_dir / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def bank(checkpoint: Path) -> torch.Tensor:
    """The SGLR soft-label bank from a checkpoint (the objective's state)."""
    return load_file(checkpoint / "objective.safetensors")["bank"]


# ---- learning-rate schedules ----------------------------------------------------------------------------------

MULTISTEP = ScheduleConfig(epochs=200, name="multistep", milestones=[100, 150])
COSINE = ScheduleConfig(epochs=200, name="cosine")
ONECYCLE = ScheduleConfig(epochs=10, name="onecycle", peak_at=0.3)
WARMUP = ScheduleConfig(epochs=10, name="cosine", warmup_epochs=2)

# (schedule, fractional epoch progress (0 = start of training), factor)
LR_FACTORS = [
    (MULTISTEP, 0.0, 1.0),
    (MULTISTEP, 98.5, 1.0),  # inside epoch 99 (1-based)
    (MULTISTEP, 99.0, 0.1),  # epoch 100 (1-based) is the first at lr / 10, as in the authors' code
    (MULTISTEP, 148.9, 0.1),
    (MULTISTEP, 149.0, 0.01),
    (MULTISTEP, 199.9, 0.01),
    (COSINE, 0.0, 1.0),
    (COSINE, 100.0, 0.5),
    (COSINE, 199.99, 0.0),
    (ONECYCLE, 0.0, 0.0),
    (ONECYCLE, 1.5, 0.5),
    (ONECYCLE, 3.0, 1.0),  # the peak, at peak_at of the run
    (ONECYCLE, 6.5, 0.5),
    (ONECYCLE, 10.0, 0.0),
    (WARMUP, 0.0, 0.0),
    (WARMUP, 0.5, 0.25),
    (WARMUP, 1.0, 0.5),
    (WARMUP, 2.0, 1.0),  # end of warmup: the cosine starts at 1
    (WARMUP, 6.0, 0.5),
    (ScheduleConfig(epochs=5, name="constant"), 3.2, 1.0),
]


@pytest.mark.parametrize("cfg, progress, factor", LR_FACTORS)
def test_lr_factor(cfg, progress, factor):
    assert lr_factor(cfg, progress) == pytest.approx(factor, abs=1e-6)


@pytest.mark.parametrize("cfg", [COSINE, ONECYCLE, WARMUP])
def test_lr_factor_shape(cfg):
    values = [lr_factor(cfg, cfg.epochs * i / 1000) for i in range(1001)]
    peak = values.index(max(values))
    assert max(values) == pytest.approx(1.0, abs=1e-2) and values[-1] == pytest.approx(0.0, abs=1e-6)
    assert all(a <= b + 1e-12 for a, b in zip(values[:peak], values[1:peak + 1]))  # rises to the peak
    assert all(a >= b - 1e-12 for a, b in zip(values[peak:], values[peak + 1:]))  # then falls
    expected_peak = {"onecycle": cfg.peak_at * cfg.epochs, "cosine": cfg.warmup_epochs}[cfg.name]
    assert cfg.epochs * peak / 1000 == pytest.approx(expected_peak, abs=0.011)


# ---- checks that need no training -----------------------------------------------------------------------------

# (mixed precision, sync_batchnorm, processes, batch size, fragment of the error or None)
HARDWARE = [
    ("fp16", False, 1, 16, "run.mixed_precision"),
    ("bf16", False, 1, 16, None),
    ("no", True, 1, 16, None),  # SyncBatchNorm is not used with one process
    ("no", True, 2, 16, "run.sync_batchnorm"),
    ("no", False, 2, 15, "run.batch_size"),
    ("no", False, 2, 16, None),
]


@pytest.mark.parametrize("mixed_precision, sync_bn, processes, batch_size, error", HARDWARE)
def test_check_hardware(mixed_precision, sync_bn, processes, batch_size, error):
    recipe = from_dict({"run": {"sync_batchnorm": sync_bn, "batch_size": batch_size}})
    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision=mixed_precision, num_processes=processes)
    if error is None:
        check_processes(recipe.run, accelerator)
    else:
        with pytest.raises(UserError, match=error):
            check_processes(recipe.run, accelerator)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on a GPU")
def test_fp16_on_cpu_is_a_user_error(tmp_path, tiny_dataset):
    recipe = make_recipe(TINY, tiny_dataset, tmp_path, "run.mixed_precision=fp16")
    with pytest.raises(UserError, match="run.mixed_precision"):
        run_train(recipe)
    assert not (tmp_path / "run").exists()


# ---- training runs -----------------------------------------------------------------------------------------------

def test_tiny_run(tmp_path, tiny_dataset, monkeypatch):
    calls = []

    def spy_pgd(model, x, y, **kwargs):
        # The trainer attacks the unwrapped module (no DDP wrapper: no gradient all-reduce), never touching .grad.
        assert not isinstance(model, DistributedDataParallel)
        grads_before = [p.grad for p in model.parameters()]
        x_adv = sglr_zoo.attacks.pgd(model, x, y, **kwargs)
        assert all(p.grad is g for p, g in zip(model.parameters(), grads_before))
        calls.append(all(g is None for g in grads_before) and claims.path.exists())
        return x_adv

    claims = ThreadClaims()  # this process's entry: the run's threads are claimed while it trains
    monkeypatch.setattr(loop, "pgd", spy_pgd)
    recipe = make_recipe(TINY, tiny_dataset, tmp_path, "data.val_size=16")
    run_dir = run_train(recipe)
    assert run_dir == tmp_path / "run"
    assert calls and all(calls)
    assert not claims.path.exists()

    for name in ("recipe.yaml", "run.json", "metrics.csv", "curves.png", "last/model.safetensors", "last/config.json",
                 "best/model.safetensors", "best/config.json", "last/results.json", "last/results.outcomes.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert load_recipe(run_dir / "recipe.yaml").to_dict() == recipe.to_dict()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]

    columns, rows = read_metrics(run_dir)
    assert columns == metric_columns(recipe)  # named after the monitoring attack: eval.steps=1
    assert columns[-6:] == ["train_clean_acc", "train_pgd1_acc", "val_clean_acc", "val_pgd1_acc", "test_clean_acc",
                            "test_pgd1_acc"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:  # evaluated every epoch, val included; the guard (on: PGD-1 training) checks every 100 steps
        assert all(row[c] != "" for c in columns if c != "guard_pgd10_acc"), row
        assert row["guard_pgd10_acc"] == "" and row["guard_rollbacks"] == "0"
        assert math.isfinite(float(row["loss"])) and 0 <= float(row["val_pgd1_acc"]) <= float(row["val_clean_acc"])

    info = json.loads((run_dir / "run.json").read_text())
    assert info["last_epoch"] == 2 and info["num_processes"] == 1 and info["seed"] == 0
    assert info["best_epoch"] in (1, 2) and info["best_metric"] == "val_pgd1_acc"
    assert info["best_value"] == max(float(r["val_pgd1_acc"]) for r in rows)
    assert float(rows[info["best_epoch"] - 1]["val_pgd1_acc"]) == info["best_value"]
    assert info["num_examples_train"] == 48 and info["command"] == "pytest"
    assert info["speed"]["mixed_precision"]["value"] == "no"
    assert len(info["replica_checksums"]) == 1
    assert info["machine"] == hardware.machine(torch.device("cpu")) and "CPUs" in info["machine"]
    assert info["train_seconds"] == round(sum(float(r["epoch_s"]) for r in rows), 1) > 0
    assert str(tmp_path) not in (run_dir / "run.json").read_text()  # no local paths
    assert info["data_source"] == tiny_dataset.name
    assert load_results(run_dir / "best" / "results.json").provenance.model == "run/best"
    assert str(tmp_path) not in (run_dir / "best" / "results.json").read_text()

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loaded = sglr_zoo.zoo.load(str(run_dir / "last"))
    stock = timm.create_model(f"local-dir:{run_dir / 'last'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(stock(x), loaded(x))
    assert not loaded.training


# Trains a recipe file, then SIGKILLs itself at a precise point: `step` inside the 6th optimizer step (epoch 2,
# step 2 of the tiny runs' 4), `checkpoint` halfway through writing the weights of the epoch-2 checkpoint.
KILLER = """
import os, signal, sys
import torch
from sglr_zoo.cli import main

point, recipe = sys.argv[1:]
if point == "step":
    step, calls = torch.optim.SGD.step, []

    def killing_step(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *args, **kwargs)

    torch.optim.SGD.step = killing_step
else:
    write = os.write

    def killing_write(fd, data):
        if "partial_epoch_0002/.model.safetensors" in os.readlink(f"/proc/self/fd/{fd}"):
            write(fd, bytes(data[:len(data) // 2]))
            os.kill(os.getpid(), signal.SIGKILL)
        return write(fd, data)

    os.write = killing_write
main(["train", recipe])
"""


def train_until_killed(recipe_file: Path, point: str) -> None:
    process = subprocess.run([sys.executable, "-c", KILLER, point, str(recipe_file)], cwd=REPO, env=subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert process.returncode == -signal.SIGKILL, f"not killed at {point}: " + process.stderr.decode()[-2000:]


def test_a_run_leaves_the_process_as_it_found_it(tmp_path, tiny_dataset, one_thread):
    """train() sets its threads and cuDNN's flag for the run only, and never changes the recipe it is given."""
    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    recipe = make_recipe(TINY, tiny_dataset, tmp_path, "schedule.epochs=1", "method.start_epoch=1",
                         f"run.threads={threads + 1}", f"run.cudnn_benchmark={str(not benchmark).lower()}")
    given = recipe.to_dict()
    run_train(recipe)
    assert (torch.get_num_threads(), torch.backends.cudnn.benchmark) == (threads, benchmark)
    assert recipe.to_dict() == given


def test_kill_and_resume(tmp_path, tiny_dataset):
    """Run B is SIGKILLed during a step, resumed and SIGKILLed while writing a checkpoint, and resumed again
    (`run.resume: auto`): it ends bit for bit where the uninterrupted run A ends."""
    overrides = ["schedule.epochs=3", "method.start_epoch=2"]
    run_a = run_train(make_recipe(TINY, tiny_dataset, tmp_path / "a", *overrides))

    recipe_file = write_recipe(tmp_path / "b" / "recipe.yaml", TINY, tiny_dataset, *overrides)
    run_b = RunDir(recipe_file.parent / "run")
    train_until_killed(recipe_file, "step")
    assert [p.name for p in run_b.checkpoints.iterdir()] == ["epoch_0001"]
    assert not run_b.export("last").exists() and not run_b.finished.exists()

    train_until_killed(recipe_file, "checkpoint")  # resumes from epoch 1, killed while saving epoch 2
    [half_written] = run_b.partial_checkpoint(2).glob(".model.safetensors.*.partial")
    assert 0 < half_written.stat().st_size and not (run_b.partial_checkpoint(2) / "manifest.json").exists()
    assert latest_checkpoint(run_b.checkpoints) == run_b.checkpoint(1)

    run_train(load_recipe(recipe_file))
    assert sorted(p.name for p in run_b.checkpoints.iterdir()) == ["epoch_0002", "epoch_0003"]
    weights_a = load_file(run_a / "last" / "model.safetensors")
    weights_b = load_file(run_b.export("last") / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert torch.equal(bank(run_a / "checkpoints" / "epoch_0003"), bank(run_b.checkpoint(3)))
    (_, rows_a), (_, rows_b) = read_metrics(run_a), read_metrics(run_b.root)
    assert len(rows_a) == 3 and without_timing(rows_b) == without_timing(rows_a)
    assert json.loads(run_b.run_info.read_text())["last_epoch"] == 3
    assert json.loads(run_b.finished.read_text())["global_step"] == 12
    info_a = json.loads((run_a / "run.json").read_text())
    assert info_a["best_epoch"] is None and not (run_a / "best").exists()  # no validation split, no best/


def weights_equal(folder_a: Path, folder_b: Path) -> bool:
    a, b = load_file(folder_a / "model.safetensors"), load_file(folder_b / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture
def optimizer_steps(monkeypatch) -> list:
    """One entry per optimizer step taken in this test."""
    step, calls = torch.optim.SGD.step, []

    def counted(self, *args, **kwargs):
        calls.append(None)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counted)
    return calls


@pytest.mark.parametrize("epochs", [5, 4])  # the stop is in epoch 4 of 5, or in the last epoch
def test_a_max_steps_stop_inside_an_epoch_continues_there(tmp_path, tiny_dataset, optimizer_steps, epochs):
    """`run.max_steps=10` with 3 steps an epoch stops after step 1 of epoch 4: a mid-epoch checkpoint. The same
    recipe without max_steps trains the steps left (the rest of epoch 4 was skipped before, or the run refused as
    finished) and ends bit for bit where an uninterrupted run ends: last/ and best/, the soft labels, and
    metrics.csv with one row an epoch (the part's row replaced)."""
    overrides = ["data.val_size=16", f"schedule.epochs={epochs}", "run.threads=1"]  # 48 images: 3 steps an epoch
    reference = RunDir(run_train(make_recipe(TINY, tiny_dataset, tmp_path / "a", *overrides)))
    assert len(optimizer_steps) == 3 * epochs
    optimizer_steps.clear()

    recipe_file = write_recipe(tmp_path / "b" / "recipe.yaml", TINY, tiny_dataset, *overrides, "run.max_steps=10")
    run = RunDir(run_train(load_recipe(recipe_file)))
    assert len(optimizer_steps) == 10
    state = json.loads((run.checkpoint(4) / "state.json").read_text())
    assert (state["epoch"], state["epoch_step"], state["global_step"]) == (4, 1, 10)
    _, rows = read_metrics(run.root)
    assert [(r["epoch"], r["steps"]) for r in rows] == [("1", "3"), ("2", "3"), ("3", "3"), ("4", "1")]

    run_train(load_recipe(recipe_file, ["run.max_steps=null"]))
    assert len(optimizer_steps) == 3 * epochs
    assert json.loads(run.finished.read_text())["global_step"] == 3 * epochs
    for which in ("last", "best"):
        assert weights_equal(reference.export(which), run.export(which)), which
    assert torch.equal(bank(reference.checkpoint(epochs)), bank(run.checkpoint(epochs)))
    assert without_timing(read_metrics(run.root)[1]) == without_timing(read_metrics(reference.root)[1])
    info, info_reference = json.loads(run.run_info.read_text()), json.loads(reference.run_info.read_text())
    assert (info["best_epoch"], info["best_value"]) == (info_reference["best_epoch"], info_reference["best_value"])


def test_run_directory_rules(tmp_path, tiny_dataset, capsys):
    """run.max_steps counts steps across resumes; a finished run is refused (exit 2) and left untouched;
    `resume: never` and a changed recipe are refused before anything is trained or written."""
    recipe_file = write_recipe(tmp_path / "recipe.yaml", TINY, tiny_dataset, "run.max_steps=3")
    run = RunDir(run_train(load_recipe(recipe_file)))  # 4 steps an epoch: stops in epoch 1, at step 3
    assert json.loads(run.finished.read_text()) == {"epoch": 1, "global_step": 3, "epochs": 2, "max_steps": 3,
                                                   "epoch_step": 3}
    before = file_hashes(run.root)

    AcceleratorState._reset_state(True)
    with pytest.raises(SystemExit) as exit_info:
        sglr_zoo.cli.main(["train", str(recipe_file)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{run.root} already finished (epoch 1, step 3; finished.json)" in error
    assert f"`sglr-zoo eval {run.export('last')} --dataset" in error
    for overrides, message in [(["run.max_steps=6", "run.resume=never"], "run.resume: never, but"),
                               (["run.max_steps=6", "optim.momentum=0.5"], r"optim.momentum \(0.9 -> 0.5\)")]:
        with pytest.raises(UserError, match=message):
            run_train(load_recipe(recipe_file, overrides))
    assert file_hashes(run.root) == before  # nothing trained, evaluated or written

    run_train(load_recipe(recipe_file, ["run.max_steps=6"]))  # 3 more steps: the rest of epoch 1, 2 of epoch 2
    state = json.loads((run.checkpoint(2) / "state.json").read_text())
    assert (state["epoch"], state["epoch_step"], state["global_step"]) == (2, 2, 6)
    assert json.loads(run.finished.read_text())["global_step"] == 6
    assert [int(r["epoch"]) for r in read_metrics(run.root)[1]] == [1, 2]


class Evil:
    """Unpickling it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_resume_never_opens_a_planted_pickle(tmp_path, tiny_dataset):
    recipe_file = write_recipe(tmp_path / "recipe.yaml", TINY, tiny_dataset, "run.max_steps=4")
    run = RunDir(run_train(load_recipe(recipe_file)))  # epoch 1 of 2
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):  # accelerate's pickles
        torch.save(Evil(marker), run.checkpoint(1) / name)
    torch.load(run.checkpoint(1) / "custom_checkpoint_0.pkl", weights_only=False)  # as accelerate's load_state did
    assert marker.exists()
    marker.unlink()

    with pytest.warns(UserWarning, match="ignoring custom_checkpoint_0.pkl, optimizer.bin, random_states_0.pkl"):
        run_train(load_recipe(recipe_file, ["run.max_steps=null"]))
    assert not marker.exists()
    assert json.loads(run.finished.read_text())["epoch"] == 2


def test_a_full_disk_names_the_file_and_the_intact_checkpoint(tmp_path, tiny_dataset, monkeypatch):
    recipe = make_recipe(TINY, tiny_dataset, tmp_path)
    run = RunDir(tmp_path / "run")
    write = os.write

    def full_disk(fd: int, data) -> int:
        if run.partial_checkpoint(2).name in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(UserError) as info:
        run_train(recipe)
    message = str(info.value)
    assert f"could not write {run.partial_checkpoint(2)}/" in message and ": the disk is full;" in message
    assert f"the newest intact checkpoint is {run.checkpoint(1)}: `run.resume: auto` continues from it" in message
    assert [p.name for p in run.checkpoints.iterdir()] == ["epoch_0001"]

    monkeypatch.undo()  # room again: the same command continues
    run_train(recipe)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["epoch_0001", "epoch_0002"]
    assert run.finished.is_file()


@pytest.mark.parametrize("name", ["curves.png", "metrics.csv"])
def test_a_full_disk_while_writing_the_records_is_one_line(tmp_path, tiny_dataset, monkeypatch, name):
    run = RunDir(tmp_path / "run")
    write = os.write

    def full_disk(fd: int, data) -> int:
        if f".{name}." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(UserError, match=rf"^could not write {run.root / name}: the disk is full$"):
        run_train(make_recipe(TINY, tiny_dataset, tmp_path, "schedule.epochs=1"))
    assert not list(run.root.glob(f".{name}.*"))  # no temporary file left


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "the disk is full"),
    # what safetensors raises for a write its own code makes (it reports no errno)
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "Error while serializing: I/O error: No space left on device"),
])
def test_a_failed_export_is_one_line_and_the_run_continues(tmp_path, tiny_dataset, monkeypatch, error, reason):
    recipe, run = make_recipe(TINY, tiny_dataset, tmp_path, "schedule.epochs=1"), RunDir(tmp_path / "run")
    save = training.save_pretrained

    def failing(model, folder, **kwargs):
        if Path(folder).name == "last":
            raise error
        return save(model, folder, **kwargs)

    monkeypatch.setattr(training, "save_pretrained", failing)
    with pytest.raises(UserError, match=rf"^could not write {run.export('last')}: {reason}"):
        run_train(recipe)
    assert not run.finished.exists()

    monkeypatch.undo()  # room again: the same command writes the export, evaluates it and finishes
    run_train(recipe)
    assert ModelFolder(run.export("last")).is_model() and run.results("last").is_file() and run.finished.is_file()


def test_exports_are_never_written_through_a_link(tmp_path, tiny_dataset, monkeypatch):
    """A link planted at an export's file is removed, not written through; best/ turned into a link while the run
    trains (after open_run's checks) is refused when the export is written, in one line."""
    run = RunDir(tmp_path / "run")
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    for which in ("best", "last"):
        run.export(which).mkdir(parents=True)
        ModelFolder(run.export(which)).config.symlink_to(victim)
        ModelFolder(run.export(which)).weights.symlink_to(victim)
    run_train(make_recipe(TINY, tiny_dataset, tmp_path, "schedule.epochs=1", "data.val_size=16"))
    assert victim.read_text() == "keep me"
    for which in ("best", "last"):
        for path in (ModelFolder(run.export(which)).config, ModelFolder(run.export(which)).weights):
            assert path.is_file() and not path.is_symlink(), path

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monitor = training.monitor

    def planting(*args, **kwargs):  # after the first epoch's training, before its best/ export
        shutil.rmtree(other.export("best"), ignore_errors=True)
        other.export("best").symlink_to(elsewhere)
        return monitor(*args, **kwargs)

    other = RunDir(tmp_path / "other" / "run")
    monkeypatch.setattr(training, "monitor", planting)
    with pytest.raises(UserError, match=rf"^{other.export('best')} is a symbolic link \(to {elsewhere}\)"):
        run_train(make_recipe(TINY, tiny_dataset, tmp_path / "other", "schedule.epochs=1", "data.val_size=16"))
    assert not any(elsewhere.iterdir())


GOOD_STATE = {"epoch": 2, "epoch_step": 0, "epoch_sums": {}, "global_step": 8, "best_epoch": 1, "best_val_pgd": 25.0,
              "history": [{"epoch": 1, "steps": 4, "loss": 2.3, "test_pgd10_acc": 25.0}], "data_sha256": None,
              "plans": [{"made_at": 0, "epochs": 2, "steps": None, "start_epoch": 1}], "guard_best": -1.0,
              "guard_check": {}, "guard_events": []}

# (keys that replace GOOD_STATE's, fragment of the error)
BAD_STATES = [
    ({"history": [{"epoch": 1, "loss": ";cmd;#"}]}, "history row 1's loss is ';cmd;#', not a finite number"),
    ({"history": [{"epoch": 1, "loss": float("nan")}]}, "history row 1's loss is nan, not a finite number"),
    ({"history": [{"epoch": 1, "loss": True}]}, "history row 1's loss is True"),
    ({"history": [{"epoch": 1, "loss": [1.0]}]}, "history row 1's loss is [1.0]"),
    ({"history": [{"epoch": 1, "loss": 10**400}]}, "history row 1's loss is 1000000"),  # no float can hold it
    ({"history": [{"epoch": 1, "loss": "x" * 10**6}]}, "history row 1's loss is 'xxxxx"),
    ({"history": [{"epoch": 1, "x;rm -rf ~": 1.0}]}, "history row 1's column is 'x;rm -rf ~', not a metrics.csv col"),
    ({"history": [{"epoch": 1, "val_pgd10_acc\n": 1.0}]}, "not a metrics.csv column"),
    ({"history": [{"epoch": 1.5}]}, "history row 1 is {'epoch': 1.5}, not a row with an epoch"),
    ({"history": [{"loss": 1.0}]}, "history row 1 is {'loss': 1.0}, not a row with an epoch"),
    ({"history": [{"epoch": 1}, "row"]}, "history row 2 is 'row'"),
    ({"history": {"epoch": 1}}, "history is {'epoch': 1}, not a list of rows"),
    ({"epoch": "2"}, "epoch is '2', not a count"),
    ({"global_step": -1}, "global_step is -1, not a count"),
    ({"global_step": 2**64}, "global_step is 18446744073709551616, not a count"),
    ({"epoch_step": 2.5}, "epoch_step is 2.5, not a count"),
    ({"best_val_pgd": float("inf")}, "best_val_pgd is inf, not a finite number"),
    ({"epoch_sums": {"loss": "1"}}, "epoch_sums is {'loss': '1'}"),
    ({"epoch_sums": {"rm": 1.0}}, "epoch_sums is {'rm': 1.0}"),
    ({"data_sha256": "abc"}, "data_sha256 is 'abc', not a sha256"),
    ({"plans": [{"made_at": 0, "epochs": 2}]}, "plans is [{'made_at': 0, 'epochs': 2}], not a list of plans"),
    ({"plans": [{"made_at": 0, "epochs": 2, "steps": 4, "start_epoch": -1}]}, "plans is"),
]


@pytest.mark.parametrize("change, error", BAD_STATES)
def test_a_bad_run_state_is_refused(change, error):
    state = RunState()
    with pytest.raises(ValueError) as info:
        state.load_state_dict({**GOOD_STATE, **change})
    assert error in str(info.value) and len(str(info.value)) < 200
    assert state.state_dict() == RunState().state_dict()  # nothing taken over


def test_a_run_state_loads_and_an_older_one_too():
    state = RunState()
    state.load_state_dict(GOOD_STATE)
    assert state.state_dict() == GOOD_STATE
    older = {key: GOOD_STATE[key] for key in ("epoch", "global_step", "best_epoch", "best_val_pgd", "history")}
    state = RunState()
    state.load_state_dict(older)  # before epoch_step, epoch_sums, data_sha256, plans and the guard's record
    assert state.state_dict() == {**GOOD_STATE, "plans": []}


def test_a_tampered_history_is_refused_and_writes_nothing(tmp_path, tiny_dataset):
    """A history value `;cmd;#` with a recomputed manifest, and `.metrics.csv.partial` linked to a victim (the
    issue's attack): the resume stops in one line, and neither the victim nor metrics.csv is written."""
    recipe_file = write_recipe(tmp_path / "recipe.yaml", TINY, tiny_dataset, "run.max_steps=4")  # epoch 1 of 2
    run = RunDir(run_train(load_recipe(recipe_file)))
    checkpoint = run.checkpoint(1)
    state = json.loads((checkpoint / "state.json").read_text())
    state["history"][0]["loss"] = ";cmd;#"
    data = json.dumps(state).encode()
    (checkpoint / "state.json").write_bytes(data)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    victim = tmp_path / "bashrc"
    victim.write_text("keep me")
    (run.root / ".metrics.csv.partial").symlink_to(victim)
    metrics = run.metrics.read_bytes()

    with pytest.raises(UserError, match="no checkpoint in .* verifies") as info, pytest.warns(UserWarning) as warned:
        run_train(load_recipe(recipe_file, ["run.max_steps=null"]))
    assert "\n" not in str(info.value)
    [skipped] = [str(w.message) for w in warned if "skipping checkpoint" in str(w.message)]
    assert f"{checkpoint / 'state.json'}: not this run's state (state.json: history row 1's loss is ';cmd;#'" in skipped
    assert victim.read_text() == "keep me" and run.metrics.read_bytes() == metrics


@pytest.mark.slow
def test_resuming_on_other_data_at_the_same_path_is_refused(tmp_path):
    """The data at data.dataset changed between the stop and the resume (same size, other images and labels)."""
    data = write_parquet_dataset(tmp_path / "data")
    recipe_file = write_recipe(tmp_path / "recipe.yaml", TINY, data, "run.max_steps=4", "method.name=pgd_at")
    run = RunDir(run_train(load_recipe(recipe_file)))  # epoch 1 of 2
    before = file_hashes(run.root)
    write_parquet_dataset(data, seed=1)
    with pytest.raises(UserError, match=rf"^data.dataset: the training data at {data} is not the data "
                                        rf"{run.checkpoint(1)} was trained on \(sha256 of its images and labels\); "
                                        "restore that data, or train anew"):
        run_train(load_recipe(recipe_file, ["run.max_steps=null"]))
    after = file_hashes(run.root)
    after.pop("recipe.yaml"), before.pop("recipe.yaml")  # rewritten: run.max_steps changed
    assert after == before

    write_parquet_dataset(data)  # the data it began on: the run goes on
    run_train(load_recipe(recipe_file, ["run.max_steps=null"]))
    assert json.loads(run.finished.read_text())["epoch"] == 2


def test_resuming_with_another_monitoring_attack_keeps_both_columns(tmp_path, tiny_dataset):
    """eval.* may change on resume: metrics.csv keeps the columns of the rows monitored before (PGD-1 here)."""
    recipe_file = write_recipe(tmp_path / "recipe.yaml", TINY, tiny_dataset, "run.max_steps=4")
    run = RunDir(run_train(load_recipe(recipe_file)))
    run_train(load_recipe(recipe_file, ["run.max_steps=null", "eval.steps=2"]))
    columns, rows = read_metrics(run.root)
    assert columns[-2:] == ["train_pgd1_acc", "test_pgd1_acc"] and "test_pgd2_acc" in columns
    assert rows[0]["test_pgd1_acc"] != "" and rows[0]["test_pgd2_acc"] == ""
    assert rows[1]["test_pgd1_acc"] == "" and rows[1]["test_pgd2_acc"] != ""


def test_a_second_run_in_the_same_directory_stops(tmp_path, tiny_dataset):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    # Another run's process: it holds the directory's lock as RunLock does (flock, then its pid and host).
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, socket, sys\n"
        f"fd = os.open({str(run.lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode())\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(UserError, match=rf"{run.root} is in use by another run \(pid {holder.pid} on host "):
            run_train(make_recipe(TINY, tiny_dataset, tmp_path))
    finally:
        holder.communicate(timeout=30)
    assert sorted(p.name for p in run.root.iterdir()) == [".lock"]  # nothing trained or written


def test_nan_loss_raises_and_keeps_checkpoint(tmp_path, tiny_dataset, monkeypatch):
    base = make_recipe(TINY, tiny_dataset, tmp_path, "data.n_train=32", "schedule.name=constant").to_dict()
    run_dir = run_train(from_dict(base, ["run.max_steps=2"]))  # stops after epoch 1 (2 steps an epoch)
    checkpoints = run_dir / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / "epoch_0001"
    before = file_hashes(run_dir)

    build = training.build_objective

    def build_diverging(*args, **kwargs):
        objective = build(*args, **kwargs)
        forward, steps = objective.forward, []

        def diverging(model, x, x_adv, y, index, epoch):
            out = forward(model, x, x_adv, y, index, epoch)
            steps.append(epoch)
            if steps.count(2) == 2:  # epoch 2, step 2
                out["loss"] = out["loss"] * float("nan")
            return out

        objective.forward = diverging
        return objective

    monkeypatch.setattr(training, "build_objective", build_diverging)
    with pytest.raises(TrainingDiverged, match=r"nan at epoch 2, step 2") as info:
        run_train(from_dict(base))
    assert "optim.lr" in str(info.value)
    after = file_hashes(run_dir)
    after.pop("recipe.yaml"), before.pop("recipe.yaml")  # rewritten: this run has no run.max_steps
    assert after == before  # checkpoint, metrics, curves and exports untouched
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_0001"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, tiny_dataset):
    """torchrun with 2 CPU processes (gloo) vs 1 process, same global batch: same weights and soft labels."""
    recipe_file = write_recipe(tmp_path / "two" / "recipe.yaml", VIT, tiny_dataset)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "train.py", str(recipe_file)]
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    one = run_train(make_recipe(VIT, tiny_dataset, tmp_path / "one"))  # meanwhile, in this process
    try:
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out.decode()[-3000:]
    two = recipe_file.parent / "run"

    info = json.loads((two / "run.json").read_text())
    assert info["num_processes"] == 2
    checksums = info["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]

    weights_one, weights_two = load_file(one / "last" / "model.safetensors"), load_file(two / "last" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    initial = timm.create_model("vit_tiny_patch16_224", num_classes=10, **VIT["model"]["kwargs"]).state_dict()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=1e-5, msg=name)
    assert any(not torch.equal(weights_one[k], initial[k]) for k in weights_one)  # it trained

    bank_one, bank_two = bank(one / "checkpoints" / "epoch_0002"), bank(two / "checkpoints" / "epoch_0002")
    assert bank_one.shape == (64, 10)
    assert (bank_one.max(1).values < 1).all()  # every example's label was refined in epoch 2
    torch.testing.assert_close(bank_two, bank_one, rtol=0, atol=1e-5)

    (_, rows_one), (_, rows_two) = read_metrics(one), read_metrics(two)
    for row_one, row_two in zip(rows_one, rows_two, strict=True):
        assert float(row_two["loss"]) == pytest.approx(float(row_one["loss"]), abs=1e-5)
        for key in ("train_adv_acc", "train_clean_acc", "test_clean_acc"):
            assert row_two[key] == row_one[key], key
        # The monitoring attack's random start comes from each process's own generator: a borderline example
        # may fall either way (16 examples: 6.25 points each).
        for key in ("train_pgd1_acc", "test_pgd1_acc"):
            assert abs(float(row_two[key]) - float(row_one[key])) <= 2 * 6.25, key


# The paper recipes' end of run, scaled down: a BatchNorm model, a validation split (so a best/ export), checkpoints
# every epoch, and the full list of final attacks, AutoAttack included.
PAPER_END = {
    **TINY,
    "data": {"augment": True, "val_size": 16},
    "eval": {"n": 16, "steps": 1, "batch_size": 16, "final_attacks": ["clean", "pgd20", "cw20", "autoattack"],
             "final_n": 4},
}
# train.py's work under torchrun, logging (JSON lines) when each final evaluation ran and when each process exited;
# the first final evaluation is made to last longer than the process group's timeout.
DRIVER = """
import atexit, json, os, sys, time

import sglr_zoo.training as training
from sglr_zoo.cli import main

log, pause, recipe = sys.argv[1], float(sys.argv[2]), sys.argv[3]


def record(**event):
    with open(log, "a") as f:
        f.write(json.dumps({"rank": int(os.environ["RANK"]), **event}) + "\\n")


evaluate_export, evaluated = training.final_evaluation, []


def slow_final_evaluation(*args, **kwargs):
    start = time.time()
    if not evaluated and os.environ["RANK"] == "0":  # rank 1 waits for it in the evaluation's collectives
        time.sleep(pause)
    results = evaluate_export(*args, **kwargs)
    evaluated.append(start)
    record(event="final evaluation", start=start, end=time.time())
    return results


training.final_evaluation = slow_final_evaluation
atexit.register(lambda: record(event="exit", at=time.time()))
main(["train", recipe])
"""


def test_two_processes_batchnorm_run_finishes(tmp_path, tiny_dataset):
    """torchrun, 2 CPU processes, a BatchNorm model: BatchNorm statistics are aligned (equal checksums), the run
    exports best/ and last/ and writes run.json and results.json. Both processes share the final evaluation, in an
    evaluation group: rank 1 waits in its collectives for rank 0 longer than the training group's timeout, and is
    not stopped. With weight averaging on, the average (with its BatchNorm statistics) is the same on both processes
    too."""
    timeout = 15  # seconds; sized for a loaded 2-core machine, where a main-process-only write may take several
    recipe_file = write_recipe(tmp_path / "recipe.yaml", PAPER_END, tiny_dataset, "average.decay=0.9")
    (driver := tmp_path / "driver.py").write_text(DRIVER)
    log = tmp_path / "events.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(driver), str(log), str(timeout + 2), str(recipe_file)]
    env = {**subprocess_env(), training.TIMEOUT_ENV: str(timeout)}
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=500)
    assert done.returncode == 0, done.stdout.decode()[-3000:]

    run_dir = tmp_path / "run"
    info = json.loads((run_dir / "run.json").read_text())
    checksums = info["replica_checksums"]
    assert info["num_processes"] == 2 and len(checksums) == 2 and checksums[0] == checksums[1]
    assert len(checksums[0]) == 3 and info["weights"].startswith("exponential moving average")  # model, objective, average
    assert info["best_epoch"] in (1, 2) and info["last_epoch"] == 2
    for which in ("best", "last"):
        results = load_results(run_dir / which / "results.json")
        assert set(results.robust_accuracy) == {"pgd20", "cw20", "autoattack"} and results.n_examples == 4
        assert (run_dir / which / "autoattack_state.json").is_file()  # what a killed evaluation would resume from
    weights = load_file(run_dir / "last" / "model.safetensors")
    assert any(name.endswith("running_var") for name in weights)  # it has BatchNorm statistics

    events = [json.loads(line) for line in log.read_text().splitlines()]
    evaluations = [e for e in events if e["event"] == "final evaluation"]
    exited = {e["rank"]: e["at"] for e in events if e["event"] == "exit"}
    assert sorted(e["rank"] for e in evaluations) == [0, 0, 1, 1] and set(exited) == {0, 1}  # best and last, shared
    first = {rank: next(e for e in evaluations if e["rank"] == rank) for rank in (0, 1)}
    assert first[1]["end"] - first[1]["start"] > timeout  # rank 1 waited for rank 0 beyond the training's timeout


def test_replica_mismatch_raises_after_the_exports(tmp_path, tiny_dataset, monkeypatch):
    """The end-of-run checksum runs after last/ and run.json are written: a mismatch loses nothing."""
    monkeypatch.setattr(training, "replica_checksums", lambda accelerator, *modules: [[1.0, 2.0], [1.0, 3.0]])
    with pytest.raises(RuntimeError, match="different weights or soft labels"):
        run_train(make_recipe(TINY, tiny_dataset, tmp_path, "schedule.epochs=1"))
    run_dir = tmp_path / "run"
    assert (run_dir / "last" / "model.safetensors").is_file()
    assert json.loads((run_dir / "run.json").read_text())["replica_checksums"] == [[1.0, 2.0], [1.0, 3.0]]
    assert not (run_dir / "last" / "results.json").exists()  # no final evaluation of a run that failed its check


BUFFER_SYNC = """
import os, sys

import torch
from accelerate import Accelerator

from sglr_zoo.replicas import sync_buffers

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
for how in ("broadcast", "average"):
    norm = torch.nn.BatchNorm1d(3)
    norm.running_mean.fill_(rank + 1.0)  # as if each process had seen other batches
    norm.running_var.fill_(10.0 * (rank + 1))
    norm.num_batches_tracked.fill_(7)
    sync_buffers(accelerator, how, norm)
    torch.save(norm.state_dict(), os.path.join(sys.argv[1], f"{how}{rank}.pt"))
accelerator.end_training()
"""


@pytest.mark.slow
def test_sync_buffers(tmp_path):
    """run.buffer_sync: every process ends with rank 0's BatchNorm statistics (broadcast), or with their mean."""
    (script := tmp_path / "sync.py").write_text(BUFFER_SYNC)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=120)
    assert done.returncode == 0, done.stdout.decode()[-3000:]
    for how, mean, var in [("broadcast", 1.0, 10.0), ("average", 1.5, 15.0)]:
        for rank in (0, 1):
            state = torch.load(tmp_path / f"{how}{rank}.pt", weights_only=True)
            assert torch.equal(state["running_mean"], torch.full((3,), mean)), (how, rank)
            assert torch.equal(state["running_var"], torch.full((3,), var)), (how, rank)
            assert state["num_batches_tracked"] == 7


@pytest.mark.parametrize("value", ["0", "-5", "ten", "inf", "nan"])
def test_process_group_timeout_must_be_positive_seconds(tmp_path, tiny_dataset, monkeypatch, value):
    monkeypatch.setenv(training.TIMEOUT_ENV, value)
    with pytest.raises(UserError, match=training.TIMEOUT_ENV):
        run_train(make_recipe(TINY, tiny_dataset, tmp_path))
    assert not (tmp_path / "run").exists()


def test_monitoring_is_the_evaluators_measurement(tiny_dataset):
    """The per-epoch PGD column is the evaluator's `pgd<eval.steps>`: the same model, examples and seed give the
    same accuracy as `evaluate` reports."""
    recipe = make_recipe(TINY, tiny_dataset, Path("unused"), "eval.steps=3", "eval.batch_size=8")
    splits = load_splits(recipe.data)
    model = create_model("preactresnet_tiny_cifar", splits.num_classes).eval()
    torch.manual_seed(5)
    row = training.monitor(model, splits, recipe, Accelerator(cpu=True))
    assert set(row) == {"train_clean_acc", "train_pgd3_acc", "test_clean_acc", "test_pgd3_acc"}
    images = to_float(splits.train.images[:16], 32)
    results = evaluate(model, images, splits.train.labels[:16], attacks=["clean", "pgd3"], batch_size=8, seed=5,
                       eps=recipe.attack.eps)
    assert row["train_clean_acc"] == results.clean_accuracy and row["train_pgd3_acc"] == results.robust_accuracy["pgd3"]
    assert results.attacks["pgd3"]["step_size"] == "2/255"  # eps / 4, not the training attack's step_size


def test_quickstart_recipe_runs(tmp_path, tiny_dataset):
    """A smoke test of the quickstart's settings (auto precision, onecycle, nesterov, its budget picking the
    architecture and, planning thousands of one-step epochs here, crops and flips) for two steps
    (tests/test_schedule.py covers the budget)."""
    recipe = load_recipe(REPO / "recipes" / "quickstart_cifar10.yaml")
    assert recipe.run.mixed_precision == "auto" and recipe.schedule.budget and recipe.schedule.name == "onecycle"
    recipe = load_recipe(REPO / "recipes" / "quickstart_cifar10.yaml",
                         [f"data.dataset={tiny_dataset}", "run.max_steps=2", "eval.n=8", f"run.output_dir={tmp_path}"])
    run_dir = run_train(recipe)
    picked = json.loads((run_dir / "plans.json").read_text())["arch"]
    trained = load_recipe(run_dir / "recipe.yaml")
    assert picked in recipe.model.arch and trained.model.arch == picked and trained.data.augment is True
    info = json.loads((run_dir / "run.json").read_text())
    assert info["speed"]["mixed_precision"]["value"] in ("bf16", "no") and info["last_epoch"] == 2
    _, rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # 64 images at batch 128: one step an epoch
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert (run_dir / "last" / "model.safetensors").is_file()


def test_names_that_moved_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match="import it from sglr_zoo.schedule"):
        assert training.lr_factor is lr_factor
    with pytest.raises(AttributeError):
        training.no_such_name  # noqa: B018


def test_nfgsm_recipe_reaches_the_training_attack(tmp_path, tiny_dataset, monkeypatch):
    """attack.noise and attack.project (N-FGSM: 2 and false) are what the training attack runs with."""
    from sglr_zoo import loop

    seen, pgd = [], loop.pgd

    def recording(*args, **kwargs):
        seen.append((kwargs["noise"], kwargs["project"], kwargs["step_size"], kwargs["steps"]))
        return pgd(*args, **kwargs)

    monkeypatch.setattr(loop, "pgd", recording)
    run_train(make_recipe(TINY, tiny_dataset, tmp_path, "run.max_steps=1", "attack.noise=2", "attack.project=false",
                          "attack.step_size=8/255"))
    assert seen == [(2.0, False, 8 / 255, 1)]
