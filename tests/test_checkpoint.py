"""Checkpoints without pickles, crash-safe writes, and the run directory's rules (lock, finished, resume)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sglr_zoo import checkpoint, resume
from sglr_zoo.checkpoint import Checkpointer, CheckpointReader, latest_checkpoint, rotate_checkpoints
from sglr_zoo.errors import UserError
from sglr_zoo.files import GiB, WriteFailed, write_atomic
from sglr_zoo.objectives import build_objective
from sglr_zoo.recipe import Recipe, from_dict
from sglr_zoo.resume import finish_run, open_run
from sglr_zoo.rundir import RunDir, RunLock
from sglr_zoo.serialization import join_tensors, split_tensors
from sglr_zoo.training import RunState

# Every file name accelerate's save_state writes as a pickle (and loads with weights_only=False, or not at all).
ACCELERATE_PICKLES = ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                      "scheduler.bin", "sampler.bin", "scaler.pt", "pytorch_model.bin", "dl_state_dict.bin"]


class OneProcess:
    """What Checkpointer and open_run use of an Accelerator, for a single process."""

    is_main_process, process_index, num_processes, device = True, 0, 1, torch.device("cpu")

    def __init__(self, scaler: torch.amp.GradScaler | None = None):
        self.scaler = scaler

    def wait_for_everyone(self) -> None:
        pass


class Evil:
    """Unpickling it creates `marker`: what a crafted checkpoint file could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class Trainer:
    """A tiny model, an SGLR objective with a weight teacher, SGD with momentum, and the run state."""

    def __init__(self, run: RunDir, recipe: Recipe, seed: int = 0, scaler: torch.amp.GradScaler | None = None):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        self.objective = build_objective(recipe.method, labels=torch.tensor([0, 1, 2, 1]), num_classes=3,
                                         start_epoch=1, model=self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.state = RunState()
        self.checkpointer = Checkpointer(OneProcess(scaler), run, model=self.model, objective=self.objective,
                                         optimizer=self.optimizer, state=self.state, recipe=recipe)

    def step(self) -> None:
        x = torch.randn(4, 6)
        loss = self.model(x).logsumexp(1).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.objective.write_bank(torch.tensor([0, 2]), torch.rand(2, 3))
        self.objective.update_teacher(self.model)
        self.state.global_step += 1

    def epoch(self, epoch: int) -> Path:
        self.step()
        self.step()
        self.state.epoch = epoch
        self.state.history.append({"epoch": epoch, "loss": 1.0 / epoch})
        return self.checkpointer.save(epoch)


def make_recipe(tmp_path: Path, *overrides: str) -> Recipe:
    return from_dict({"method": {"teacher": "weights", "start_epoch": 1}, "schedule": {"epochs": 3, "name": "cosine"},
                      "run": {"output_dir": str(tmp_path), "name": "run"}}, list(overrides))


@pytest.fixture
def run(tmp_path) -> RunDir:
    return RunDir(tmp_path / "run")


def rng_draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand()


def everything(trainer: Trainer) -> dict:
    return {"model": trainer.model.state_dict(), "objective": trainer.objective.state_dict(),
            "optimizer": trainer.optimizer.state_dict(), "state": trainer.state.state_dict()}


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def nested(depth: int = 100_000) -> bytes:
    """JSON that json.loads cannot parse without a RecursionError."""
    return b"[" * depth + b"]" * depth


def one_line(error: BaseException | warnings.WarningMessage) -> str:
    message = str(error.message if isinstance(error, warnings.WarningMessage) else error)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def rewrite_manifest(folder: Path, **files: bytes) -> None:
    """Replaces or adds files and lists them in the manifest with their true sha256: an attacker's checkpoint."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, data in files.items():
        (folder / name).write_bytes(data)
        manifest["files"][name] = {"sha256": checkpoint._sha256(data), "size": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


# ---- format ------------------------------------------------------------------------------------------------------

def test_optimizer_state_survives_json():
    """Integer parameter ids stay integers: as strings, torch's load_state_dict would silently match no parameter."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(split_tensors(optimizer.state_dict(), tensors)))
    restored = join_tensors(tree, tensors)
    assert_same(restored, optimizer.state_dict())
    assert sorted(restored["state"]) == [0, 1]
    with pytest.raises(TypeError, match="keys"):
        split_tensors({"a": 1, 2: 3}, {})
    with pytest.raises(TypeError, match="cannot hold"):
        split_tensors({"a": object()}, {})


def test_save_and_load_restore_everything(run, tmp_path):
    recipe = make_recipe(tmp_path)
    trainer = Trainer(run, recipe, scaler=torch.amp.GradScaler("cpu", init_scale=512.0))
    folder = trainer.epoch(1)
    assert folder == run.checkpoint(1) and not run.partial_checkpoint(1).exists()
    draws = rng_draws()

    files = sorted(p.name for p in folder.iterdir())
    assert files == ["manifest.json", "model.safetensors", "objective.safetensors", "optimizer.json",
                     "optimizer.safetensors", "recipe.json", "rng_0.json", "scaler.json", "state.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["epoch"] == 1 and manifest["global_step"] == 2 and sorted(manifest["files"]) == files[1:]
    assert json.loads((folder / "state.json").read_text())["history"] == [{"epoch": 1, "loss": 1.0}]
    objective_keys = CheckpointReader(folder).tensors("objective.safetensors").keys()
    assert "bank" in objective_keys and any(k.startswith("teacher.") for k in objective_keys)

    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    fresh = Trainer(run, recipe, seed=1, scaler=scaler)
    assert not torch.equal(fresh.model[0].weight, trainer.model[0].weight)
    rng_draws()  # the random states move on; loading puts them back
    fresh.checkpointer.load(folder)
    assert_same(everything(fresh), everything(trainer))
    assert scaler.state_dict() == trainer.checkpointer.accelerator.scaler.state_dict()
    assert rng_draws() == draws

    # Both continue identically from the same random state.
    random_state = torch.get_rng_state()
    trainer.epoch(2)
    torch.set_rng_state(random_state)
    fresh.epoch(2)
    assert_same(everything(fresh), everything(trainer))


def test_load_refuses_a_different_model(run, tmp_path):
    Trainer(run, make_recipe(tmp_path)).epoch(1)
    other = Trainer(run, make_recipe(tmp_path))
    other.model[2] = nn.Linear(8, 5)
    with pytest.raises(UserError, match=r"model.safetensors does not fit this recipe's model"):
        other.checkpointer.load(run.checkpoint(1))


def test_latest_checkpoint_skips_what_does_not_verify(run, tmp_path):
    assert latest_checkpoint(run.checkpoints) is None
    trainer = Trainer(run, make_recipe(tmp_path, "run.keep_checkpoints=5"))
    for epoch in (1, 2, 3):
        trainer.epoch(epoch)
    for name in (".partial_epoch_0004", "epoch_4", "epoch_0004.tmp"):
        (run.checkpoints / name).mkdir()
    assert latest_checkpoint(run.checkpoints) == run.checkpoint(3)

    corrupt(run.checkpoint(3) / "optimizer.safetensors")
    (run.checkpoint(2) / "manifest.json").unlink()  # as a kill before the manifest would leave it, had it been renamed
    with pytest.warns(UserWarning) as warned:
        assert latest_checkpoint(run.checkpoints) == run.checkpoint(1)
    messages = [str(w.message) for w in warned]
    assert any("epoch_0003" in m and "sha256" in m for m in messages), messages
    assert any("epoch_0002" in m and "manifest.json not found" in m for m in messages), messages


def test_rotation_keeps_what_was_just_written(run, tmp_path):
    trainer = Trainer(run, make_recipe(tmp_path, "run.keep_checkpoints=5"))
    for epoch in (1, 2, 3, 9):
        trainer.epoch(epoch)
    rotate_checkpoints(run, 3, keep=1)  # epoch 9 (say, left unverifiable) must not push epoch 3 out
    assert [p.name for p in run.checkpoint_dirs()] == ["epoch_0003", "epoch_0009"]
    trainer.checkpointer.recipe = make_recipe(tmp_path, "run.keep_checkpoints=2")
    trainer.epoch(4)
    assert [p.name for p in run.checkpoint_dirs()] == ["epoch_0003", "epoch_0004", "epoch_0009"]


# ---- no pickle is ever opened ----------------------------------------------------------------------------------

@pytest.fixture
def evil(tmp_path) -> tuple[bytes, Path]:
    """A pickle that creates a marker file when loaded; checked to do so, so the tests below can fail."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save(Evil(marker), path)
    torch.load(path, weights_only=False)  # what accelerate's load_state does with custom_checkpoint_0.pkl
    assert marker.exists()
    marker.unlink()
    return path.read_bytes(), marker


def test_planted_pickles_are_never_opened(run, tmp_path, evil):
    payload, marker = evil
    trainer = Trainer(run, make_recipe(tmp_path))
    folder = trainer.epoch(1)
    for name in ACCELERATE_PICKLES:
        (folder / name).write_bytes(payload)
    fresh = Trainer(run, make_recipe(tmp_path), seed=1)
    with pytest.warns(UserWarning, match="ignoring .*custom_checkpoint_0.pkl.*never opened"):
        fresh.checkpointer.load(folder)
    assert not marker.exists()
    assert_same(everything(fresh), everything(trainer))


# (file replaced or added, manifest rewritten to match it, fragment of the error)
TAMPERED = [
    ("model.safetensors", False, "more than a file its manifest.json lists at"),  # the pickle is larger
    ("optimizer.safetensors", False, "more than a file its manifest.json lists at"),
    ("rng_0.json", False, "sha256 differs"),
    ("custom_checkpoint_0.pkl", True, "not one of the safe formats"),
    ("model.safetensors", True, "not a valid safetensors file"),
    ("state.json", True, "not valid JSON"),
    ("rng_0.json", True, "not valid JSON"),
]


@pytest.mark.parametrize("name, listed, error", TAMPERED)
def test_tampered_checkpoint_is_refused(run, tmp_path, evil, name, listed, error):
    payload, marker = evil
    folder = Trainer(run, make_recipe(tmp_path)).epoch(1)
    if listed:
        rewrite_manifest(folder, **{name: payload})
    else:
        (folder / name).write_bytes(payload)
    with pytest.raises(UserError, match=error):
        Trainer(run, make_recipe(tmp_path), seed=1).checkpointer.load(folder)
    assert not marker.exists()
    with pytest.warns(UserWarning, match=error):  # a listed file with its true sha256 must parse too
        assert latest_checkpoint(run.checkpoints) is None


# (file, content listed in the manifest with its true sha256, fragment of the error)
MALFORMED = [
    ("rng_0.json", b'{"python": [3, [1, 2], null], "numpy": {}, "torch": [1]}', "rng_0.json: not a random state"),
    ("rng_0.json", b"[]", "rng_0.json: not a random state"),
    ("state.json", b"{}", "state.json: not this run's state"),
    ("state.json", b'{"epoch": 1, "global_step": 0, "best_epoch": 0, "best_val_pgd": 0, "history": [1]}',
     r"state.json: not this run's state \(.*history"),  # the rest of the message is RunState's
    ("optimizer.json", b'{"state": {"__int_keys__": {"0": {"momentum_buffer": {"__tensor__": "t99"}}}}}',
     "names a tensor that optimizer.safetensors lacks"),
    ("optimizer.json", b'{"state": {}, "param_groups": [{"params": [0, 1, 2, 3, 4, 5, 6, 7, 8]}]}',
     "its optimizer state does not fit"),
]


@pytest.mark.parametrize("name, content, error", MALFORMED)
def test_malformed_checkpoint_files_are_user_errors(run, tmp_path, name, content, error):
    folder = Trainer(run, make_recipe(tmp_path)).epoch(1)
    rewrite_manifest(folder, **{name: content})
    with pytest.raises(UserError, match=error):
        Trainer(run, make_recipe(tmp_path), seed=1).checkpointer.load(folder)


def test_manifest_may_only_name_files_in_the_folder(run, tmp_path):
    folder = Trainer(run, make_recipe(tmp_path)).epoch(1)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../recipe.json"] = {"sha256": "0" * 64, "size": 1}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not a file name in the checkpoint folder"):
        CheckpointReader(folder)


# ---- crash safety --------------------------------------------------------------------------------------------

def fail_writes_into(monkeypatch, fragment: str, error: BaseException, keep_half: bool = False) -> None:
    """os.write fails for files whose path contains `fragment` (after writing half the bytes if `keep_half`)."""
    write = os.write

    def failing(fd: int, data) -> int:
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            if keep_half:
                write(fd, bytes(data[:len(data) // 2]))
            raise error
        return write(fd, data)

    monkeypatch.setattr(os, "write", failing)


def test_write_atomic_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    path.write_text("old")
    fail_writes_into(monkeypatch, "metrics.csv", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(WriteFailed, match=f"could not write {path}: the disk is full"):
        write_atomic(path, b"new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]
    monkeypatch.undo()
    write_atomic(path, b"new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_checkpoint_on_a_full_disk_names_the_file_and_the_intact_checkpoint(run, tmp_path, monkeypatch):
    trainer = Trainer(run, make_recipe(tmp_path))
    trainer.epoch(1)
    fail_writes_into(monkeypatch, "model.safetensors", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(UserError) as info:
        trainer.epoch(2)
    message = str(info.value)
    assert f"could not write {run.partial_checkpoint(2) / 'model.safetensors'}: the disk is full" in message
    assert f"the newest intact checkpoint is {run.checkpoint(1)}" in message and "run.resume: auto" in message
    assert [p.name for p in run.checkpoints.iterdir()] == ["epoch_0001"]  # the half-written folder is gone
    CheckpointReader(run.checkpoint(1)).verify()


class Killed(BaseException):
    """Stands in for SIGKILL: no `except Exception` cleanup runs (the real SIGKILL runs are in test_training)."""


def kill_at(monkeypatch, point: str) -> None:
    if point == "mid-file":
        fail_writes_into(monkeypatch, "optimizer.safetensors", Killed(), keep_half=True)
    elif point == "before-manifest":
        fail_writes_into(monkeypatch, "manifest.json", Killed())
    elif point in ("before-rename", "after-rename"):
        calls = []
        real = checkpoint.fsync_dir

        def fsync_dir(folder: Path) -> None:
            calls.append(folder)
            if point == "before-rename" or len(calls) == 2:  # the partial folder, then checkpoints/ after the rename
                raise Killed
            real(folder)

        monkeypatch.setattr(checkpoint, "fsync_dir", fsync_dir)
    else:
        def rotate_checkpoints(*args) -> None:
            raise Killed

        monkeypatch.setattr(checkpoint, "rotate_checkpoints", rotate_checkpoints)


@pytest.mark.parametrize("point, survivor", [("mid-file", 1), ("before-manifest", 1), ("before-rename", 1),
                                             ("after-rename", 2), ("rotation", 2)])
def test_a_crash_while_saving_keeps_a_checkpoint(run, tmp_path, monkeypatch, point, survivor):
    trainer = Trainer(run, make_recipe(tmp_path, "run.keep_checkpoints=1"))
    trainer.epoch(1)
    kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        trainer.epoch(2)
    monkeypatch.undo()
    assert latest_checkpoint(run.checkpoints) == run.checkpoint(survivor)
    fresh = Trainer(run, make_recipe(tmp_path), seed=1)
    fresh.checkpointer.load(run.checkpoint(survivor))
    assert fresh.state.epoch == survivor
    # Saving again replaces whatever the crash left: a half-written folder, an unrotated older checkpoint.
    trainer.epoch(2)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["epoch_0002"]


# ---- one run per directory ------------------------------------------------------------------------------------

class LockHolder:
    """Another process (forked: started in no time) that holds the run's lock until `stop()` or SIGKILL.

    Pipes, not multiprocessing events: setting an event waits for its waiters, and a killed one never answers."""

    def __init__(self, run: RunDir):
        ready_read, ready_write = os.pipe()
        self._stop_read, self._stop_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: lock, say so, wait until the parent closes its end of the pipe
            os.close(self._stop_write)
            RunLock.acquire(run)
            os.write(ready_write, b"1")
            os.read(self._stop_read, 1)
            os._exit(0)
        os.close(ready_write)
        assert os.read(ready_read, 1) == b"1"
        os.close(ready_read)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)

    def stop(self) -> None:
        os.close(self._stop_write)
        os.close(self._stop_read)
        if self.pid:
            with contextlib.suppress(ChildProcessError):  # already reaped by kill()
                os.waitpid(self.pid, 0)


def test_lock_names_its_holder_and_is_taken_over_when_it_dies(run):
    holder = LockHolder(run)
    try:
        with pytest.raises(UserError, match=rf"in use by another run \(pid {holder.pid} on host "
                                            rf"{socket.gethostname()}\).*run.name"):
            RunLock.acquire(run)
        holder.kill()  # a killed run never unlocks; the kernel drops its flock
    finally:
        holder.stop()
    lock = RunLock.acquire(run)
    assert json.loads(run.lock.read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_left_by_a_failed_call_in_this_process_is_taken_over(run):
    RunLock.acquire(run)  # never released, as when train() raises
    RunLock.acquire(run).release()


def test_open_run_refuses_a_directory_in_use(run, tmp_path):
    lock, resume_from = open_run(OneProcess(), run, make_recipe(tmp_path))
    assert resume_from is None and run.lock.is_file()
    lock.release()  # a forked child would inherit the open lock
    holder = LockHolder(run)
    try:
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            open_run(OneProcess(), run, make_recipe(tmp_path))
    finally:
        holder.stop()


# ---- the directory's rules -------------------------------------------------------------------------------------

def test_resume_auto_picks_the_newest_that_verifies(run, tmp_path):
    trainer = Trainer(run, make_recipe(tmp_path))
    trainer.epoch(1), trainer.epoch(2)
    corrupt(run.checkpoint(2) / "model.safetensors")
    with pytest.warns(UserWarning, match="epoch_0002"):
        lock, resume_from = open_run(OneProcess(), run, make_recipe(tmp_path))
    assert resume_from == run.checkpoint(1)
    lock.release()
    corrupt(run.checkpoint(1) / "state.json")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no checkpoint in .* verifies"):
        open_run(OneProcess(), run, make_recipe(tmp_path))


def test_resume_never_refuses_a_directory_with_checkpoints(run, tmp_path):
    lock, _ = open_run(OneProcess(), run, make_recipe(tmp_path, "run.resume=never"))
    lock.release()
    Trainer(run, make_recipe(tmp_path)).epoch(1)
    with pytest.raises(UserError, match=r"run.resume: never, but .* holds checkpoints \(epoch_0001\): pick another "
                                        r"run.name or run.output_dir"):
        open_run(OneProcess(), run, make_recipe(tmp_path, "run.resume=never"))
    RunLock.acquire(run).release()  # a refusal leaves the directory unlocked


# (overrides of the resumed run, keys named in the refusal or None when allowed)
CHANGES = [
    (["eval.n=7", "eval.final_attacks=[clean]", "run.max_steps=5", "run.num_workers=2", "run.compile=false",
      "run.threads=1", "run.keep_checkpoints=4", "optim.lr=0.05", "optim.grad_clip=1.0"], None),
    (["optim.momentum=0.5"], ["optim.momentum (0.9 -> 0.5)"]),
    (["schedule.epochs=4", "method.alpha=0.5"], ["method.alpha (0.9 -> 0.5)", "schedule.epochs (3 -> 4)"]),
    (["model.kwargs={depth: 2}"], ["model.kwargs ({} -> {'depth': 2})"]),
    (["run.mixed_precision=bf16"], ["run.mixed_precision ('auto' -> 'bf16')"]),
]


@pytest.mark.parametrize("overrides, named", CHANGES)
def test_resume_refuses_a_changed_recipe(run, tmp_path, overrides, named):
    Trainer(run, make_recipe(tmp_path)).epoch(1)
    recipe = make_recipe(tmp_path, *overrides)
    if named is None:
        lock, resume_from = open_run(OneProcess(), run, recipe)
        assert resume_from == run.checkpoint(1)
        lock.release()
        return
    with pytest.raises(UserError) as info:
        open_run(OneProcess(), run, recipe)
    message = str(info.value)
    assert all(key in message for key in named), message
    assert "may change only run.resume" in message and "eval.*" in message


def test_resume_from_a_folder_only_continues_this_runs_newest(run, tmp_path):
    other = RunDir(tmp_path / "other")
    Trainer(other, make_recipe(tmp_path)).epoch(1)
    trainer = Trainer(run, make_recipe(tmp_path))
    recipe = make_recipe(tmp_path, f"run.resume={other.checkpoint(1)}")
    lock, resume_from = open_run(OneProcess(), run, recipe)  # an empty directory may start from any checkpoint
    assert resume_from == other.checkpoint(1)
    lock.release()
    trainer.epoch(1), trainer.epoch(2)
    with pytest.raises(UserError, match="already holds this run's checkpoints up to epoch_0002"):
        open_run(OneProcess(), run, recipe)
    with pytest.raises(UserError, match="already holds"):
        open_run(OneProcess(), run, make_recipe(tmp_path, f"run.resume={run.checkpoint(1)}"))
    lock, resume_from = open_run(OneProcess(), run, make_recipe(tmp_path, f"run.resume={run.checkpoint(2)}"))
    assert resume_from == run.checkpoint(2)
    lock.release()
    with pytest.raises(UserError, match="not found"):
        open_run(OneProcess(), run, make_recipe(tmp_path, f"run.resume={tmp_path / 'missing'}"))


def finish(run: RunDir, recipe: Recipe, epoch: int, global_step: int) -> None:
    trainer = Trainer(run, recipe)
    for e in range(1, epoch + 1):
        trainer.epoch(e)
    trainer.state.global_step = global_step
    finish_run(OneProcess(), run, RunLock.acquire(run), trainer.state, recipe)


def test_a_finished_run_is_not_rerun(run, tmp_path):
    finish(run, make_recipe(tmp_path), epoch=3, global_step=6)
    assert json.loads(run.finished.read_text()) == {"epoch": 3, "global_step": 6, "epochs": 3, "max_steps": None}
    RunLock.acquire(run).release()  # finish_run unlocked it
    for mode in ("auto", "never", str(run.checkpoint(3))):
        with pytest.raises(UserError, match=rf"{run.root} already finished \(epoch 3, step 6; finished.json\): it "
                                            rf"is neither trained nor evaluated again. To evaluate it again: "
                                            rf"`sglr-zoo eval {run.root}/last --dataset"):
            open_run(OneProcess(), run, make_recipe(tmp_path, f"run.resume={mode}"))


@pytest.mark.parametrize("max_steps, refused", [(4, True), (3, True), (5, False), (None, False)])
def test_a_run_stopped_at_max_steps_trains_on_only_when_asked_for_more(run, tmp_path, max_steps, refused):
    finish(run, make_recipe(tmp_path, "run.max_steps=4"), epoch=2, global_step=4)
    recipe = make_recipe(tmp_path, f"run.max_steps={'null' if max_steps is None else max_steps}")
    if refused:
        with pytest.raises(UserError, match="already finished"):
            open_run(OneProcess(), run, recipe)
    else:
        lock, resume_from = open_run(OneProcess(), run, recipe)
        assert resume_from == run.checkpoint(2)
        lock.release()


def test_a_bad_finished_marker_is_named(run, tmp_path):
    run.root.mkdir(parents=True)
    run.finished.write_text("[")
    with pytest.raises(UserError, match=f"{run.finished}: not a finished-run marker"):
        open_run(OneProcess(), run, make_recipe(tmp_path))


# ---- a run directory someone else prepared --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["checkpoints", "best", "last"])
def test_open_run_refuses_linked_run_folders(run, tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run.root.mkdir()
    (run.root / name).symlink_to(elsewhere)
    with pytest.raises(UserError, match=rf"{run.root / name} is a symbolic link \(to {elsewhere}\).*Replace the "
                                        "link by a folder") as info:
        open_run(OneProcess(), run, make_recipe(tmp_path))
    one_line(info.value)
    RunLock.acquire(run).release()  # a refusal leaves the directory unlocked


@pytest.mark.parametrize("victim_kind", ["folder", "file"])
def test_links_at_checkpoint_names_are_replaced_never_followed(run, tmp_path, victim_kind):
    trainer = Trainer(run, make_recipe(tmp_path, "run.keep_checkpoints=1"))
    trainer.epoch(1)
    victim = tmp_path / "victim"
    if victim_kind == "folder":
        victim.mkdir()
        (victim / "precious").write_text("mine")
    else:
        victim.write_text("mine")
    before = sorted(p.name for p in victim.iterdir()) if victim.is_dir() else victim.read_text()
    for name in (".partial_epoch_0002", "epoch_0002", "epoch_0000"):  # being written, replaced, older (rotated)
        (run.checkpoints / name).symlink_to(victim)
    assert latest_checkpoint(run.checkpoints) == run.checkpoint(1)  # a link is no checkpoint
    trainer.epoch(2)
    assert (sorted(p.name for p in victim.iterdir()) if victim.is_dir() else victim.read_text()) == before
    assert not run.checkpoint(2).is_symlink() and not run.partial_checkpoint(2).exists()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["epoch_0000", "epoch_0002"]  # the link stays
    assert latest_checkpoint(run.checkpoints) == run.checkpoint(2)


def plant(path: Path, kind: str) -> None:
    """Replaces `path` by something a checkpoint file must not be."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "sparse":
        with open(path, "wb") as file:
            file.truncate(12 * GiB)  # no blocks on disk
    elif kind == "folder":
        path.mkdir()
    elif kind == "nested":
        path.write_bytes(nested())


# (file of the newest checkpoint, what replaces it, fragment of the one-line warning)
PLANTED = [
    ("model.safetensors", "fifo", r"model.safetensors: not a regular file \(a FIFO\)"),
    ("model.safetensors", "device", r"model.safetensors: not a regular file \(a character device\)"),
    ("model.safetensors", "sparse", r"model.safetensors: 12,884,901,888 bytes, more than a file its manifest.json "
                                    r"lists at [\d,]+ bytes can be"),
    ("model.safetensors", "folder", r"model.safetensors: not a regular file \(a folder\)"),
    ("model.safetensors", "missing", "model.safetensors: missing, though manifest.json lists it"),
    ("manifest.json", "fifo", r"manifest.json: not a regular file \(a FIFO\)"),
    ("manifest.json", "device", r"manifest.json: not a regular file \(a character device\)"),
    ("manifest.json", "sparse", "manifest.json: 12,884,901,888 bytes, more than a checkpoint manifest can be"),
    ("manifest.json", "nested", r"manifest.json: not a manifest \(its JSON is nested too deeply to read\)"),
]


@pytest.mark.parametrize("name, kind, error", PLANTED)
def test_resume_skips_a_checkpoint_with_a_planted_file(run, tmp_path, name, kind, error):
    trainer = Trainer(run, make_recipe(tmp_path))
    trainer.epoch(1), trainer.epoch(2)
    plant(run.checkpoint(2) / name, kind)
    with pytest.raises(UserError, match=error) as info:
        CheckpointReader(run.checkpoint(2)).verify()
    one_line(info.value)
    with pytest.warns(UserWarning) as warned:
        lock, resume_from = open_run(OneProcess(), run, make_recipe(tmp_path))
    lock.release()
    assert resume_from == run.checkpoint(1)
    [warning] = warned
    assert re.search(rf"skipping checkpoint {run.checkpoint(2)}: .*{error}", one_line(warning))


# How the newest checkpoint is broken while its manifest still matches every file (or is itself inconsistent), and
# the warning's fragment. `run.resume: auto` must fall back to the previous checkpoint in each case.
BROKEN = {
    "bad-json": (lambda f: rewrite_manifest(f, **{"state.json": b'{"epoch": '}), "state.json: not valid JSON"),
    "bad-safetensors": (lambda f: rewrite_manifest(f, **{"objective.safetensors": b"\x08" + bytes(7)}),
                        "objective.safetensors: not a valid safetensors file"),
    "wrong-tree": (lambda f: rewrite_manifest(f, **{"optimizer.json": b'{"state": {"__tensor__": "t99"}}'}),
                   "optimizer.json: names a tensor that optimizer.safetensors lacks"),
    "nested-state": (lambda f: rewrite_manifest(f, **{"state.json": nested()}),
                     r"state.json: not a checkpoint file \(its JSON is nested too deeply to read\)"),
    "nested-recipe": (lambda f: rewrite_manifest(f, **{"recipe.json": nested()}), "recipe.json: not a checkpoint"),
    "nested-optimizer": (lambda f: rewrite_manifest(f, **{"optimizer.json": nested()}),
                         "optimizer.json: not a checkpoint"),
    "optimizer-not-a-tree": (lambda f: rewrite_manifest(f, **{"optimizer.json": b"[[0]]"}),
                             "optimizer.json: not a checkpoint's optimizer.json: a JSON object with state, "
                             "param_groups was expected"),
    "state-without-step": (lambda f: rewrite_manifest(f, **{"state.json": b'{"epoch": 2}'}),
                           "state.json: not a checkpoint's state.json: a JSON object with epoch, global_step"),
    "rng-not-an-object": (lambda f: rewrite_manifest(f, **{"rng_0.json": b"[]"}), "rng_0.json: not a checkpoint's"),
    "recipe-not-an-object": (lambda f: rewrite_manifest(f, **{"recipe.json": b"7"}), "recipe.json: not a checkpoint's"),
    "missing-file": (lambda f: (f / "rng_0.json").unlink(), "rng_0.json: missing, though manifest.json lists it"),
    "epoch-not-its-folder": (lambda f: edit_manifest(f, epoch=5), "manifest.json: says epoch 5, but its folder is "
                                                                  "epoch_0002: the checkpoint was renamed"),
    "unlisted-model": (lambda f: edit_manifest(f, files={k: v for k, v in json.loads(
        (f / "manifest.json").read_text())["files"].items() if k != "model.safetensors"}),
        "manifest.json: does not list model.safetensors; the checkpoint is incomplete"),
    "rng-of-a-process-unlisted": (lambda f: edit_manifest(f, num_processes=2), "does not list rng_1.json"),
    "negative-size": (lambda f: edit_manifest(f, files={"model.safetensors": {"sha256": "0" * 64, "size": -1}}),
                      "the entry for model.safetensors needs sha256 and size"),
    "epoch-not-a-number": (lambda f: edit_manifest(f, epoch=True), "not a sglr-zoo-checkpoint/1 manifest"),
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_resume_falls_back_past_a_checkpoint_that_would_not_load(run, tmp_path, how):
    breaks, error = BROKEN[how]
    trainer = Trainer(run, make_recipe(tmp_path))
    trainer.epoch(1), trainer.epoch(2)
    breaks(run.checkpoint(2))
    with pytest.warns(UserWarning) as warned:
        lock, resume_from = open_run(OneProcess(), run, make_recipe(tmp_path))
    lock.release()
    assert resume_from == run.checkpoint(1)
    [warning] = warned
    assert re.search(rf"skipping checkpoint {run.checkpoint(2)}: .*{error}", one_line(warning)), warning.message
    fresh = Trainer(run, make_recipe(tmp_path), seed=1)
    fresh.checkpointer.load(resume_from)  # the fallback loads: nothing of epoch 1 was lost
    assert fresh.state.epoch == 1 and fresh.state.global_step == 2


def test_resume_with_another_number_of_processes_is_refused(run, tmp_path):
    folder = Trainer(run, make_recipe(tmp_path)).epoch(1)
    with pytest.raises(UserError, match=r"was written with num_processes=1, and this run has 2: resume it with 1 "
                                        r"\(accelerate launch --num_processes 1\)") as info:
        resume._resume_epoch(run, make_recipe(tmp_path), processes=2)
    one_line(info.value)
    rewrite_manifest(folder, **{"rng_1.json": (folder / "rng_0.json").read_bytes()})  # as two processes write it
    edit_manifest(folder, num_processes=2)
    CheckpointReader(folder).verify()
    with pytest.raises(UserError, match="written with num_processes=2, and this run has 1: resume it with 2"):
        open_run(OneProcess(), run, make_recipe(tmp_path))
    RunLock.acquire(run).release()


@pytest.mark.parametrize("kind, error", [("fifo", r"not a regular file \(a FIFO\)"),
                                         ("device", r"not a regular file \(a character device\)"),
                                         ("folder", r"not a regular file \(a folder\)"),
                                         ("nested", "not a finished-run marker")])
def test_a_finished_marker_that_is_no_file_is_named(run, tmp_path, kind, error):
    run.root.mkdir(parents=True)
    run.finished.write_text("{}")
    plant(run.finished, kind)
    with pytest.raises(UserError, match=f"{run.finished}: {error}") as info:
        open_run(OneProcess(), run, make_recipe(tmp_path))
    one_line(info.value)


@pytest.mark.parametrize("kind", ["fifo", "file"])
def test_resume_from_something_that_is_not_a_folder(run, tmp_path, kind):
    path = tmp_path / "not-a-checkpoint"
    os.mkfifo(path) if kind == "fifo" else path.write_text("")
    with pytest.raises(UserError, match=f"run.resume: checkpoint folder {path} is not a folder; use auto, never or a "
                                        "checkpoint folder") as info:
        open_run(OneProcess(), run, make_recipe(tmp_path, f"run.resume={path}"))
    one_line(info.value)


def test_resume_from_a_folder_whose_manifest_is_a_fifo(run, tmp_path):
    other = RunDir(tmp_path / "other")
    folder = Trainer(other, make_recipe(tmp_path)).epoch(1)
    plant(folder / "manifest.json", "fifo")
    with pytest.raises(UserError, match=r"manifest.json: not a regular file \(a FIFO\)") as info:
        open_run(OneProcess(), run, make_recipe(tmp_path, f"run.resume={folder}"))
    one_line(info.value)


def test_resume_falls_back_past_a_run_state_the_run_refuses(run, tmp_path):
    """A state.json that parses and verifies (manifest recomputed) but whose history holds text: skipped like any
    other broken checkpoint, when open_run is given the run's state to check it with."""
    trainer = Trainer(run, make_recipe(tmp_path))
    trainer.epoch(1), trainer.epoch(2)
    state = json.loads((run.checkpoint(2) / "state.json").read_text())
    state["history"][0]["loss"] = ";cmd;#"
    rewrite_manifest(run.checkpoint(2), **{"state.json": json.dumps(state).encode()})
    with pytest.warns(UserWarning, match=r"state.json: not this run's state .*history row 1's loss is ';cmd;#'"):
        lock, resume_from = open_run(OneProcess(), run, make_recipe(tmp_path), RunState())
    lock.release()
    assert resume_from == run.checkpoint(1)


@pytest.mark.parametrize("killed", ["after setting aside", "after the rename"])
def test_a_save_killed_between_its_renames_loses_nothing(run, tmp_path, killed):
    """Saving epoch 2 again (after a run.max_steps stop inside it) sets the old epoch_0002 aside before the new one
    takes its name; a kill between the renames leaves both on disk, and the next open_run keeps the new one."""
    trainer = Trainer(run, make_recipe(tmp_path, "run.keep_checkpoints=1"))
    trainer.epoch(1), trainer.epoch(2)
    shutil.copytree(run.checkpoint(2), tmp_path / "old")
    new = trainer.epoch(2)  # the same epoch saved again: the old one is set aside and deleted after the rename
    assert not run.replaced_checkpoint(2).exists() and checkpoint_dirs_names(run) == ["epoch_0002"]
    saved = (new / "state.json").read_bytes()
    assert saved != (tmp_path / "old" / "state.json").read_bytes()
    (tmp_path / "old").rename(run.replaced_checkpoint(2))  # recreate what a kill leaves
    if killed == "after setting aside":
        new.rename(run.partial_checkpoint(2))
    lock, resume_from = open_run(OneProcess(), run, make_recipe(tmp_path, "run.keep_checkpoints=1"))
    lock.release()
    assert resume_from == run.checkpoint(2) and (resume_from / "state.json").read_bytes() == saved
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["epoch_0002"]


def test_a_set_aside_checkpoint_returns_when_its_successor_was_never_complete(run, tmp_path):
    trainer = Trainer(run, make_recipe(tmp_path))
    folder = trainer.epoch(1)
    folder.rename(run.replaced_checkpoint(1))
    run.partial_checkpoint(1).mkdir()  # the successor's files were being written: no manifest
    (run.partial_checkpoint(1) / "model.safetensors").write_bytes(b"half")
    lock, resume_from = open_run(OneProcess(), run, make_recipe(tmp_path))
    lock.release()
    assert resume_from == run.checkpoint(1) and not run.replaced_checkpoint(1).exists()


def checkpoint_dirs_names(run: RunDir) -> list[str]:
    return [p.name for p in run.checkpoint_dirs()]
