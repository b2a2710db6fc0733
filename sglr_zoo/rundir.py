"""The on-disk layout of a training run: the one place that spells its paths (no torch import).

    RUN/
      recipe.yaml        the resolved recipe (fully expanded), written when the run starts and never changed
      plans.json         a budgeted run's plans (sglr_zoo.schedule.Plans): `schedule.plans: RUN/plans.json` repeats them
      run.json           provenance: versions, seed, processes, precision, checksums (local paths made
                         relative to the working directory, or their last component: results.public_paths)
      metrics.csv        one row per epoch
      curves.png         train vs test robust accuracy and the gradient norm per epoch
      checkpoints/       epoch_NNNN/ (complete), .partial_epoch_NNNN/ (being written) and .replaced_epoch_NNNN/
                         (an epoch_NNNN/ set aside while a newer one of its epoch takes the name)
      best/, last/       model exports (model.safetensors + config.json, timm's layout), their results.json and
                         autoattack_state.json (the final evaluation's progress)
      .lock              flock'ed while a process trains here; holds that process's pid and host
      finished.json      written last: the run is complete

checkpoints/, best/ and last/ must be real folders (`RunDir.refuse_links`): a run directory may have been prepared
by someone else, and a link there would send the run's writes and deletions elsewhere. A link named epoch_NNNN
inside checkpoints/ is not a checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sglr_zoo.errors import UserError
from sglr_zoo.files import WriteFailed, refuse_link

EXPORTS = ("best", "last")
CHECKPOINT_PATTERN = re.compile(r"epoch_(\d{4,})")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory; creating a RunDir touches nothing on disk."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    @property
    def run_info(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def finished(self) -> Path:
        return self.root / "finished.json"

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}"

    def partial_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f".partial_epoch_{epoch:04d}"

    def replaced_checkpoint(self, epoch: int) -> Path:
        """Where `epoch_NNNN` is set aside while a newer checkpoint of the same epoch takes its name."""
        return self.checkpoints / f".replaced_epoch_{epoch:04d}"

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first (half-written ones are never named epoch_NNNN)."""
        return checkpoint_dirs(self.checkpoints)

    def export(self, which: str) -> Path:
        """The `best/` or `last/` model folder."""
        if which not in EXPORTS:
            raise ValueError(f"which must be one of {EXPORTS}, not {which!r}")
        return self.root / which

    def results(self, which: str) -> Path:
        """The final evaluation's results next to an export's weights."""
        return ModelFolder(self.export(which)).results

    def autoattack_state(self, which: str) -> Path:
        """The final evaluation's AutoAttack progress for an export: a killed evaluation resumes from it."""
        return self.export(which) / "autoattack_state.json"

    def exports(self) -> list[str]:
        """The exports present (holding config.json), best first."""
        return [which for which in EXPORTS if ModelFolder(self.export(which)).config.is_file()]

    @classmethod
    def of_export(cls, folder: str | Path) -> tuple[RunDir, str] | None:
        """The run and "best" or "last" when `folder` is one of a run's exports (the run has run.json), else None."""
        folder = Path(folder)
        run = cls(folder.parent)
        return (run, folder.name) if folder.name in EXPORTS and run.run_info.is_file() else None

    def refuse_links(self) -> None:
        """Raises UserError naming the link when checkpoints/, best/ or last/ is a symbolic link."""
        for folder in (self.checkpoints, *map(self.export, EXPORTS)):
            refuse_link(folder)


def checkpoint_dirs(folder: Path) -> list[Path]:
    """The `epoch_NNNN` folders in a run's checkpoints/ folder, oldest first; a link is none of them (resume,
    rotation and replacing never follow one)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and CHECKPOINT_PATTERN.fullmatch(p.name)]
    return sorted(found, key=checkpoint_epoch)


def checkpoint_epoch(folder: Path) -> int:
    """The epoch in a checkpoint folder's name (`epoch_0012` -> 12)."""
    return int(CHECKPOINT_PATTERN.fullmatch(folder.name).group(1))


class RunLock:
    """One run per directory: an exclusive `flock` on RUN/.lock, held until `release()` or the process ends.

    The kernel drops a flock when its holder dies, however it dies, so the lock of a killed run is simply taken
    over. The file stays (removing it would race with the next run opening it); its content, the holder's pid and
    host, only serves the error message.
    """

    # A train() call that raised still holds its lock until its frame is collected; a new call in the same process
    # takes that lock over instead of refusing (accelerate allows one training per process at a time anyway).
    _held: ClassVar[dict[str, RunLock]] = {}

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run: RunDir) -> RunLock:
        """Locks `run` (creating its folder), or raises UserError naming the process that holds it."""
        path = run.lock
        try:
            run.root.mkdir(parents=True, exist_ok=True)
            key = os.path.realpath(path)
            if key in cls._held:
                cls._held[key].release()
            # O_NOFOLLOW: a `.lock` planted as a link to another file would be truncated below
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise WriteFailed(path, error) from error
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"{path} is not a plain file; delete it (it only serves the lock of this run directory)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"{run.root} is in use by another run ({holder}): one run per directory. Wait for it to "
                            f"end, or pick another run.name or run.output_dir") from None
        lock = cls(path, fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        except OSError as error:
            lock.release()
            raise WriteFailed(path, error) from error
        cls._held[key] = lock
        return lock

    def release(self) -> None:
        """Unlocks the directory (closing the file drops the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._held.pop(os.path.realpath(self.path), None)


def _read_holder(fd: int) -> str:
    """`pid N on host H` from a lock file, or what is known when it cannot be read (the holder may be writing it)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(holder['pid'])} on host {str(holder['host'])[:255]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


@dataclass(frozen=True)
class ModelFolder:
    """A model in timm's layout (config.json + model.safetensors) and the evaluator's results.json beside it."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def eps_sweep_plot(self) -> Path:
        """Accuracy against eps, drawn from the results' sweep when they hold one (the card shows it)."""
        return self.root / "eps_sweep.png"

    def is_model(self) -> bool:
        return self.config.is_file() and self.weights.is_file()
