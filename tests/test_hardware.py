"""The run-time speed choices: precision decided from the device (probe and capabilities injected), the other
`auto` levers, and every speed option giving the plain path's results."""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from sglr_zoo import hardware
from sglr_zoo.attacks import pgd
from sglr_zoo.hardware import Choice, choose_precision, choose_threads, cpu_bf16_hardware, probe_bf16_speedup
from sglr_zoo.models import create_model
from sglr_zoo.recipe import RunConfig, from_dict
from sglr_zoo.threads import CLAIM_MAX_AGE_S, ThreadClaims, claims_folder
from sglr_zoo.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


def no_probe() -> float:
    raise AssertionError("the probe must not run here")


# (requested, device type, CPU bf16 hardware, CUDA capability, probe's bf16 speedup, value, fragment of the reason)
PRECISION = [
    ("auto", "cpu", "AMX-BF16", None, 3.0, "bf16", "AMX-BF16; probe: bf16 3.0x faster"),
    ("auto", "cpu", "AVX512-BF16", None, 1.5, "bf16", "AVX512-BF16"),
    ("auto", "cpu", "AMX-BF16", None, 0.9, "no", "only 0.90x as fast"),  # the probe overrules the flag
    ("auto", "cpu", None, None, None, "no", "neither AMX-BF16 nor AVX512-BF16"),  # no probe needed
    ("auto", "cuda", None, (9, 0), None, "bf16", "9.0 >= 8.0"),
    ("auto", "cuda", None, (8, 0), None, "bf16", "8.0 >= 8.0"),
    ("auto", "cuda", None, (7, 5), None, "fp16", "fp16 with loss scaling"),
    ("auto", "mps", None, None, None, "no", "no native-bf16 rule"),
    ("no", "cpu", "AMX-BF16", None, None, "no", "set in the recipe"),
    ("bf16", "cpu", "AMX-BF16", None, None, "bf16", "set in the recipe"),
    ("fp16", "cuda", None, (7, 5), None, "fp16", "set in the recipe"),
    ("bf16", "cuda", None, (9, 0), None, "bf16", "set in the recipe"),
]


@pytest.mark.parametrize("requested, device, cpu_hw, capability, speedup, value, reason", PRECISION)
def test_choose_precision(requested, device, cpu_hw, capability, speedup, value, reason):
    probe = no_probe if speedup is None else (lambda: speedup)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these warns
        choice = choose_precision(requested, device, cpu_hardware=cpu_hw, cuda_capability=capability, probe=probe)
    assert choice.value == value and reason in choice.reason, choice


@pytest.mark.parametrize("device, capability", [("cpu", None), ("cuda", (7, 0))])
def test_explicit_bf16_where_it_is_emulated_warns_with_the_slowdown(device, capability):
    with pytest.warns(UserWarning, match=r"run.mixed_precision: bf16 .* 20.0x slower than fp32"):
        choice = choose_precision("bf16", device, cpu_hardware=None, cuda_capability=capability, probe=lambda: 0.05)
    assert choice.value == "bf16" and "emulated" in choice.reason


@pytest.mark.parametrize("capabilities, onednn, expected", [
    ({"amx_bf16": True, "avx512_bf16": True}, True, "AMX-BF16"),
    ({"amx_bf16": False, "avx512_bf16": True}, True, "AVX512-BF16"),
    ({"avx2": True}, True, None),  # oneDNN can emulate bf16 on AVX2-only CPUs: not native
    ({"amx_bf16": True, "avx512_bf16": True}, False, None),  # oneDNN limited (e.g. ONEDNN_MAX_CPU_ISA=AVX2)
    ({}, False, None),
])
def test_cpu_bf16_hardware(capabilities, onednn, expected):
    assert cpu_bf16_hardware(capabilities, onednn) == expected


@pytest.mark.parametrize("requested, device, cpus, processes, omp, load, value", [
    ("auto", "cpu", 8, 1, None, 0.3, 5),  # torch's default (here 5) for one process on an idle machine
    ("auto", "cpu", 8, 1, None, 4.6, 4),  # 8 CPUs, 4 to 5 of them busy with other programs
    ("auto", "cpu", 2, 1, None, 6.0, 1),
    ("auto", "cpu", 2, 1, None, 0.6, 2),  # a CPU busy 60% of the time is not given up
    ("auto", "cpu", 8, 2, None, 0.0, 4),
    ("auto", "cpu", 2, 4, None, 0.0, 1),
    ("auto", "cpu", 8, 2, "3", 0.0, 5),  # OMP_NUM_THREADS: torch has applied it already
    ("auto", "cuda", 8, 1, None, 0.0, None),
    (6, "cpu", 8, 2, "3", 9.0, 6),
])
def test_choose_threads(requested, device, cpus, processes, omp, load, value):
    choice = choose_threads(requested, device, cpus=cpus, local_processes=processes, omp_num_threads=omp,
                            torch_default=5, busy=lambda: load)
    assert choice.value == value


@pytest.mark.parametrize("load, claimed, value", [
    (0.3, 0, 5),
    (0.3, 4, 4),  # launched together: the other run's claim is seen before its load
    (4.6, 2, 4),  # a claimant already running is in the load too: not counted twice
    (0.3, 9, 1),
])
def test_choose_threads_counts_other_runs_claims(load, claimed, value):
    choice = choose_threads("auto", "cpu", cpus=8, local_processes=1, omp_num_threads=None, torch_default=5,
                            busy=lambda: load, claimed=claimed)
    assert choice.value == value


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)


def _ended_pid() -> int:
    ended = subprocess.Popen(["true"])
    ended.wait()
    return ended.pid


def checked(folder: Path, **kwargs) -> ThreadClaims:
    """Claims in `folder` once `deciding` has checked it, as a run's are."""
    claims = ThreadClaims(folder, **kwargs)
    with claims.deciding():
        pass
    return claims


def test_thread_claims_count_live_processes_only(tmp_path):
    live = _sleeper()
    try:
        (tmp_path / f"{live.pid}.threads").write_text("2")
        (tmp_path / f"{_ended_pid()}.threads").write_text("3")
        (tmp_path / "123.partial").write_text("4")  # a claim being written
        mine = checked(tmp_path)
        mine.claim(1, shared=True)
        assert mine.others() == 2
        assert sorted(path.name for path in tmp_path.glob("*.threads")) == sorted([f"{live.pid}.threads",
                                                                                   mine.path.name])
        mine.release()
        assert not mine.path.exists()
    finally:
        live.communicate()


def test_thread_claims_where_the_folder_cannot_be_made_warn_and_claim_nothing(tmp_path):
    (tmp_path / "file").write_text("")
    claims = ThreadClaims(tmp_path / "file" / "claims")  # below a file: mkdir fails, even as root
    with pytest.warns(UserWarning, match="cannot claim threads"), claims.deciding():
        claims.claim(2, shared=True)
    assert claims.others() == 0 and claims.share(every_s=0) is None  # no claims, no sharing
    claims.release()


def _listing(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {path.name: (path.lstat().st_mode, b"" if path.is_symlink() else path.read_bytes())
            for path in folder.iterdir()}


@pytest.mark.parametrize("prepared, why", [
    ("mode 777", "mode 777: other users may use it"),
    ("mode 770", "mode 770: other users may use it"),
    ("another uid", "owned by uid"),
    ("a link", "a symbolic link to"),
])
def test_a_claims_folder_someone_else_may_have_prepared_is_refused_untouched(tmp_path, monkeypatch, prepared, why):
    """Another local user who made the folder first (or may write into it) could plant a `lock` link to a file of
    ours, a FIFO or a claim of 1000 threads: the run warns in one line, claims nothing and touches nothing there."""
    folder = tmp_path / "claims"
    real = tmp_path / "real" if prepared == "a link" else folder
    real.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (real / "lock").symlink_to(victim)
    (real / f"{_ended_pid()}.threads").write_text("1000")
    if prepared == "a link":
        folder.symlink_to(real)
    elif prepared == "another uid":
        uid = os.getuid() + 1
        monkeypatch.setattr(os, "getuid", lambda: uid)
    else:
        real.chmod(int(prepared.split()[1], 8))
    before = _listing(real), real.lstat().st_mode
    claims = ThreadClaims(folder)
    warning = f"cannot claim threads in {re.escape(str(folder))} .*{why}"
    with pytest.warns(UserWarning, match=warning) as warned, claims.deciding():
        claims.claim(2, shared=True)
        assert claims.others() == 0
    assert "\n" not in str(warned[0].message)
    claims.release()
    assert (_listing(real), real.lstat().st_mode) == before and victim.read_text() == "precious"


def test_an_own_claims_folder_that_others_may_only_read_is_made_private(tmp_path):
    folder = tmp_path / "claims"
    folder.mkdir(mode=0o700)
    folder.chmod(0o755)  # as earlier versions made it: nobody else can have written into it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        claims = checked(folder)
    assert claims.usable and folder.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("plant", ["link", "fifo"])
def test_the_claims_lock_is_never_opened_through_a_link_or_as_a_fifo(tmp_path, plant):
    folder = tmp_path / "claims"
    folder.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    if plant == "link":
        (folder / "lock").symlink_to(victim)
    else:
        os.mkfifo(folder / "lock")
    claims = ThreadClaims(folder)
    with pytest.warns(UserWarning, match="cannot claim threads"), claims.deciding():  # neither hangs nor truncates
        claims.claim(2, shared=True)
    assert victim.read_text() == "precious" and not claims.path.exists()


def test_a_held_claims_lock_is_waited_for_a_while_only(tmp_path):
    import fcntl

    folder = tmp_path / "claims"
    folder.mkdir(mode=0o700)
    holder = os.open(folder / "lock", os.O_RDONLY | os.O_CREAT)  # another run, hung while deciding
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        claims = ThreadClaims(folder, lock_wait_s=0.2)
        started = time.monotonic()
        with pytest.warns(UserWarning, match="lock still held after 0.2 s; deciding without waiting"), claims.deciding():
            claims.claim(2, shared=False)  # the claims still work
        assert time.monotonic() - started < 5 and claims.path.read_text() == "2"
    finally:
        os.close(holder)


def _plant(folder: Path, name: str, content: str) -> Path:
    path = folder / name
    if content == "fifo":
        os.mkfifo(path)
    elif content == "folder":
        path.mkdir()
    else:
        path.write_text(content)
    if content == "stale":
        path.write_text("1")
        old = time.time() - CLAIM_MAX_AGE_S - 1
        os.utime(path, (old, old))
    return path


@pytest.mark.parametrize("owner, content, counted, kept", [
    ("live", "1", 1, True),
    ("live", "1000", 0, False),  # would pin every run on the machine to one thread
    ("live", "0", 0, False),
    ("live", "-2", 0, False),
    ("live", "two", 0, False),
    ("live", "1" * 100, 0, False),  # larger than a count can be
    ("live", "fifo", 0, False),  # must not hang
    ("live", "folder", 0, True),  # cannot be removed as a file: ignored
    ("live", "stale", 0, False),  # not rewritten for CLAIM_MAX_AGE_S: its pid may be another process's by now
    ("ended", "1", 0, False),
    ("0", "1", 0, False),  # os.kill(0, ...) would signal this process group
    ("99999999999999999999", "1", 0, False),  # beyond any pid
])
def test_claims_that_do_not_count_are_ignored_and_removed(tmp_path, owner, content, counted, kept):
    live = subprocess.Popen(["sleep", "60"])
    try:
        pid = {"live": live.pid, "ended": _ended_pid()}.get(owner, owner)
        planted = _plant(tmp_path, f"{pid}.threads", content)
        assert checked(tmp_path).others() == counted
        assert os.path.lexists(planted) == kept
    finally:
        live.kill()
        live.wait()


def test_a_claim_is_rewritten_before_it_goes_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "other_processes_cpus", lambda before, after: 0.0)
    for shared in (True, False):
        mine = checked(tmp_path)
        mine.claim(1, shared=shared)
        old = time.time() - CLAIM_MAX_AGE_S / 2
        os.utime(mine.path, (old, old))
        mine.share(every_s=0)
        assert mine.path.stat().st_mtime == old  # written recently enough
        mine.written -= CLAIM_MAX_AGE_S / 2
        mine.share(every_s=0)
        assert time.time() - mine.path.stat().st_mtime < 60 and mine.path.read_text() == "1"
        mine.release()


def test_a_claim_that_cannot_be_written_warns_and_training_goes_on(tmp_path):
    mine = ThreadClaims(tmp_path)
    (mine.path / "x").mkdir(parents=True)  # a folder at the claim's name: the rename fails
    with pytest.warns(UserWarning, match=f"threads: could not write {mine.path}"), mine.deciding():
        mine.claim(2, shared=True)
    assert not mine.usable and mine.share(every_s=0) is None and mine.others() == 0


def test_the_claims_folder_is_under_xdg_runtime_dir_when_that_is_private(tmp_path, monkeypatch):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    default = Path(tempfile.gettempdir()) / f"sglr_zoo-{os.getuid()}-threads"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert claims_folder() == runtime / "sglr_zoo-threads"
    runtime.chmod(0o777)
    assert claims_folder() == default
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert claims_folder() == default
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert claims_folder() == default


CLAIMING_RUN = """
import sys, time, torch
from pathlib import Path
from sglr_zoo import hardware
from sglr_zoo.threads import ThreadClaims
from sglr_zoo.recipe import RunConfig
hardware.busy_cpus = lambda: time.sleep(0.5) or 0.0  # an idle machine, as two runs launched together each see it
hardware.available_cpus = lambda: 2
torch.set_num_threads(2)
claims = ThreadClaims(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()  # the test starts both at the same moment, once both have imported torch
with claims.deciding():
    speed = hardware.resolve(RunConfig(mixed_precision="no"), torch.device("cpu"), claimed=claims.others())
    claims.claim(speed.threads.value, shared=True)
print(speed.threads.value, flush=True)
sys.stdin.read()  # runs (and keeps its claim) until the test closes stdin
"""


@pytest.mark.slow
def test_runs_launched_together_share_the_cpus(tmp_path, monkeypatch):
    """Two runs launched in the same second see an idle 2-CPU machine: one takes both threads, the other waits for
    its claim and takes one; the first gives one up while the second lives (`share`), and takes it back after."""
    runs = [subprocess.Popen([sys.executable, "-c", CLAIMING_RUN, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert [run.stdout.readline() for run in runs] == ["ready\n"] * 2
        for run in runs:
            run.stdin.write("go\n")
        for run in runs:
            run.stdin.flush()
        assert sorted(int(run.stdout.readline()) for run in runs) == [1, 2]
        monkeypatch.setattr(hardware, "available_cpus", lambda: 2)
        monkeypatch.setattr(hardware, "other_processes_cpus", lambda before, after: 0.0)  # both runs wait on stdin
        torch.set_num_threads(2)  # this process stands for the first run, which chose 2 (the `one_thread` fixture
        first = checked(tmp_path)  # restores the count)
        first.claim(2, shared=True)
        runs[0].communicate()
        others = first.others()
        assert first.share(every_s=0).value == 1 and torch.get_num_threads() == 1 and others >= 1
        assert first.share(every_s=0) is None  # nothing changed
        runs[1].communicate()
        assert first.share(every_s=0).value == 2 and first.path.read_text() == "2"
    finally:
        for run in runs:
            run.kill()
            run.wait()


@pytest.mark.parametrize("busy, threads", [
    (0.1, 2),  # an idle machine once the other run ended: both threads
    (0.7, None),  # another program got 0.7 of a CPU beside this run: stays at one
])
def test_a_run_started_beside_another_takes_threads_back_when_it_ends(tmp_path, monkeypatch, busy, threads):
    monkeypatch.setattr(hardware, "available_cpus", lambda: 2)
    monkeypatch.setattr(hardware, "other_processes_cpus", lambda before, after: busy)
    other = _sleeper()
    try:
        (tmp_path / f"{other.pid}.threads").write_text("1")
        torch.set_num_threads(2)  # torch's default here (the `one_thread` fixture restores the count)
        mine = checked(tmp_path)
        mine.claim(1, shared=True)  # chosen beside the other run
        torch.set_num_threads(1)  # as hardware.apply sets it
        assert mine.share(every_s=0) is None
    finally:
        other.communicate()
    changed = mine.share(every_s=0)
    assert (changed and changed.value) == threads and torch.get_num_threads() == (threads or 1)
    assert mine.share(every_s=0) is None  # nothing changed since


@pytest.mark.parametrize("busy, threads", [
    (0.4, None),  # short of half a CPU: keeps both threads
    (0.7, 1),  # a busy program gets 0.7 of a CPU beside this run's two threads: one thread is faster
    (1.8, 1),  # never below one
])
def test_a_run_gives_a_thread_up_to_another_program(tmp_path, monkeypatch, busy, threads):
    monkeypatch.setattr(hardware, "available_cpus", lambda: 2)
    monkeypatch.setattr(hardware, "other_processes_cpus", lambda before, after: busy)
    torch.set_num_threads(2)  # torch's default here (the `one_thread` fixture restores the count)
    mine = checked(tmp_path)
    mine.claim(2, shared=True)
    changed = mine.share(every_s=0)
    assert (changed and changed.value) == threads and torch.get_num_threads() == (threads or 2)
    if changed:
        assert f"other processes kept {busy:.1f} busy" in changed.reason and mine.path.read_text() == "1"


def test_a_recipe_thread_count_is_never_shared(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "other_processes_cpus", lambda before, after: 1.8)
    mine = checked(tmp_path)
    mine.claim(2, shared=False)
    assert mine.share(every_s=0) is None


@pytest.mark.parametrize("busy_ticks, own_s, wall_s, others", [
    (180, 0.9, 1.0, 0.9),  # 2 CPUs 90% busy over 1 s, 0.9 CPU-s of it this process's: the rest is other programs'
    (100, 1.0, 1.0, 0.0),  # all the busy time is this process's
    (100, 1.5, 1.0, 0.0),  # never below 0 (the ticks are coarser than the process's CPU time)
    (180, 0.9, 0.0, 0.0),  # no time passed
])
def test_other_processes_cpus_is_the_busy_cpus_less_this_process(monkeypatch, busy_ticks, own_s, wall_s, others):
    """Measured while this process computes: the looks are injected, so the machine's load does not matter."""
    monkeypatch.setattr(hardware, "available_cpus", lambda: 2)
    before = hardware.CpuLook(wall_s=10.0, cpu_ticks=[0] * 8, own_s=5.0)
    after = hardware.CpuLook(wall_s=10.0 + wall_s, cpu_ticks=[busy_ticks, 0, 0, 200 - busy_ticks, 0, 0, 0, 0],
                             own_s=5.0 + own_s)
    assert hardware.other_processes_cpus(before, after) == pytest.approx(others)


def test_busy_fraction():
    # user, nice, system, idle, iowait, irq, softirq, steal: 300 ticks of 400 were busy
    assert hardware.busy_fraction([100, 0, 50, 1000, 10, 0, 0, 0], [350, 0, 100, 1090, 20, 0, 0, 0]) == pytest.approx(0.75)
    assert hardware.busy_fraction([1] * 8, [1] * 8) == 0.0


def test_busy_cpus_is_the_cpus_busy_now_not_the_load_average(monkeypatch):
    """The load average still counts, for a minute or more, a job that has ended."""
    monkeypatch.setattr(os, "getloadavg", lambda: (1.8, 1.5, 1.0))
    monkeypatch.setattr(hardware, "recent_busy_cpus", lambda: 0.1)
    assert hardware.busy_cpus() == 0.1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads Linux's /proc/stat")
def test_busy_cpus_sees_a_job_that_just_started():
    """A busy loop started a moment ago is not in the 1-minute load average yet, but the CPU time counts it. The
    one real measurement here: other load can only add to the busy CPUs, so a loaded machine passes too."""
    job = subprocess.Popen([sys.executable, "-c", "import time\nprint(flush=True)\nend = time.time() + 10\n"
                            "while time.time() < end: pass"], stdout=subprocess.PIPE)
    try:
        job.stdout.readline()  # it spins from here, however long the interpreter took to start
        assert hardware.recent_busy_cpus(window_s=1.0) >= 0.7
    finally:
        job.kill()
        job.wait()


def test_explicit_levers_win():
    run = RunConfig(mixed_precision="no", channels_last=False, compile=True, threads=1, keep_freed_memory=False,
                    cudnn_benchmark=True)
    speed = hardware.resolve(run, torch.device("cpu"))
    assert speed.to_dict() == {
        "mixed_precision": {"value": "no", "reason": "set in the recipe"},
        "channels_last": {"value": False, "reason": "set in the recipe"},
        "compile": {"value": True, "reason": "set in the recipe"},
        "threads": {"value": 1, "reason": "set in the recipe"},
        "keep_freed_memory": {"value": False, "reason": "set in the recipe"},
        "cudnn_benchmark": {"value": True, "reason": "set in the recipe"}}


def test_applied_levers_are_restored_after_the_run(monkeypatch):
    """Threads and cuDNN's flag come back as they were, also after an error; malloc's options go back to their
    start-up values (the environment's, else glibc's defaults) and the memory kept meanwhile is trimmed."""
    calls = []
    monkeypatch.setattr(hardware, "_mallopt", lambda values, trim=False: calls.append((values, trim)) or True)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "4096")
    threads = torch.get_num_threads()
    run = RunConfig(mixed_precision="no", threads=threads + 1, keep_freed_memory=True, cudnn_benchmark=True)
    with pytest.raises(KeyError), hardware.applied(hardware.resolve(run, torch.device("cpu"))):
        assert torch.get_num_threads() == threads + 1 and torch.backends.cudnn.benchmark
        raise KeyError
    assert torch.get_num_threads() == threads and not torch.backends.cudnn.benchmark
    assert calls == [(hardware.KEEP_FREED, False),
                     ({"trim_threshold": 128 * 1024, "top_pad": 4096, "mmap_threshold": 128 * 1024}, True)]
    calls.clear()
    with hardware.applied(hardware.resolve(RunConfig(mixed_precision="no", keep_freed_memory=False),
                                           torch.device("cpu"))):
        pass
    assert calls == []  # nothing set, nothing to restore


def test_apply_sets_the_levers_for_good():
    run = RunConfig(mixed_precision="no", threads=torch.get_num_threads(), keep_freed_memory=False,
                    cudnn_benchmark=True)
    try:
        hardware.apply(hardware.resolve(run, torch.device("cpu")))
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = False


def test_glibc_malloc_options_can_be_set():
    assert hardware._mallopt({"trim_threshold": 128 * 1024}, trim=True) == (sys.platform == "linux")


def test_auto_levers_on_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "probe_bf16_speedup", lambda device: 3.0)
    speed = hardware.resolve(RunConfig(), torch.device("cpu"))
    for key, (value, why) in hardware.MEASURED_DEFAULTS["cpu"].items():
        assert getattr(speed, key) == Choice(value, f"auto on cpu: {why}")
    native = cpu_bf16_hardware(torch.cpu.get_capabilities(), torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert speed.mixed_precision.value == ("bf16" if native else "no")
    assert 1 <= speed.threads.value <= torch.get_num_threads()
    assert all(name in speed.describe() for name in speed.to_dict())


def test_auto_levers_elsewhere():
    """CUDA's defaults are measured (benchmarks/RESULTS.md); a device never measured gets the plain path, and says so."""
    why = hardware.MEASURED_DEFAULTS["cuda"]["channels_last"][1]
    assert hardware._measured("channels_last", "cuda") == Choice(True, f"auto on cuda: {why}")
    for key, value in hardware.PLAIN_DEFAULTS.items():
        assert hardware._measured(key, "mps") == Choice(value, "auto: not measured on mps yet; plain path")


def test_real_probe():
    threads = torch.get_num_threads()
    speedup = probe_bf16_speedup(torch.device("cpu"))
    assert math.isfinite(speedup) and speedup > 0
    assert torch.get_num_threads() == threads  # it probes on one thread and restores the count


# ---- every speed option gives the plain path's results -----------------------------------------------------------

@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("preactresnet_tiny_cifar", 10).eval()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)


@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_frozen_parameters_attack_matches(model, batch, loss):
    x, y = batch
    results = []
    for freeze in (True, False):
        torch.manual_seed(2)
        results.append(pgd(model, x, y, steps=3, loss=loss, freeze=freeze))
    assert torch.equal(*results)


def test_frozen_parameters_are_restored(model, batch):
    x, y = batch
    model.fc.weight.requires_grad_(False)  # frozen before the attack (fine-tuning): stays frozen after it
    pgd(model, x, y, steps=1)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["fc.weight"]

    def failing_forward(images: torch.Tensor) -> torch.Tensor:
        assert not any(p.requires_grad for p in model.parameters())  # frozen while attacking
        raise RuntimeError("boom")

    model.forward = failing_forward
    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, x, y, steps=1)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["fc.weight"]


@pytest.mark.skipif(not os.environ.get("SGLR_ZOO_COMPILE_TESTS"),
                    reason="torch.compile takes 1-3 minutes on a shared 2-core CPU; set SGLR_ZOO_COMPILE_TESTS=1")
def test_compiled_attack_matches_eager(model, batch):
    """The one torch.compile test: PGD through a compiled model with frozen parameters, as the trainer runs it with
    `run.compile`, finds the eager attack's x_adv."""
    x, y = batch
    results = []
    for forward in (model, torch.compile(model)):
        torch.manual_seed(2)
        results.append(pgd(forward, x, y, steps=2, random_start=True))
    torch.testing.assert_close(*results, atol=1e-6, rtol=0)


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one state per process and refuses a second mixed-precision setting."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_weights(dataset, output_dir, *overrides: str) -> dict[str, torch.Tensor]:
    """Weights after one step (batch 16, PGD-2, SGLR with refined labels from the start) of the tiny model. One:
    PGD's signed gradient turns a last-bit difference into a whole step of another sign, so that after a few steps
    two correct runs drift apart by 1e-3 (measured: 4e-7 after one step, 1e-4 after two, 3e-3 after four)."""
    recipe = from_dict({
        "data": {"dataset": str(dataset)}, "model": {"arch": "preactresnet_tiny_cifar"}, "attack": {"steps": 2},
        "method": {"name": "sglr", "start_epoch": 1}, "schedule": {"epochs": 1, "name": "constant"},
        "optim": {"lr": 0.05},
        "eval": {"n": 8, "steps": 1, "batch_size": 8, "final_attacks": ["clean"], "final_n": 8},
        "run": {"output_dir": str(output_dir), "name": "run", "batch_size": 16, "max_steps": 1,
                "mixed_precision": "no", "channels_last": False, "threads": 1}}, list(overrides))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return load_file(train(recipe) / "last" / "model.safetensors")


# run.keep_freed_memory is left out: it changes where glibc puts memory, no arithmetic, and cannot be undone in
# the test process. run.compile: test_compiled_attack_matches_eager.
@pytest.mark.parametrize("lever", ["run.channels_last=true", "run.threads=2"])
def test_speed_levers_train_the_same_weights(tmp_path, tiny_dataset, fresh_accelerate, lever):
    plain = train_weights(tiny_dataset, tmp_path / "plain")
    fast = train_weights(tiny_dataset, tmp_path / "fast", lever)
    assert plain.keys() == fast.keys()
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


PROC_STAT = """cpu  30 0 6 60 4 0 0 0 0 0
cpu0 10 0 2 20 1 0 0 0 0 0
cpu1 20 0 4 40 3 0 0 0 0 0
intr 12345
"""


@pytest.mark.parametrize("affinity, ticks", [
    ({1}, [20, 0, 4, 40, 3, 0, 0, 0]),  # only the CPUs this process may run on
    ({0, 1}, [30, 0, 6, 60, 4, 0, 0, 0]),
    ({7}, [30, 0, 6, 60, 4, 0, 0, 0]),  # no line for its CPU: the whole machine's
])
def test_cpu_times_count_the_cpus_this_process_may_use(monkeypatch, affinity, ticks):
    monkeypatch.setattr(hardware, "open", lambda path: io.StringIO(PROC_STAT), raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity, raising=False)
    assert hardware._cpu_times() == ticks


def test_thread_claims_moved_to_threads_with_a_warning():
    with pytest.warns(DeprecationWarning, match="import it from sglr_zoo.threads"):
        assert hardware.ThreadClaims is ThreadClaims


def test_machine_says_when_an_avx2_only_cpu_is_emulated(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    native = hardware.machine(torch.device("cpu"))
    assert not hardware.emulating_avx2() and not native.startswith("emulated")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", hardware.AVX2_ONLY_ENV["ONEDNN_MAX_CPU_ISA"])
    assert hardware.emulating_avx2()
    assert hardware.machine(torch.device("cpu")) == f"emulated AVX2-only on {native}"
