"""The machine-dependent speed choices, made at run time: precision, channels_last, torch.compile, threads, malloc,
cuDNN's algorithm search.

Every lever is `auto` by default and resolves from what the device is to the setting that benchmarks/RESULTS.md
measured fastest on that kind of device; an explicit recipe value wins. bf16 is chosen only where the device
computes it natively: on a CPU that means AMX or AVX512-BF16, confirmed by a timed probe of well under a second,
because an AVX2-only CPU emulates bf16 about 100x slower than fp32 (issue 8).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import math
import os
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sglr_zoo.errors import UserError
from sglr_zoo.files import WriteFailed, read_regular, write_atomic
from sglr_zoo.recipe import RunConfig

# bf16 must beat fp32 by this factor in the probe to be chosen: a margin for timing noise on a shared machine.
BF16_MIN_SPEEDUP = 1.2
# What `auto` means per device kind, with the measurement behind it (benchmarks/RESULTS.md, 2-core CPUs); kinds not
# listed keep the plain path until benchmarks/gpu_check.py has measured them.
MEASURED_DEFAULTS = {
    "cpu": {
        "channels_last": (True, "measured 1.2x (fp32) to 1.9x (bf16) the training images/s"),
        "compile": (False, "measured 1.0-1.17x the eager step (median, paired in one process) once compiled, "
                           "after up to minutes of compiling: set it true for runs of hours"),
        "keep_freed_memory": (True, "glibc keeps freed memory: fewer page faults"),
        "cudnn_benchmark": (False, "a cuDNN setting: no effect on a CPU"),
    },
    "cuda": {
        "channels_last": (True, "measured 1.11x (WRN-34-10) and 1.18x (PreActResNet-18) the bf16 training images/s "
                                "on an H100"),
        "compile": (False, "measured 1.08x the channels_last images/s on PreActResNet-18 (H100) after 40 s of "
                           "compiling; not measured on WRN-34-10: set it true for runs of hours"),
        "keep_freed_memory": (False, "a CPU allocator setting; the CUDA caching allocator keeps memory already"),
        "cudnn_benchmark": (False, "not measured yet: plain path"),
    },
}
PLAIN_DEFAULTS = {"channels_last": False, "compile": False, "keep_freed_memory": False, "cudnn_benchmark": False}
# A thread claim not rewritten for this long does not count: its pid may belong to another process by now. A run
# rewrites its claim every third of it while it trains (`ThreadClaims.share`); in an evaluation longer than that the
# claim may lapse, and only /proc/stat still sees the run.
CLAIM_MAX_AGE_S = 1800.0


@dataclass(frozen=True)
class Choice:
    """A resolved setting and why it was chosen."""

    value: Any
    reason: str


@dataclass(frozen=True)
class SpeedSettings:
    """The resolved speed levers of a run, each with its reason (printed at start and recorded in run.json)."""

    mixed_precision: Choice  # accelerate's "no" | "bf16" | "fp16"
    channels_last: Choice
    compile: Choice
    threads: Choice  # int, or None on devices where the CPU thread count does not matter
    keep_freed_memory: Choice
    cudnn_benchmark: Choice  # torch.backends.cudnn.benchmark: time the convolution algorithms once per input shape

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(choice) for name, choice in self.__dict__.items()}

    def describe(self) -> str:
        """One line per lever: `name: value (reason)`."""
        return "\n".join(f"{name}: {choice.value} ({choice.reason})" for name, choice in self.__dict__.items())


def probe_bf16_speedup(device: torch.device, repeats: int = 3) -> float:
    """fp32 time / bf16 time of a small matmul and 3x3 convolution on `device` (best of `repeats`): above 1, bf16
    is faster. About 0.05 s where bf16 is native and 0.5 s where it is emulated (about 1 GFLOP/s).

    On a CPU it runs on one thread: on a shared machine a multi-threaded op waits for its slowest thread, and the
    ratio of the instruction sets is what is asked, not the machine's load.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(256, 256, generator=generator)
    x = torch.randn(8, 64, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, generator=generator).contiguous(memory_format=torch.channels_last)

    def best_seconds(dtype: torch.dtype) -> float:
        a_, x_, w_ = (t.to(device, dtype) for t in (a, x, w))
        total = 0.0
        for op in (lambda: a_ @ a_, lambda: F.conv2d(x_, w_, padding=1)):
            times = []
            for _ in range(repeats + 1):  # the first call selects and compiles kernels
                started = time.perf_counter()
                op()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - started)
            total += min(times[1:])
        return total

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return best_seconds(torch.float32) / best_seconds(torch.bfloat16)
    finally:
        torch.set_num_threads(threads)


def cpu_bf16_hardware(capabilities: Mapping[str, Any], onednn_bf16: bool) -> str | None:
    """The CPU feature that computes bf16 natively ("AMX-BF16" or "AVX512-BF16"), or None.

    `onednn_bf16` is oneDNN's own answer, which also honours ONEDNN_MAX_CPU_ISA limits.
    """
    if not onednn_bf16:
        return None
    if capabilities.get("amx_bf16"):
        return "AMX-BF16"
    if capabilities.get("avx512_bf16"):
        return "AVX512-BF16"
    return None


def choose_precision(requested: str, device_type: str, *, cpu_hardware: str | None = None,
                     cuda_capability: tuple[int, int] | None = None,
                     probe: Callable[[], float] = lambda: 1.0) -> Choice:
    """The mixed precision for accelerate ("no", "bf16", "fp16") from the recipe's `run.mixed_precision`.

    `cpu_hardware` is `cpu_bf16_hardware(...)`, `cuda_capability` the GPU's compute capability and `probe` returns
    the bf16 speedup over fp32 on the device (`probe_bf16_speedup`); they are arguments so tests can inject them.
    An explicit bf16 on a device that only emulates it warns with the measured slowdown.
    """
    if requested == "auto":
        if device_type == "cuda" and cuda_capability is not None:
            major, minor = cuda_capability
            if major >= 8:
                return Choice("bf16", f"auto: compute capability {major}.{minor} >= 8.0 computes bf16 natively")
            return Choice("fp16", f"auto: compute capability {major}.{minor} < 8.0 has no native bf16; "
                                  "fp16 with loss scaling")
        if device_type == "cpu":
            if cpu_hardware is None:
                return Choice("no", "auto: this CPU has neither AMX-BF16 nor AVX512-BF16, so bf16 would be emulated")
            speedup = probe()
            if speedup >= BF16_MIN_SPEEDUP:
                return Choice("bf16", f"auto: {cpu_hardware}; probe: bf16 {speedup:.1f}x faster than fp32")
            return Choice("no", f"auto: {cpu_hardware}, but the probe found bf16 only {speedup:.2f}x as fast as fp32")
        return Choice("no", f"auto: no native-bf16 rule for device type {device_type!r}")
    if requested == "bf16":
        native = (device_type == "cpu" and cpu_hardware is not None) or (
            device_type == "cuda" and cuda_capability is not None and cuda_capability[0] >= 8)
        if not native and device_type in ("cpu", "cuda"):
            slowdown = 1 / probe()
            warnings.warn(f"run.mixed_precision: bf16 on a {device_type} that only emulates it: the probe measured "
                          f"bf16 {slowdown:.1f}x slower than fp32; use auto (picks fp32 here) or no", stacklevel=2)
            return Choice("bf16", f"set in the recipe; emulated here, {slowdown:.1f}x slower than fp32 in the probe")
    return Choice(requested, "set in the recipe")


def _measured(key: str, device_type: str) -> Choice:
    if device_type in MEASURED_DEFAULTS:
        value, why = MEASURED_DEFAULTS[device_type][key]
        return Choice(value, f"auto on {device_type}: {why}")
    return Choice(PLAIN_DEFAULTS[key], f"auto: not measured on {device_type} yet; plain path")


def busy_cpus() -> float:
    """How many CPUs other programs keep busy now: the CPUs busy over half a second (`recent_busy_cpus`), or, without
    Linux's /proc/stat, the 1-minute load average. The load average lags both ways: it misses a job started a moment
    ago, and for a minute or more it still counts one that has ended (benchmarks/RESULTS.md, "Threads")."""
    try:
        return recent_busy_cpus()
    except (OSError, ValueError):  # no /proc/stat: not Linux
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def recent_busy_cpus(window_s: float = 0.5) -> float:
    """The CPUs that this process may use that the whole machine kept busy over the next `window_s` seconds, from
    Linux's /proc/stat (this process sleeps meanwhile)."""
    before = _cpu_times()
    time.sleep(window_s)
    return busy_fraction(before, _cpu_times()) * available_cpus()


def _cpu_times() -> list[int]:
    """The CPU time so far of the CPUs this process may use, per state (user, nice, system, idle, iowait, irq,
    softirq, steal), summed over them; the whole machine's where /proc/stat lists no CPU of them."""
    mine = {f"cpu{cpu}" for cpu in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else set()
    machine, total, found = [], [0] * 8, False
    with open("/proc/stat") as stat:
        for line in stat:
            name, *ticks = line.split()
            if name == "cpu":
                machine = [int(tick) for tick in ticks[:8]]
            elif name in mine:
                total, found = [t + int(tick) for t, tick in zip(total, ticks[:8], strict=True)], True
    return total if found else machine


def busy_fraction(before: list[int], after: list[int]) -> float:
    """The share of the machine's CPU time between two readings of /proc/stat that was not idle (idle, iowait)."""
    spent = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(spent)
    return (total - spent[3] - spent[4]) / total if total > 0 else 0.0


@dataclass(frozen=True)
class CpuLook:
    """One reading of the CPU time spent so far: by this process's CPUs (/proc/stat ticks) and by this process."""

    wall_s: float
    cpu_ticks: list[int]
    own_s: float


def look_at_cpus() -> CpuLook | None:
    """The CPU time spent so far, or None without Linux's /proc/stat."""
    try:
        return CpuLook(time.monotonic(), _cpu_times(), time.process_time())
    except (OSError, ValueError):
        return None


def other_processes_cpus(before: CpuLook, after: CpuLook) -> float:
    """The CPUs that other processes kept busy between two looks: the busy CPUs less this process's own CPU time.
    Unlike `recent_busy_cpus` it needs no idle window: it is measured while this process computes."""
    wall_s = after.wall_s - before.wall_s
    if wall_s <= 0:
        return 0.0
    busy = busy_fraction(before.cpu_ticks, after.cpu_ticks) * available_cpus()
    return max(0.0, busy - (after.own_s - before.own_s) / wall_s)


def available_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_threads(requested: int | str, device_type: str, *, cpus: int, local_processes: int,
                   omp_num_threads: str | None, torch_default: int, busy: Callable[[], float],
                   claimed: int = 0) -> Choice:
    """CPU threads per process. `auto`: OMP_NUM_THREADS if set; else the CPUs this process may use shared among the
    processes on this machine; else (one process) torch's default, one thread per physical core, less the CPUs that
    other programs keep busy (`busy()`, such as `busy_cpus`: called only then, as it takes half a second) or other
    runs have `claimed` (`ThreadClaims`: seen before they compute): on a 2-core machine shared with another job, one
    thread trains 3-4x faster than two, which wait for each other at every operation (benchmarks/RESULTS.md)."""
    if requested != "auto":
        return Choice(int(requested), "set in the recipe")
    if device_type != "cpu":
        return Choice(None, f"auto: left to torch on {device_type}")
    if omp_num_threads:
        return Choice(torch_default, f"auto: OMP_NUM_THREADS={omp_num_threads}")
    if local_processes > 1:
        return Choice(max(1, cpus // local_processes), f"auto: {cpus} CPUs shared by {local_processes} processes")
    load = max(busy(), claimed)  # a running claimant is in both
    free = max(1, min(torch_default, math.ceil(cpus - load)))  # give a thread up only for a whole busy CPU
    if free < torch_default:
        return Choice(free, f"auto: torch's default is {torch_default}, but other programs keep {load:.1f} of the "
                            f"{cpus} CPUs busy or claimed")
    return Choice(torch_default, f"auto: torch's default for one process ({load:.1f} CPUs busy)")


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
            self.most, self.last_look = torch.get_num_threads(), look_at_cpus()
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
        claimed, cpus = self.others(), available_cpus()
        before, self.last_look = self.last_look, look_at_cpus()
        if before is None or self.last_look is None:
            threads = max(1, min(self.limit, cpus - claimed))
            why = f"other runs claim {claimed} of this machine's {cpus} CPUs"
        else:
            busy = other_processes_cpus(before, self.last_look)
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


def resolve(run: RunConfig, device: torch.device, *, local_processes: int = 1, claimed: int = 0) -> SpeedSettings:
    """Resolves the recipe's `auto` speed levers for `device` (runs the bf16 probe on CPUs that may have it).
    `claimed`: the threads that other runs claim (`ThreadClaims.others`)."""
    cpu_hardware = cuda_capability = None
    if device.type == "cpu":
        cpu_hardware = cpu_bf16_hardware(torch.cpu.get_capabilities(), torch.ops.mkldnn._is_mkldnn_bf16_supported())
    elif device.type == "cuda":
        cuda_capability = torch.cuda.get_device_capability(device)
    precision = choose_precision(run.mixed_precision, device.type, cpu_hardware=cpu_hardware,
                                 cuda_capability=cuda_capability, probe=lambda: probe_bf16_speedup(device))
    levers = {}
    for key in PLAIN_DEFAULTS:
        value = getattr(run, key)
        levers[key] = _measured(key, device.type) if value == "auto" else Choice(value, "set in the recipe")
    threads = choose_threads(run.threads, device.type, cpus=available_cpus(), local_processes=local_processes,
                             omp_num_threads=os.environ.get("OMP_NUM_THREADS"), torch_default=torch.get_num_threads(),
                             busy=busy_cpus, claimed=claimed)
    return SpeedSettings(mixed_precision=precision, threads=threads, **levers)


def apply(settings: SpeedSettings) -> None:
    """Applies the process-wide levers: CPU threads, the glibc malloc setting and cuDNN's algorithm search."""
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark.value
    if settings.threads.value is not None:
        torch.set_num_threads(settings.threads.value)
    if settings.keep_freed_memory.value:
        keep_freed_memory()


def keep_freed_memory() -> None:
    """glibc only: keep freed memory in the process (no trimming, mmap only above 32 MiB).

    CPU training allocates and frees the same large activations every step; returning them to the OS costs
    page faults. This is what MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_/MALLOC_MMAP_THRESHOLD_ do, set at run time
    (benchmarks/RESULTS.md). It cannot be undone in the process, so it applies only when the option says so.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    for option, value in ((m_trim_threshold, 2**31 - 1), (m_top_pad, 1 << 30), (m_mmap_threshold, 1 << 25)):
        libc.mallopt(option, value)
