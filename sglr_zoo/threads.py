"""CPU threads shared among the sglr_zoo runs of one machine: each run claims its threads in a file (`ThreadClaims`),
and while it trains a run whose count is `auto` follows the other runs' claims and the CPUs that other programs keep
busy (`ThreadSharing`, a loop callback)."""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import stat
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sglr_zoo import hardware
from sglr_zoo.errors import UserError
from sglr_zoo.files import WriteFailed, read_regular, write_atomic
from sglr_zoo.hardware import Choice, CpuLook
from sglr_zoo.loop import Callback, StepResult
from sglr_zoo.runstate import RunState

# A thread claim not rewritten for this long does not count: its pid may belong to another process by now. A run
# rewrites its claim every third of it while it trains (`ThreadClaims.share`); in an evaluation longer than that the
# claim may lapse, and only /proc/stat still sees the run.
CLAIM_MAX_AGE_S = 1800.0


class ThreadClaims:
    """The CPU threads of the live sglr_zoo runs of this machine's user: a file per process, named by its pid and
    holding its thread count. The load average and /proc/stat see a run only once it computes; a claim is seen as
    soon as it is made, so runs launched in the same second share the CPUs instead of each taking them all
    (benchmarks/RESULTS.md, "Threads"). Runs decide one at a time (`deciding`); while training, a run whose count is
    `auto` follows the other runs' claims and the CPUs that other programs keep busy (`share`).

    The folder is `$XDG_RUNTIME_DIR/sglr_zoo-threads`, else `sglr_zoo-<uid>-threads` in the temporary folder; it is
    used only when it is a real folder of this user that no one else may enter (checked before anything in it is
    read or written; see `_private_folder_problem`), or another local user could plant links, FIFOs or counts in it.
    Otherwise, or when it cannot be made, the run warns and trains without claims. A claim counts only while its
    process lives, its count is 1 to the machine's CPUs and it was written in the last CLAIM_MAX_AGE_S (a pid may be
    reused): a run rewrites its claim well within that time (`share`); others remove the claims that do not count.
    The lock is waited for at most `lock_wait_s`, then a run decides without it."""

    def __init__(self, directory: Path | None = None, *, lock_wait_s: float = 30.0):
        self.directory = directory or claims_folder()
        self.path = self.directory / f"{os.getpid()}.threads"
        self.lock_wait_s = lock_wait_s
        self.threads: int | None = None  # this process's claim
        self.written = 0.0  # when it was last written (time.monotonic)
        self.limit: int | None = None  # an `auto` count's start value: the most `share` takes without /proc/stat
        self.most = 1  # torch's default when claimed: `share` never goes above it
        self.last_look: CpuLook | None = None
        self.next_share = 0.0
        self.usable = False  # until `deciding` has checked the folder

    @contextlib.contextmanager
    def deciding(self) -> Iterator[None]:
        """Holds the claims' lock: a run that measures the machine waits for one measuring now, then sees its claim."""
        try:
            lock = self._open_lock()
        except (OSError, UserError) as error:  # a read-only temporary folder, or another user's: no claims
            warnings.warn(f"threads: cannot claim threads in {self.directory} ({error}); other runs will not see "
                          "this one's", stacklevel=3)
            lock = None
        self.usable = lock is not None
        try:
            if lock is not None:
                self._lock(lock)
            yield
        finally:
            if lock is not None:
                os.close(lock)  # releases the lock

    def _open_lock(self) -> int:
        """The claims' lock file, once the folder is checked: never opened through a link, never truncated."""
        if (problem := _private_folder_problem(self.directory)) is not None:
            raise UserError(problem)
        path = self.directory / "lock"
        lock = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        if not stat.S_ISREG(os.fstat(lock).st_mode):
            os.close(lock)
            raise UserError(f"{path} is not a regular file")
        return lock

    def _lock(self, lock: int) -> None:
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    warnings.warn(f"threads: {self.directory / 'lock'} still held after {self.lock_wait_s:g} s; "
                                  "deciding without waiting for the run that holds it", stacklevel=4)
                    return
                time.sleep(0.05)

    def others(self) -> int:
        """The threads claimed by the other live processes; the claims that do not count (`_live_claim`) are
        removed."""
        total = 0
        for path in self.directory.glob("*.threads") if self.usable else ():
            if path == self.path:
                continue
            if (threads := _live_claim(path)) is not None:
                total += threads
            else:
                with contextlib.suppress(OSError):  # removed meanwhile, or not a file
                    path.unlink(missing_ok=True)
        return total

    def claim(self, threads: int | None, *, shared: bool) -> None:
        """Records this process's `threads` (None: a device where they do not matter). `shared`: an `auto` count,
        which `share` may change."""
        if threads is not None and self.usable:
            self.limit = threads if shared else None
            self.most, self.last_look = torch.get_num_threads(), hardware.look_at_cpus()
            self._write(threads)

    def share(self, every_s: float = 5.0) -> Choice | None:
        """At most every `every_s` seconds: rewrites this process's claim when it nears CLAIM_MAX_AGE_S, and for a
        shared claim sets torch's threads to the CPUs left free, between 1 and torch's default: free of the other
        runs' claims (seen before those runs compute) and of the CPUs that other processes kept busy since the last
        look (`other_processes_cpus`, measured while this run trains). A CPU counts as busy from half of it: beside
        this run's threads, a program that would keep a CPU busy gets 0.7 of it (benchmarks/RESULTS.md, "Threads").
        Without /proc/stat: the claims only, up to the start's count. Returns the new count and why, when it
        changed."""
        now = time.monotonic()
        if self.threads is None or not self.usable or now < self.next_share:
            return None
        self.next_share = now + every_s
        if now - self.written > CLAIM_MAX_AGE_S / 3:
            self._write(self.threads)
        if self.limit is None:
            return None
        claimed, cpus = self.others(), hardware.available_cpus()
        before, self.last_look = self.last_look, hardware.look_at_cpus()
        if before is None or self.last_look is None:
            threads = max(1, min(self.limit, cpus - claimed))
            why = f"other runs claim {claimed} of this machine's {cpus} CPUs"
        else:
            busy = hardware.other_processes_cpus(before, self.last_look)
            threads = max(1, min(self.most, cpus - max(claimed, math.floor(busy + 0.5))))
            why = (f"other runs claim {claimed} of this machine's {cpus} CPUs and other processes kept {busy:.1f} "
                   f"busy in the last {self.last_look.wall_s - before.wall_s:.0f} s")
        if threads == torch.get_num_threads():
            return None
        torch.set_num_threads(threads)
        self._write(threads)
        return Choice(threads, why)

    def release(self) -> None:
        if self.threads is not None:
            self.path.unlink(missing_ok=True)

    def _write(self, threads: int) -> None:
        try:
            write_atomic(self.path, str(threads).encode())  # others never read half a number
        except WriteFailed as error:  # a full temporary folder: train on without claims rather than fail
            warnings.warn(f"threads: {error}; other runs will not see this one's", stacklevel=3)
            self.usable, self.limit = False, None
            return
        self.threads, self.written = threads, time.monotonic()


def claims_folder() -> Path:
    """`$XDG_RUNTIME_DIR/sglr_zoo-threads` when that folder is private to this user, else `sglr_zoo-<uid>-threads`
    in the temporary folder."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    with contextlib.suppress(OSError):
        if runtime and os.path.isabs(runtime) and _private_problem(Path(runtime)) is None:
            return Path(runtime) / "sglr_zoo-threads"
    return Path(tempfile.gettempdir()) / f"sglr_zoo-{os.getuid()}-threads"


def _private_folder_problem(folder: Path) -> str | None:
    """Makes `folder` (mode 0700) and says why it cannot hold claims, or None: see `_private_problem`. A folder of
    this user's that only others could read is made 0700 (earlier versions made it 0755); a writable one is
    refused, as someone else may have planted files in it."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and info.st_mode & 0o077 and not info.st_mode & 0o022:
        folder.chmod(0o700)
    return _private_problem(folder)


def _private_problem(folder: Path) -> str | None:
    """Why `folder` is not a real folder (not a link) of this user's that no one else may enter, or None."""
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode):
        return f"a symbolic link to {os.readlink(folder)}"
    if not stat.S_ISDIR(info.st_mode):
        return "not a folder"
    if info.st_uid != os.getuid():
        return f"owned by uid {info.st_uid}, not by this user (uid {os.getuid()}); remove it or set TMPDIR"
    if info.st_mode & 0o077:
        return f"mode {stat.S_IMODE(info.st_mode):o}: other users may use it; remove it or chmod 700 it"
    return None


def _live_claim(path: Path) -> int | None:
    """The threads that the claim file `path` holds, or None when it does not count: not a small regular file, a
    count outside 1 .. this machine's CPUs, a process that has ended, or not rewritten for CLAIM_MAX_AGE_S (its
    pid may belong to another process by now)."""
    try:
        pid, threads = int(path.stem), int(read_regular(path, 32, "thread claim"))
        age = time.time() - path.lstat().st_mtime
    except (OSError, ValueError, UserError):
        return None
    if 1 <= threads <= (os.cpu_count() or 1) and age < CLAIM_MAX_AGE_S and _alive(pid):
        return threads
    return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False  # 0 and -n signal process groups
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


class ThreadSharing(Callback):
    """Shares the CPU threads with the runs that start while this one trains (`ThreadClaims.share`, every few
    seconds), saying so above the progress bar when the count changes."""

    def __init__(self, claims: ThreadClaims):
        self.claims = claims

    def on_step_end(self, state: RunState, result: StepResult) -> None:
        if (threads := self.claims.share()) is not None:
            tqdm.write(f"threads: now {threads.value}: {threads.reason}")
