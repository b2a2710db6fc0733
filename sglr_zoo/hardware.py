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
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

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
# An approximation of an AVX2-only CPU on a newer one: oneDNN, ATen and MKL use AVX2 kernels only, so bf16 is
# emulated (benchmarks/RESULTS.md, "Which environment variables emulate an AVX2-only CPU").
AVX2_ONLY_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PLAIN_DEFAULTS = {"channels_last": False, "compile": False, "keep_freed_memory": False, "cudnn_benchmark": False}

MOVED = {"ThreadClaims", "ThreadSharing", "claims_folder", "CLAIM_MAX_AGE_S"}  # to sglr_zoo.threads


def __getattr__(name: str) -> Any:
    """`hardware.ThreadClaims` and its helpers moved to sglr_zoo.threads: still found here, with a warning."""
    if name not in MOVED:
        raise AttributeError(f"module 'sglr_zoo.hardware' has no attribute {name!r}")
    from sglr_zoo import threads  # imports this module: only when asked

    warnings.warn(f"sglr_zoo.hardware.{name} is deprecated: import it from sglr_zoo.threads", DeprecationWarning,
                  stacklevel=2)
    return getattr(threads, name)


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


# glibc's malloc options (mallopt) that `keep_freed_memory` sets, with glibc's defaults and the environment variables
# that replace those at start-up: what `applied` sets back.
MALLOC_OPTIONS = {"trim_threshold": (-1, 128 * 1024, "MALLOC_TRIM_THRESHOLD_"),
                  "top_pad": (-2, 128 * 1024, "MALLOC_TOP_PAD_"),
                  "mmap_threshold": (-3, 128 * 1024, "MALLOC_MMAP_THRESHOLD_")}
KEEP_FREED = {"trim_threshold": 2**31 - 1, "top_pad": 1 << 30, "mmap_threshold": 1 << 25}


def apply(settings: SpeedSettings) -> None:
    """Applies the process-wide levers for good (a script's or the CLI's choice; a run uses `applied`): CPU threads,
    the glibc malloc setting and cuDNN's algorithm search."""
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark.value
    if settings.threads.value is not None:
        torch.set_num_threads(settings.threads.value)
    if settings.keep_freed_memory.value:
        keep_freed_memory()


@contextlib.contextmanager
def applied(settings: SpeedSettings) -> Iterator[None]:
    """Applies the process-wide levers for the duration of a `with` block, a run: CPU threads, cuDNN's algorithm
    search and the glibc malloc setting; restores the thread count and the cuDNN flag after it, returned or raised,
    and sets malloc's options back to their start-up values (the environment's, else glibc's defaults) and returns
    the memory kept meanwhile (`malloc_trim`). What cannot be restored: glibc then keeps its mmap threshold fixed,
    where it had adjusted it to the program's allocations, and options set by the program itself before the run
    (glibc has no call that reads them) are replaced by the start-up values."""
    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark.value
    if settings.threads.value is not None:
        torch.set_num_threads(settings.threads.value)
    kept = settings.keep_freed_memory.value and _mallopt(KEEP_FREED)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark
        if kept:
            _mallopt({name: _start_up_value(name) for name in KEEP_FREED}, trim=True)


def keep_freed_memory() -> None:
    """glibc only: keep freed memory in the process (no trimming, mmap only above 32 MiB), for good (the CLI's
    choice; `applied` does it for one run).

    CPU training allocates and frees the same large activations every step; returning them to the OS costs
    page faults. This is what MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_/MALLOC_MMAP_THRESHOLD_ do, set at run time
    (benchmarks/RESULTS.md).
    """
    _mallopt(KEEP_FREED)


def _start_up_value(name: str) -> int:
    option, default, variable = MALLOC_OPTIONS[name]
    try:
        return int(os.environ.get(variable, default))
    except ValueError:
        return default


def _mallopt(values: dict[str, int], trim: bool = False) -> bool:
    """Sets glibc malloc options by name (MALLOC_OPTIONS), then with `trim` returns free memory to the system;
    False where there is no glibc."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    for name, value in values.items():
        libc.mallopt(MALLOC_OPTIONS[name][0], value)
    if trim:
        libc.malloc_trim(0)
    return True


def cpu_model() -> tuple[str, set[str]]:
    """This machine's CPU model name and its flags, from /proc/cpuinfo ("unknown CPU" and none elsewhere): what
    every reported number names, since the CPU changes between machines and sessions."""
    flags, model = set(), "unknown CPU"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    return model, flags


def emulating_avx2() -> bool:
    """Whether this process runs under AVX2_ONLY_ENV's oneDNN limit (an emulated AVX2-only CPU)."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2"


def machine(device: torch.device) -> str:
    """The machine a run used, in words for run.json and model cards: the GPU's name, or the CPU's model, its
    count and whether it computes bf16 natively (and whether an AVX2-only CPU was emulated on it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = cpu_model()
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    described = f"{model}, {os.cpu_count()} CPUs ({', '.join(native) if native else 'no native bf16'})"
    return f"emulated AVX2-only on {described}" if emulating_avx2() else described
