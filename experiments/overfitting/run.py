"""The robust-overfitting experiment (issue 9; docs/overfitting.md): does SGLR stop robust overfitting?

    python experiments/overfitting/run.py [--stage plan|train|eval|report|all] [--methods ...] [--seeds ...]
                                          [--scale toy|full] [--out DIR]

Stages (`all` = train, eval, report):
  plan    times a few training steps of every method and the monitoring attack on this machine and prints the
          predicted wall time of the whole experiment (nothing is written);
  train   each (method, seed) is a normal `sglr-zoo train experiments/overfitting/METHOD.yaml` run in
          OUT/METHOD_sSEED, seed by seed; a finished run (RunDir.finished) is skipped, a killed one resumes from its
          last epoch checkpoint (`run.resume: auto`). The trainer itself ends each run with the evaluator's clean
          and PGD-20 accuracy of best/ and last/ on the first eval.final_n test images (results.json beside each);
  eval    through the evaluator only (`sglr_zoo.evaluate.evaluate_model`): any best/ or last/ results.json that is
          missing or is not clean + PGD-20 on the first eval.final_n test images is (re)measured, then AutoAttack
          (standard) on the first 500 test images for each method's final model of the first seed, into
          last/results_autoattack.json, its progress in a state file so that a killed evaluation resumes;
  report  experiments/overfitting/report.py: table, claim check and figure from those results files and the
          runs' metrics.csv, into OUT/report.md (and docs/overfitting.md at full scale); the variant recipes'
          runs that were started are listed after the methods.

Rerun the same command after a kill: finished steps are skipped. `--scale toy` runs everything in seconds on a tiny
model and a few images (the plumbing only; its numbers mean nothing). Data: uoft-cs/cifar10 from $SGLR_ZOO_DATA,
by default ../shared/datasets beside the repository.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))  # report.py, beside this file

import torch  # noqa: E402
from report import METHODS, SEEDS, Experiment, recipe_names, write_report  # noqa: E402

from sglr_zoo import zoo  # noqa: E402
from sglr_zoo.data import DATA_ENV  # noqa: E402
from sglr_zoo.errors import UserError  # noqa: E402
from sglr_zoo.evaluate import evaluate_model  # noqa: E402
from sglr_zoo.recipe import Recipe, load_recipe  # noqa: E402
from sglr_zoo.results import Results  # noqa: E402
from sglr_zoo.rundir import EXPORTS  # noqa: E402

STAGES = ("plan", "train", "eval", "report", "all")


@dataclass(frozen=True)
class Scale:
    """What differs between the real experiment and its toy version."""

    overrides: tuple[str, ...]  # recipe overrides on top of experiments/overfitting/METHOD.yaml
    autoattack_n: int  # AutoAttack on the first n test images
    autoattack_attacks: tuple[str, ...]  # AutoAttack's sub-attacks (version custom); () = the standard version
    out: Path  # default output folder
    doc: Path | None  # default document whose marked section the report replaces


SCALES = {
    "full": Scale((), 500, (), Path("runs/overfitting"), REPO / "docs" / "overfitting.md"),
    # A tiny model on a few images for 3 epochs, fp32 (no bf16 probe), AutoAttack's APGD-CE only: seconds per run.
    "toy": Scale(("model.arch=preactresnet_tiny_cifar", "data.n_train=48", "data.val_size=16", "data.n_test=16",
                  "attack.steps=1", "schedule.epochs=3", "schedule.milestones=[2,3]", "eval.n=8", "eval.steps=2",
                  "eval.every=1", "eval.batch_size=16", "eval.final_n=16", "run.batch_size=16",
                  "run.mixed_precision=no"),
                 8, ("apgd-ce",),
                 Path("runs/overfitting_toy"), None),
}


def machine() -> str:
    """The CPU model, its core count and its bf16 hardware (or the GPU): where the timings come from."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model, flags = platform.processor() or "unknown CPU", set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    native = [name for name in ("amx_bf16", "avx512_bf16") if name in flags] or ["no native bf16"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores, {'avx2' if 'avx2' in flags else 'no avx2'}, {', '.join(native)}"


class Driver:
    """Runs the stages for the chosen methods and seeds; every step skips what is done and adds its wall time to
    OUT/timings.json."""

    def __init__(self, out: Path, scale: Scale, methods: list[str], seeds: list[int], doc: Path | None):
        self.experiment, self.scale, self.methods, self.seeds, self.doc = Experiment(out), scale, methods, seeds, doc
        self.failed: list[str] = []

    def recipe_args(self, method: str, seed: int) -> list[str]:
        """The `sglr-zoo train` arguments of one run: its recipe and the overrides."""
        run = self.experiment.run(method, seed)
        return [str(HERE / f"{method}.yaml"), f"run.output_dir={run.root.parent}", f"run.name={run.root.name}",
                f"run.seed={seed}", *self.scale.overrides]

    def recipe(self, method: str, seed: int) -> Recipe:
        recipe_file, *overrides = self.recipe_args(method, seed)
        return load_recipe(recipe_file, overrides)

    def timed(self, key: str, step) -> None:
        """Runs `step()`; records its wall time under `key` (a resumed step adds up), also when a kill unwinds it
        (Ctrl-C, SIGTERM; a SIGKILL records nothing). A user error (a diverged run, a bad recipe) is reported and
        the other steps go on."""
        started = time.time()
        try:
            step()
        except UserError as error:
            print(f"{key}: error: {error}", flush=True)
            self.failed.append(key)
        finally:
            timings = {"steps": {}, "machines": []}
            if self.experiment.timings.is_file():
                timings = json.loads(self.experiment.timings.read_text())
            timings["steps"][key] = timings["steps"].get(key, 0.0) + time.time() - started
            timings["machines"] = sorted({*timings["machines"], machine()})
            self.experiment.timings.parent.mkdir(parents=True, exist_ok=True)
            self.experiment.timings.write_text(json.dumps(timings, indent=2) + "\n")

    def train(self) -> None:
        from sglr_zoo.training import train

        for seed in self.seeds:  # seed by seed: a partial experiment compares methods on the same seeds
            for method in self.methods:
                run = self.experiment.run(method, seed)
                if run.finished.is_file():
                    print(f"{run.root}: finished, skipped", flush=True)
                    continue
                command = shlex.join(["sglr-zoo", "train", *self.recipe_args(method, seed)])
                print(f"\n$ {command}", flush=True)
                self.timed(f"train/{run.root.name}", lambda: train(self.recipe(method, seed), command=command))

    def evaluate(self, model: Path, recipe: Recipe, path: Path, n: int, attacks: list[str],
                 state_path: Path | None = None) -> None:
        """The evaluator on the first n test images of the recipe's dataset; its results object saved to `path`.
        The results record the `sglr-zoo eval` command that measures the same."""
        aa_attacks = list(self.scale.autoattack_attacks) if "autoattack" in attacks else []
        options = dict(threat=recipe.attack.threat, eps=str(recipe.attack.eps), batch_size=recipe.eval.batch_size,
                       seed=recipe.run.seed, autoattack_version="custom" if aa_attacks else "standard",
                       autoattack_attacks=aa_attacks or None, state_path=state_path)
        command = ["sglr-zoo", "eval", str(model), "--dataset", recipe.data.dataset, "--split", recipe.data.test_split,
                   "--n", str(n), "--attacks", ",".join(attacks), "--threat", recipe.attack.threat, "--eps",
                   options["eps"], "--batch-size", str(recipe.eval.batch_size), "--seed", str(recipe.run.seed)]
        if aa_attacks:
            command += ["--autoattack-version", "custom", "--autoattack-attacks", ",".join(aa_attacks)]
        if state_path is not None:
            command += ["--state-path", str(state_path)]
        command += ["--out", str(path)]
        print(f"\n$ {shlex.join(command)}", flush=True)
        results = evaluate_model(f"local-dir:{model}", dataset=recipe.data.dataset, split=recipe.data.test_split,
                                 n=n, attacks=attacks, command=shlex.join(command), progress=True, **options)
        results.save(path)
        print(results.summary(), flush=True)

    def eval(self) -> None:
        for seed in self.seeds:
            for method in self.methods:
                run, recipe = self.experiment.run(method, seed), self.recipe(method, seed)
                if not run.finished.is_file():
                    print(f"{run.root}: not trained yet, not evaluated", flush=True)
                    continue
                for which in EXPORTS:
                    if run.export(which).is_dir() and not measured(run.results(which), recipe):
                        self.timed(f"eval/{run.root.name}/{which}", lambda: self.evaluate(
                            run.export(which), recipe, run.results(which), recipe.eval.final_n, ["clean", "pgd20"]))
        seed = self.seeds[0]
        for method in self.methods:
            run, recipe = self.experiment.run(method, seed), self.recipe(method, seed)
            path = self.experiment.autoattack_results(method, seed)
            if path.is_file() or not run.finished.is_file():
                print(f"{path}: {'exists' if path.is_file() else 'not trained yet'}, skipped", flush=True)
                continue
            # PGD-20 on the same images costs little more and lets the evaluator check that AutoAttack <= PGD.
            self.timed(f"autoattack/{run.root.name}", lambda: self.evaluate(
                run.export("last"), recipe, path, self.scale.autoattack_n, ["clean", "pgd20", "autoattack"],
                state_path=self.experiment.autoattack_state(method, seed)))

    def report(self) -> None:
        variants = [name for name in recipe_names() if name not in METHODS and name not in self.methods]
        print(write_report(self.experiment.out, [*self.methods, *variants], self.seeds, self.doc))
        print(f"wrote {self.experiment.report}" + (f" and the results section of {self.doc}" if self.doc else ""))


def measured(path: Path, recipe: Recipe) -> bool:
    """True when `path` holds the evaluator's clean and PGD-20 accuracy on the first eval.final_n test images."""
    if not path.is_file():
        return False
    results = Results.load(path)
    return (results.n_examples == recipe.eval.final_n and "pgd20" in results.robust_accuracy
            and results.provenance.split == recipe.data.test_split and results.eps == str(recipe.attack.eps)
            and results.threat == recipe.attack.threat)


# Assumptions of the plan stage's prediction (docs/overfitting.md states them with the numbers):
ATTACKED = 0.7  # share of monitored / evaluated images that are clean-correct: attacks run on those only
TWO_CORE_SPEEDUP = 1.8  # two threads on a dedicated 2-core machine against one thread's CPU time


@dataclass
class Cost:
    """Seconds per unit of work, measured: wall on this machine as it is now, and CPU time of this process."""

    wall: float
    cpu: float


def _time(step) -> Cost:
    clock, cpu = time.perf_counter(), time.process_time()
    step()
    return Cost(time.perf_counter() - clock, time.process_time() - cpu)


def plan(driver: Driver) -> str:
    """Times a few training steps of each method (the trainer's own `loop.train_step`, at the recipe's resolved
    precision) and the evaluator's PGD per image and step (fp32) on this machine, and predicts the experiment's
    wall time. AutoAttack is predicted from the quickstart model's committed results (the same architecture): its
    AutoAttack took `ratio` times its PGD-20 on the same 500 images."""
    from accelerate import Accelerator

    import sglr_zoo.training as training
    from sglr_zoo import finetune, hardware
    from sglr_zoo.attacks import pgd
    from sglr_zoo.data import IndexedDataset, load_splits, to_float
    from sglr_zoo.loop import StepParts, train_step
    from sglr_zoo.objectives import build_objective

    timed_steps = 3
    lines = [f"machine: {machine()}; load average {' '.join(f'{load:.1f}' for load in os.getloadavg())}"]
    recipes = {method: driver.recipe(method, driver.seeds[0]) for method in driver.methods}
    recipe = recipes[driver.methods[0]]
    splits = load_splits(recipe.data)
    speed = hardware.resolve(recipe.run, torch.device("cpu"))
    hardware.apply(speed)
    accelerator = Accelerator(mixed_precision=speed.mixed_precision.value, cpu=True)
    memory_format = torch.channels_last if speed.channels_last.value else torch.contiguous_format
    per_image: dict[str, Cost] = {}
    for method, recipe in recipes.items():
        model = finetune.build_model(recipe, splits.num_classes, splits.train.class_names).to(
            memory_format=memory_format)
        objective = build_objective(recipe.method, labels=splits.train.labels, num_classes=splits.num_classes,
                                    start_epoch=1, model=model)  # refined labels from the start: the costlier step
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.optim.lr, momentum=recipe.optim.momentum)
        loader = torch.utils.data.DataLoader(IndexedDataset(splits.train), batch_size=recipe.run.batch_size,
                                             shuffle=True)
        parts = StepParts(model, model, objective, optimizer, accelerator, recipe, memory_format)
        batches = itertools.cycle(loader)  # a toy scale's data has fewer batches than the steps timed
        finetune.set_train_mode(model)
        for steps in (1, timed_steps):  # a warm-up step, then the timed ones
            cost = _time(lambda: [train_step(parts, *next(batches), epoch=1, lr=recipe.optim.lr)
                                  for _ in range(steps)])
        images = timed_steps * recipe.run.batch_size
        per_image[method] = Cost(cost.wall / images, cost.cpu / images)
        lines.append(f"training, {method} ({speed.mixed_precision.value}, PGD-{recipe.attack.steps}): "
                     f"{1000 * per_image[method].wall:.1f} ms wall, {1000 * per_image[method].cpu:.1f} ms CPU "
                     f"per image ({torch.get_num_threads()} threads)")
    model.eval()
    x = to_float(splits.test.images[:recipe.eval.batch_size], recipe.data.image_size)
    y = splits.test.labels[:recipe.eval.batch_size]
    pgd(model, x, y, steps=1)  # warm-up
    cost = _time(lambda: pgd(model, x, y, steps=recipe.eval.steps))
    step = Cost(cost.wall / (len(x) * recipe.eval.steps), cost.cpu / (len(x) * recipe.eval.steps))
    lines.append(f"evaluator's PGD (fp32): {1000 * step.wall:.2f} ms wall, {1000 * step.cpu:.2f} ms CPU per image "
                 "and step")
    reference = zoo.ZOO["prn10q-c10-sglr-cpu"].results  # the quickstart model: PGD-20 and AutoAttack, timed
    ratio = reference.attack_seconds["autoattack"] / reference.attack_seconds["pgd20"]

    # Units of work: training images, and attack steps on single images (monitoring, final evaluation, AutoAttack).
    work = {"training": {method: 0.0 for method in recipes}, "monitoring": 0.0, "final evaluation": 0.0,
            "AutoAttack": ratio * len(recipes) * driver.scale.autoattack_n * ATTACKED * 20}
    for method, r in recipes.items():
        seeds = len(driver.seeds)
        monitored = sum(min(r.eval.n, n) for n in (len(splits.train), r.data.val_size, len(splits.test)))
        work["training"][method] += seeds * r.schedule.epochs * len(splits.train)
        work["monitoring"] += seeds * math.ceil(r.schedule.epochs / r.eval.every) * monitored * ATTACKED * r.eval.steps
        final = r.eval.final_n * ATTACKED * 20 + training.FINAL_SANITY_PASSES  # PGD-20 and the sanity checks
        work["final evaluation"] += seeds * len(EXPORTS) * final
    lines.append(f"assumed: {ATTACKED:.0%} of monitored / evaluated images clean-correct; AutoAttack = {ratio:.0f}x "
                 "PGD-20 on the same images (the bundled quickstart model's results.json); a dedicated 2-core machine "
                 f"runs {TWO_CORE_SPEEDUP}x one thread's CPU time")
    lines.append("| part | this machine now (wall) | dedicated 2-core machine |")
    lines.append("|---|---|---|")
    totals = [0.0, 0.0]
    for part, units in work.items():
        if part == "training":
            hours = [sum(n * getattr(per_image[m], kind) for m, n in units.items()) / 3600 for kind in ("wall", "cpu")]
        else:
            hours = [units * step.wall / 3600, units * step.cpu / 3600]
        hours[1] /= TWO_CORE_SPEEDUP
        totals = [t + h for t, h in zip(totals, hours)]
        lines.append(f"| {part} | {hours[0]:.2f} h | {hours[1]:.2f} h |")
    runs = f"{len(recipes)} methods x {len(driver.seeds)} seeds"
    lines.append(f"| total, {runs} | {totals[0]:.2f} h | {totals[1]:.2f} h |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=STAGES, default="all")
    parser.add_argument("--methods", nargs="+", choices=recipe_names(), default=list(METHODS),
                        help="method recipes (METHOD.yaml here; add a variant such as sglr_alpha095.yaml with "
                             "`base: sglr.yaml`)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--scale", choices=SCALES, default="full")
    parser.add_argument("--out", type=Path, help="where the runs go (default runs/overfitting, toy: "
                                                 "runs/overfitting_toy)")
    parser.add_argument("--doc", type=Path, help="the Markdown file whose marked section gets the report "
                                                 "(default docs/overfitting.md, toy: none)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so that the time spent so far is recorded
    scale = SCALES[args.scale]
    os.environ.setdefault(DATA_ENV, str(REPO.parent / "shared" / "datasets"))
    driver = Driver((args.out or scale.out).resolve(), scale, args.methods, args.seeds, args.doc or scale.doc)
    try:
        if args.stage == "plan":
            print(plan(driver))
            return
        for stage in ("train", "eval", "report"):
            if args.stage in (stage, "all"):
                getattr(driver, stage)()
    except UserError as error:
        sys.exit(f"run.py: error: {error}")
    if driver.failed:
        sys.exit(f"run.py: these steps failed (messages above); rerun to retry them: {', '.join(driver.failed)}")


if __name__ == "__main__":
    main()
