"""Time to robustness: our presets trained for the same wall-clock budget, then AutoAttack (issue 28, item 4).

The FastAT Benchmark's reporting format (arXiv 2604.22853: CIFAR-10, L-inf 8/255, AutoAttack, hours, seeds) for the
presets below on this machine. Every preset is a list of overrides on recipes/quickstart_cifar10.yaml (SGLR, N-FGSM,
onecycle, the trainer sizes the run to `schedule.budget` and picks its width and whether to augment); `quickstart` is
the recipe as it is, the others name their architecture and fix the augmentation. For each (preset, seed, budget) the grid runs

    sglr-zoo train recipes/quickstart_cifar10.yaml run.output_dir=OUT run.name=NAME run.seed=SEED \\
        schedule.budget=BUDGET OVERRIDES...

alone (nothing else of ours runs beside a training), measuring its wall time and peak resident memory, then

    sglr-zoo eval OUT/NAME/last --attacks clean,pgd20,autoattack --n 500 --out OUT/NAME/ttr_eval_n500.json \\
        --state-path OUT/NAME/ttr_eval_n500.autoattack_state.json --dataset DATASET

(AutoAttack standard on the first 500 test images; --eval-jobs of them at a time, once every training is done).
NAME is PRESET-sSEED, with -BUDGET added for a budget other than the recipe's, -avx2 for trainings limited to AVX2
kernels (--emulate-avx2: an AVX2-only CPU emulated on this one, as in benchmarks/RESULTS.md) and -tN for trainings on
N threads (--threads; limited to AVX2, one Zen 4 thread stands for an older 2-core AVX2-only CPU). The grid runs in
priority order, seed 0 of every preset before seed 1, so a partial grid is informative. It resumes: a finished training
(RUN/finished.json) is not rerun (an unfinished one is moved to OUT/.killed/ and trained afresh, as its wall time
would be wrong), a finished evaluation is not redone, a killed one resumes from its AutoAttack state file. The
record (--record) is rebuilt from the run directories after every step; --report reads only the record.

The grid at 9 minutes, two seeds: 12 trainings one at a time (about 1 h 50 min), then 12 evaluations two at a time
on one thread each (AutoAttack on 500 images took 22 min on one thread for a 1.2M-parameter model, benchmarks/
RESULTS.md: about 2 h more); then the table for benchmarks/RESULTS.md and the plot. From the repository root:

    SGLR_ZOO_DATA=../shared/datasets python benchmarks/time_to_robustness.py --seeds 0 1 --budget 9m
    python benchmarks/time_to_robustness.py --report
    python benchmarks/time_to_robustness.py --dry-run --presets sglr-fgsmrs sglr-nfgsm   # the commands only
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart_cifar10.yaml"
SCHEMA = "sglr_zoo.time_to_robustness/1"
ATTACKS = "clean,pgd20,autoattack"
TRAIN_FILE = "ttr_train.json"  # this script's measurement of a training, in its run directory

NFGSM = ["attack.step_size=8/255", "attack.noise=2", "attack.project=false"]  # de Jorge et al. 2022
PGD2 = ["attack.steps=2", "attack.step_size=10/255", "attack.noise=1", "attack.project=true"]  # the guard's fallback
FGSM_RS = ["attack.step_size=10/255", "attack.noise=1", "attack.project=true"]  # Wong et al. 2020: the quickstart before
# The presets fix the average too (the quickstart averages from average.min_epochs planned epochs on).
AVERAGE = ["average.decay=0.999", "average.start=0.5", "average.min_epochs=0"]
AVERAGE_RECENT = ["average.decay=0.998", "average.start=0.5", "average.min_epochs=0"]  # half the lag (5,000 steps)
AVERAGE_SHORT = ["average.decay=0.993", "average.start=0.5", "average.min_epochs=0"]  # 0.998's tenth of a 9-min run
NO_AVERAGE = "average.decay=0"
QUARTER = "model.arch=preactresnet10_quarter_cifar"  # 0.31M parameters
SLIM = "model.arch=preactresnet10_slim_cifar"  # 1.23M parameters
LABEL_SMOOTHING = ["method.label_smoothing=0.4"]
SOFTER = ["method.alpha=0.7"]  # the soft share at the run's end (0.66 after 3 updates) the paper's has at its first decay
EPS_WARMUP = ["attack.warmup=0.3"]  # eps, step and noise ramp from 0 over the lr's rise (peak_at)
HALF_BATCH = ["run.batch_size=64", "optim.lr=0.1"]  # twice the updates, the same lr per image (linear scaling)
NO_AUGMENT, AUGMENT = "data.augment=false", "data.augment=true"  # the presets fix it; the quickstart's budget decides
# Priority order: the baseline, the FastAT Benchmark's winning levers on PGD-AT and on SGLR, then one lever at a time.
PRESETS: dict[str, list[str]] = {
    "sglr-fgsmrs": [QUARTER, NO_AUGMENT, NO_AVERAGE, *FGSM_RS],
    "pgdat-nfgsm-ema-ls": [QUARTER, NO_AUGMENT, "method.name=pgd_at", *LABEL_SMOOTHING, *NFGSM, *AVERAGE],
    "sglr-nfgsm-ema-ls": [QUARTER, NO_AUGMENT, *LABEL_SMOOTHING, *NFGSM, *AVERAGE],
    "sglr-nfgsm": [QUARTER, NO_AUGMENT, NO_AVERAGE, *NFGSM],
    "sglr-nfgsm-ema": [QUARTER, NO_AUGMENT, *NFGSM, *AVERAGE],
    "sglr-fgsmrs-ema": [QUARTER, NO_AUGMENT, *FGSM_RS, *AVERAGE],
    "sglr-nfgsm-ls": [QUARTER, NO_AUGMENT, NO_AVERAGE, *LABEL_SMOOTHING, *NFGSM],
    "sglr-nfgsm-slim": [SLIM, NO_AUGMENT, NO_AVERAGE, *NFGSM],  # 4x the parameters, about a third of the steps
    "sglr-nfgsm-slim-aug": [SLIM, AUGMENT, NO_AVERAGE, *NFGSM],  # crops and flips: for budgets past robust overfitting
    "sglr-nfgsm-slim-aug-ema": [SLIM, AUGMENT, *NFGSM, *AVERAGE],  # the FastAT Benchmark's averaging, with crops
    "sglr-nfgsm-slim-aug-ema998": [SLIM, AUGMENT, *NFGSM, *AVERAGE_RECENT],
    "sglr-nfgsm-slim-ema993": [SLIM, NO_AUGMENT, *NFGSM, *AVERAGE_SHORT],  # the 9-minute run (1,400 steps) averaged
    "sglr-nfgsm-slim-b64": [SLIM, NO_AUGMENT, NO_AVERAGE, *NFGSM, *HALF_BATCH],  # 4.5 % fewer images/s, 2x the steps
    "pgdat-nfgsm-slim": [SLIM, NO_AUGMENT, NO_AVERAGE, "method.name=pgd_at", *NFGSM],  # what SGLR buys at 9 minutes
    "sglr-pgd2-slim": [SLIM, NO_AUGMENT, NO_AVERAGE, *PGD2],  # a stronger attack for about 3/4 of the steps
    "sglr-nfgsm-slim-warmup": [SLIM, NO_AUGMENT, NO_AVERAGE, *NFGSM, *EPS_WARMUP],  # eps from 0 over the lr's rise
    "sglr-nfgsm-slim-lr3": [SLIM, NO_AUGMENT, NO_AVERAGE, *NFGSM, "optim.lr=0.3"],  # 1.5x the peak lr, never tuned
    "sglr-nfgsm-slim-a7": [SLIM, NO_AUGMENT, NO_AVERAGE, *NFGSM, *SOFTER],  # alpha 0.9 leaves 0.73 on the one-hot
    "quickstart": [],  # the README's command: the budget picks the width and whether to augment and to average
}


@dataclass(frozen=True)
class Job:
    """One cell of the grid: a preset trained with one seed for one budget."""

    preset: str
    seed: int
    budget: str
    name: str
    overrides: list[str]
    run: Path
    train: list[str]  # sglr-zoo arguments
    eval: list[str]
    results: Path
    state: Path
    emulate_avx2: bool = False  # the training limited to AVX2 kernels (hardware.AVX2_ONLY_ENV)
    threads: int | None = None  # the training's run.threads, when limited


def cpu_info(emulate_avx2: bool, threads: int | None = None) -> dict:
    """The CPU model, its count, whether it computes bf16 natively (AVX512-BF16, AMX), whether the training ran
    limited to AVX2 on it, and to how many threads (None: the trainer's choice)."""
    from sglr_zoo.hardware import cpu_model

    model, flags = cpu_model()
    return {"model": model, "cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "emulated_avx2": emulate_avx2, "train_threads": threads}


def plan_grid(presets: list[str], seeds: list[int], budgets: list[str], out_dir: Path, recipe: Path,
              aa_n: int, extra: list[str], emulate_avx2: bool = False, threads: int | None = None) -> list[Job]:
    """The jobs in the order they run: seed by seed, budget by budget, presets in priority order. `extra`
    overrides follow every preset's (toy runs); `emulate_avx2` limits the trainings to AVX2 kernels (NAME-avx2),
    `threads` to that many threads (NAME-tN)."""
    from sglr_zoo.recipe import load_recipe
    from sglr_zoo.schedule import parse_budget

    nominal = load_recipe(recipe).schedule.budget
    jobs = []
    for seed in seeds:
        for budget in budgets:
            for preset in presets:
                overrides = [*PRESETS[preset], *extra]
                dataset = load_recipe(recipe, overrides).data.dataset
                fixed = budget.endswith("ep")  # a fixed compute: the epochs a budget buys on an idle machine
                same = not fixed and nominal is not None and parse_budget(budget) == parse_budget(nominal)
                name = (f"{preset}-s{seed}" + ("" if same else f"-{budget}") + ("-avx2" if emulate_avx2 else "")
                        + (f"-t{threads}" if threads else ""))
                schedule = ["schedule.budget=null", f"schedule.epochs={budget[:-2]}"] if fixed else [
                    f"schedule.budget={budget}"]
                run = out_dir / name
                results = run / f"ttr_eval_n{aa_n}.json"
                state = run / f"ttr_eval_n{aa_n}.autoattack_state.json"
                train = ["train", str(recipe), f"run.output_dir={out_dir}", f"run.name={name}", f"run.seed={seed}",
                         *schedule, *overrides, *([f"run.threads={threads}"] if threads else [])]
                evaluate = ["eval", str(run / "last"), "--attacks", ATTACKS, "--n", str(aa_n), "--out", str(results),
                            "--state-path", str(state), "--dataset", dataset]
                jobs.append(Job(preset, seed, budget, name, overrides, run, train, evaluate, results, state,
                                emulate_avx2, threads))
    return jobs


def shown(args: list[str]) -> str:
    return shlex.join(["sglr-zoo", *args])


def child_env(threads: int | None = None) -> dict[str, str]:
    """This repository's sglr_zoo first on the path (a worktree beats an installed copy)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_logged(args: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, float]:
    """Runs `sglr-zoo ARGS` with its output in `log`; returns (exit status, wall seconds, peak RSS MiB of the child)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n$ {shown(args)}\n".encode())
        out.flush()
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "sglr_zoo.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                 env=env)
        try:
            _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage; ru_maxrss is KiB on Linux
        except BaseException:
            child.kill()
            child.wait()
            raise
        child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024


def failed(what: str, log: Path) -> SystemExit:
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return SystemExit(f"{what} failed; the end of {log}:\n" + "\n".join(tail))


def train(job: Job, logs: Path) -> None:
    """Trains one job unless its run finished; an unfinished run directory is set aside and trained afresh."""
    from sglr_zoo.files import write_atomic
    from sglr_zoo.hardware import AVX2_ONLY_ENV
    from sglr_zoo.rundir import RunDir, RunLock

    run = RunDir(job.run)
    if run.finished.is_file() and (job.run / TRAIN_FILE).is_file():
        return
    if run.finished.is_file():
        raise SystemExit(f"{job.run} finished without this script's measurement ({TRAIN_FILE}): move it away")
    if job.run.exists():
        RunLock.acquire(run).release()  # raises, naming the holder, when a training runs there now
        aside = job.run.parent / ".killed" / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(job.run, aside)
        print(f"  an unfinished {job.run} moved to {aside}")
    print(f"train {job.name}: {shown(job.train)}", flush=True)
    env = {**child_env(), **(AVX2_ONLY_ENV if job.emulate_avx2 else {})}
    code, wall, rss = run_logged(job.train, logs / f"{job.name}.train.log", env)
    if code or not run.finished.is_file():
        raise failed(f"training {job.name} (exit status {code})", logs / f"{job.name}.train.log")
    measured = {"wall_s": round(wall, 1), "peak_rss_mib": round(rss, 1), "command": shown(job.train),
                "cpu": cpu_info(job.emulate_avx2, job.threads), "torch": version("torch"),
                "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_atomic(job.run / TRAIN_FILE, (json.dumps(measured, indent=1) + "\n").encode())
    print(f"  {wall / 60:.1f} min, peak {rss:.0f} MiB", flush=True)


def evaluated(job: Job) -> bool:
    from sglr_zoo.errors import UserError
    from sglr_zoo.results import Results

    try:
        return "autoattack" in Results.load(job.results).robust_accuracy
    except UserError:
        return False


def evaluate(job: Job, logs: Path, threads: int | None) -> None:
    """Evaluates one trained job (resuming its AutoAttack state) unless it was evaluated."""
    if evaluated(job) or not (job.run / TRAIN_FILE).is_file():
        return
    print(f"eval {job.name}: {shown(job.eval)}", flush=True)
    code, wall, _ = run_logged(job.eval, logs / f"{job.name}.eval.log", child_env(threads))
    if code or not evaluated(job):
        raise failed(f"evaluating {job.name} (exit status {code})", logs / f"{job.name}.eval.log")
    print(f"  {job.name} evaluated in {wall / 60:.1f} min", flush=True)


def accuracies(path: Path) -> dict | None:
    """n, clean and robust accuracies, sanity of a results file, or None when there is none."""
    from sglr_zoo.results import Results

    if not path.is_file():
        return None
    results = Results.load(path)
    failures = [name for name, check in results.sanity.items() if check.passed is False]
    return {"n": results.n_examples, "clean": results.clean_accuracy, **results.robust_accuracy,
            "sanity_passed": not failures, "sanity_failed": failures, "device": results.device,
            "eval_wall_s": round(results.wall_time_s, 1)}


def collect(job: Job) -> dict | None:
    """The record of one trained job, from its run directory; None until it has trained."""
    from sglr_zoo.results import public_paths
    from sglr_zoo.rundir import RunDir

    run = RunDir(job.run)
    if not (job.run / TRAIN_FILE).is_file():
        return None
    measured = json.loads((job.run / TRAIN_FILE).read_text())
    info = json.loads(run.run_info.read_text())
    plans = json.loads(run.plans.read_text()) if run.plans.is_file() else {"plans": info.get("plans", [])}
    last_plan = plans["plans"][-1] if plans["plans"] else {}
    trainer = accuracies(run.results("last"))
    ours = accuracies(job.results)
    return public_paths({  # no local path in a record that gets committed
        "name": job.name, "preset": job.preset, "overrides": job.overrides, "seed": job.seed,
        "budget": job.budget, "run_dir": str(job.run), **measured,
        "sglr_zoo_commit": info.get("git_commit"),
        "plan": {"epochs": last_plan.get("epochs"), "steps": last_plan.get("steps"),
                 "steps_per_epoch": plans.get("steps_per_epoch"), "replans": len(plans["plans"]) - 1},
        "precision": info.get("speed", {}).get("mixed_precision", {}).get("value"),
        "threads": info.get("speed", {}).get("threads", {}).get("value"),
        "trainer_eval": trainer, "eval": ours,
        "sanity_passed": all(r is None or r["sanity_passed"] for r in (trainer, ours)),
        "guard": info.get("guard"), "weights": info.get("weights"),
    })


def write_record(jobs: list[Job], path: Path) -> None:
    """Adds or refreshes the record's entries of `jobs` (other entries stay), atomically."""
    from sglr_zoo.files import write_atomic

    runs = load_record(path)
    runs.update({entry["name"]: entry for entry in map(collect, jobs) if entry})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps({"schema": SCHEMA, "runs": runs}, indent=1) + "\n").encode())


def load_record(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA:
        raise SystemExit(f"{path}: not a record of this script (schema {data.get('schema')!r}, expected {SCHEMA!r})")
    return data["runs"]


# ---- the report ------------------------------------------------------------------------------------------------

def aggregate(runs: dict[str, dict]) -> list[dict]:
    """One row per (preset, budget, CPU) with evaluated runs, presets in priority order: seeds, per-seed and mean
    accuracies, mean wall minutes, the largest peak memory and the CPUs."""
    order = {name: i for i, name in enumerate(PRESETS)}
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for entry in sorted(runs.values(), key=lambda e: (order.get(e["preset"], len(order)), e["budget"], e["seed"])):
        if entry.get("eval") and "autoattack" in entry["eval"]:
            groups.setdefault((entry["preset"], entry["budget"], cpu_name(entry["cpu"])), []).append(entry)
    rows = []
    for (preset, budget, _), entries in groups.items():
        per_seed = {key: [e["eval"][key] for e in entries] for key in ("autoattack", "clean", "pgd20")}
        rows.append({"preset": preset, "budget": budget, "seeds": [e["seed"] for e in entries],
                     **{key: statistics.mean(values) for key, values in per_seed.items()},
                     **{f"{key}_per_seed": values for key, values in per_seed.items()},
                     "n": sorted({e["eval"]["n"] for e in entries}),
                     "wall_min": statistics.mean(e["wall_s"] for e in entries) / 60,
                     "wall_min_per_seed": [e["wall_s"] / 60 for e in entries],
                     "peak_rss_mib": max(e["peak_rss_mib"] for e in entries),
                     "sanity_passed": all(e["sanity_passed"] for e in entries),
                     "cpus": sorted({cpu_name(e["cpu"]) for e in entries}),
                     "machines": sorted({machine_name(e["cpu"]) for e in entries}),
                     "emulated_avx2": entries[0]["cpu"].get("emulated_avx2", False),
                     "train_threads": entries[0]["cpu"].get("train_threads")})
    return rows


def machine_name(cpu: dict) -> str:
    """The hardware: model, CPUs and native bf16."""
    native = [name for name, flag in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")) if cpu.get(flag)]
    return f"{cpu['model']}, {cpu['cpus']} CPUs" + (f", {' + '.join(native)}" if native else ", no native bf16")


def cpu_name(cpu: dict) -> str:
    """The hardware and how a run used it: emulated AVX2-only, training threads."""
    name = machine_name(cpu)
    name = f"emulated AVX2-only on {name}" if cpu.get("emulated_avx2") else name
    threads = cpu.get("train_threads")
    return f"{name}, training on {threads} thread{'s' * (threads > 1)}" if threads else name


def markdown(rows: list[dict]) -> str:
    """The table for benchmarks/RESULTS.md: mean (per seed) of each accuracy."""
    def cell(row: dict, key: str) -> str:
        return f"{row[key]:.1f} ({' / '.join(f'{v:.1f}' for v in row[f'{key}_per_seed'])})"

    n = sorted({k for row in rows for k in row["n"]})
    lines = [f"AutoAttack (standard), clean and PGD-20 on the first {'/'.join(map(str, n))} CIFAR-10 test images, "
             "L-inf 8/255: mean (per seed).", "",
             "| preset | budget | seeds | AutoAttack % | clean % | PGD-20 % | wall min | peak MiB | sanity | CPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['preset']} | {row['budget']} | {len(row['seeds'])} | {cell(row, 'autoattack')} | "
                     f"{cell(row, 'clean')} | {cell(row, 'pgd20')} | {row['wall_min']:.1f} | "
                     f"{row['peak_rss_mib']:.0f} | {'pass' if row['sanity_passed'] else 'FAIL'} | "
                     f"{'; '.join(row['cpus'])} |")
    return "\n".join(lines)


def _label_means(axes, rows: list[dict], gap_px: float = 13.0) -> None:
    """Names each preset's mean beside it; labels of means at about the same time are spread to at least `gap_px`
    apart vertically, with a leader line where one moved."""
    from matplotlib import colormaps

    axes.figure.canvas.draw()  # fixes the limits, so that pixels convert to data units
    bottom, top = axes.get_ylim()
    gap = gap_px * (top - bottom) / axes.get_window_extent().height
    clusters: dict[int, list[tuple[float, int]]] = {}
    for i, row in enumerate(rows):
        clusters.setdefault(round(row["wall_min"] / 3), []).append((row["autoattack"], i))
    for members in clusters.values():
        members.sort()
        placed: list[float] = []
        for y, _ in members:  # upwards, each at least `gap` above the one below
            placed.append(max(y, placed[-1] + gap) if placed else y)
        shift = max(0.0, (placed[-1] - members[-1][0]) / 2)  # then centred on the points
        for (y, i), label_y in zip(members, placed):
            row = rows[i]
            axes.annotate(row["preset"], (row["wall_min"], y), xytext=(row["wall_min"] + 1.5, label_y - shift),
                          textcoords="data", fontsize=8, color=colormaps["tab20"](i % 20), va="center",
                          arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5}
                          if abs(label_y - shift - y) > gap / 2 else None)


def plot(rows: list[dict], path: Path) -> None:
    """AutoAttack accuracy against wall-clock minutes: a dot per run, a labelled diamond per preset's mean."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8))
    axes = fig.subplots()
    for i, row in enumerate(rows):
        color = colormaps["tab20"](i % 20)
        axes.scatter(row["wall_min_per_seed"], row["autoattack_per_seed"], color=color, alpha=0.5, s=20)
        seeds = len(row["seeds"])
        threads = f", {row['train_threads']} thread" if row["train_threads"] else ""
        axes.scatter([row["wall_min"]], [row["autoattack"]], color=color, marker="D", s=50,
                     label=f"{row['preset']} ({row['budget']}{', emulated AVX2' * row['emulated_avx2']}{threads}, "
                           f"{seeds} seed{'s' * (seeds > 1)})")
    machines = sorted({machine for row in rows for machine in row["machines"]})
    n = "/".join(str(k) for k in sorted({k for row in rows for k in row["n"]}))
    axes.set(xlabel="wall clock of the training (min)", ylabel=f"AutoAttack accuracy (%, first {n} test images)",
             title="\n".join(textwrap.wrap(f"Time to robustness on {'; '.join(machines)} (emulation and threads: "
                                           "see the legend)", 100)))
    axes.title.set_fontsize(9)
    _label_means(axes, rows)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the points, never over them
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS),
                        help="run in priority order whatever the order given")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--budget", nargs="+", default=["9m"],
                        help="one or more schedule.budget values, or NNep: NN whole epochs without a budget (the "
                             "same compute for every preset, whatever else runs on the machine)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/ttr"))
    parser.add_argument("--recipe", type=Path, default=RECIPE.relative_to(REPO) if Path.cwd() == REPO else RECIPE)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides after every preset's (toy runs: data.n_train=512 data.n_test=100 ...)")
    parser.add_argument("--stage", choices=["train", "eval", "all"], default="all",
                        help="all: every training of the grid, then the evaluations")
    parser.add_argument("--eval-jobs", type=int, default=2, help="evaluations at a time (never beside a training)")
    parser.add_argument("--aa-n", type=int, default=500, help="first test images of the evaluation")
    parser.add_argument("--record", type=Path, default=Path("benchmarks/time_to_robustness.json"))
    parser.add_argument("--report", action="store_true", help="print the markdown table and write --plot; no runs")
    parser.add_argument("--plot", type=Path, default=Path("docs/time_to_robustness.png"))
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="train limited to AVX2 kernels, as on an AVX2-only CPU (bf16 emulated, so fp32); runs "
                             "are named NAME-avx2; the evaluations run unlimited")
    parser.add_argument("--threads", type=int, help="train on this many threads (run.threads; runs are named "
                        "NAME-tN); with --emulate-avx2, 1 stands for an older 2-core AVX2-only CPU (docs/speed.md)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the stage; run nothing")
    args = parser.parse_args(argv)

    if args.report:
        rows = aggregate(load_record(args.record))
        if not rows:
            raise SystemExit(f"{args.record}: no evaluated run yet")
        print(markdown(rows))
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")
        return
    presets = [name for name in PRESETS if name in args.presets]
    jobs = plan_grid(presets, args.seeds, args.budget, args.out_dir, args.recipe, args.aa_n, args.set,
                     args.emulate_avx2, args.threads)
    if args.dry_run:
        for stage in ("train", "eval"):
            if args.stage in (stage, "all"):
                print("\n".join(shown(getattr(job, stage)) for job in jobs))
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lock = (args.out_dir / ".grid.lock").open("w")
    try:  # one grid per folder at a time: a second would run a training or evaluations beside this one's
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another time_to_robustness.py runs a grid in {args.out_dir}; wait for it to end") from None
    logs = args.out_dir / "logs"
    if args.stage in ("train", "all"):
        for job in jobs:
            train(job, logs)
            write_record([job], args.record)
    if args.stage in ("eval", "all"):
        threads = max(1, (os.cpu_count() or 1) // args.eval_jobs)
        with ThreadPoolExecutor(args.eval_jobs) as pool:
            done = [pool.submit(evaluate, job, logs, threads) for job in jobs]
            for job, future in zip(jobs, done, strict=True):
                future.result()
                write_record([job], args.record)
    write_record(jobs, args.record)
    trained = sum((job.run / TRAIN_FILE).is_file() for job in jobs)
    print(f"record: {args.record} ({trained} of {len(jobs)} runs trained, {sum(map(evaluated, jobs))} evaluated)")


if __name__ == "__main__":
    main()
