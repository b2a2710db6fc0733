"""The trainer: lr schedules, a tiny end-to-end run and its files, kill/resume, divergence, 1 vs 2 processes."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

import sglr_zoo
import sglr_zoo.training as training
from sglr_zoo.errors import UserError
from sglr_zoo.recipe import Recipe, ScheduleConfig, from_dict, load_recipe
from sglr_zoo.training import COLUMNS, TrainingDiverged, _check_hardware, latest_checkpoint, lr_factor, train

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


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """One thread (the machine is shared; subprocesses get OMP_NUM_THREADS=1), and a fresh Accelerator state:
    accelerate keeps one per process and refuses a second mixed-precision setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


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
    """The SGLR soft-label bank from a checkpoint: the objective is the first object registered for checkpointing."""
    (path,) = checkpoint.glob("custom_checkpoint_0.*")
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    return state["bank"]


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
        _check_hardware(recipe, accelerator)
    else:
        with pytest.raises(UserError, match=error):
            _check_hardware(recipe, accelerator)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on a GPU")
def test_fp16_on_cpu_is_a_user_error(tmp_path, tiny_dataset):
    recipe = make_recipe(TINY, tiny_dataset, tmp_path, "run.mixed_precision=fp16")
    with pytest.raises(UserError, match="run.mixed_precision"):
        run_train(recipe)
    assert not (tmp_path / "run").exists()


def test_latest_checkpoint_ignores_partial(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for name in ("epoch_0001", "epoch_0002", ".partial_epoch_0003", "epoch_3", "epoch_0004.tmp"):
        (tmp_path / name).mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch_0002"


# ---- training runs -----------------------------------------------------------------------------------------------

def test_tiny_run(tmp_path, tiny_dataset, monkeypatch):
    calls = []

    def spy_pgd(model, x, y, **kwargs):
        # The trainer attacks the unwrapped module (no DDP wrapper: no gradient all-reduce), never touching .grad.
        assert not isinstance(model, DistributedDataParallel)
        grads_before = [p.grad for p in model.parameters()]
        x_adv = sglr_zoo.attacks.pgd(model, x, y, **kwargs)
        assert all(p.grad is g for p, g in zip(model.parameters(), grads_before))
        calls.append(all(g is None for g in grads_before))
        return x_adv

    monkeypatch.setattr(training, "pgd", spy_pgd)
    recipe = make_recipe(TINY, tiny_dataset, tmp_path, "data.val_size=16")
    run_dir = run_train(recipe)
    assert run_dir == tmp_path / "run"
    assert calls and all(calls)

    for name in ("recipe.yaml", "run.json", "metrics.csv", "curves.png", "last/model.safetensors", "last/config.json",
                 "best/model.safetensors", "best/config.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert load_recipe(run_dir / "recipe.yaml").to_dict() == recipe.to_dict()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]

    columns, rows = read_metrics(run_dir)
    assert columns == COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert all(row[c] != "" for c in COLUMNS), row  # evaluated every epoch, val included
        assert math.isfinite(float(row["loss"])) and 0 <= float(row["val_pgd_acc"]) <= 100

    info = json.loads((run_dir / "run.json").read_text())
    assert info["last_epoch"] == 2 and info["num_processes"] == 1 and info["seed"] == 0
    assert info["best_epoch"] in (1, 2) and info["best_val_pgd_acc"] == max(float(r["val_pgd_acc"]) for r in rows)
    assert info["num_examples_train"] == 48 and info["mixed_precision"] == "no" and info["command"] == "pytest"
    assert len(info["replica_checksums"]) == 1

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loaded = sglr_zoo.zoo.load(str(run_dir / "last"))
    stock = timm.create_model(f"local-dir:{run_dir / 'last'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(stock(x), loaded(x))
    assert not loaded.training


def test_kill_and_resume(tmp_path, tiny_dataset):
    """Run B is killed (SIGKILL) after its epoch-2 checkpoint, then resumed: it ends exactly where run A ends."""
    overrides = ["schedule.epochs=3", "method.start_epoch=2"]
    run_a = run_train(make_recipe(TINY, tiny_dataset, tmp_path / "a", *overrides))

    recipe_file = write_recipe(tmp_path / "b" / "recipe.yaml", TINY, tiny_dataset, *overrides)
    run_b = recipe_file.parent / "run"
    checkpoints = run_b / "checkpoints"
    process = subprocess.Popen([sys.executable, "train.py", str(recipe_file)], cwd=REPO, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (checkpoints / "epoch_0002").is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, "train.py ended before it was killed: " + err.decode()[-2000:]
    assert (checkpoints / "epoch_0002").is_dir() and not (checkpoints / "epoch_0003").exists()
    assert not (run_b / "last").exists()
    # What a kill during the epoch-3 save would leave behind: never taken for a checkpoint.
    (checkpoints / ".partial_epoch_0003").mkdir(exist_ok=True)
    (checkpoints / ".partial_epoch_0003" / "model.safetensors").write_bytes(b"half-written")
    assert latest_checkpoint(checkpoints) == checkpoints / "epoch_0002"

    run_train(load_recipe(recipe_file, ["run.resume=auto"]))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_0002", "epoch_0003"]

    weights_a, weights_b = load_file(run_a / "last" / "model.safetensors"), load_file(run_b / "last" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert torch.equal(bank(run_a / "checkpoints" / "epoch_0003"), bank(checkpoints / "epoch_0003"))
    (_, rows_a), (_, rows_b) = read_metrics(run_a), read_metrics(run_b)
    assert len(rows_a) == 3 and without_timing(rows_b) == without_timing(rows_a)
    assert json.loads((run_b / "run.json").read_text())["last_epoch"] == 3
    info_a = json.loads((run_a / "run.json").read_text())
    assert info_a["best_epoch"] is None and not (run_a / "best").exists()  # no validation split, no best/


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
        for key in ("train_adv_acc", "train_clean_acc", "train_pgd_acc", "test_clean_acc", "test_pgd_acc"):
            assert row_two[key] == row_one[key], key


def test_quickstart_recipe_runs(tmp_path, tiny_dataset):
    """A smoke test of the quickstart's settings (bf16, channels_last, onecycle, nesterov) for two steps."""
    recipe = load_recipe(REPO / "recipes" / "quickstart_cifar10.yaml",
                         [f"data.dataset={tiny_dataset}", "run.max_steps=2", "eval.n=8", f"run.output_dir={tmp_path}"])
    assert recipe.run.mixed_precision == "bf16" and recipe.run.channels_last and recipe.schedule.name == "onecycle"
    run_dir = run_train(recipe)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["mixed_precision"] == "bf16" and info["last_epoch"] == 2
    _, rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # 64 images at batch 128: one step an epoch
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert (run_dir / "last" / "model.safetensors").is_file()
