"""The transfer experiment (issue 10): is a robust backbone worth fine-tuning on new classes from little data?

    SGLR_ZOO_DATA=../shared/datasets python experiments/transfer/run.py [--out runs/transfer] [--toy]

1. data: parquet subsets of CIFAR-10 ($SGLR_ZOO_DATA/cifar10): classes 0-4 (all 25,000 training and 5,000 test
   images) and classes 5-9 (the first 500 training images of each class, all 5,000 test images), labels 0-4;
2. three backbones on classes 0-4: SGLR (robust), clean, and a clean stock timm resnet18 (backbone_*.yaml);
3. on classes 5-9: robust backbone + linear probe, robust backbone + full fine-tune, clean backbone + full
   fine-tune (all adversarial: SGLR on PGD-3), and the same model from scratch with the same budget; then (issue
   30) the clean backbone with an eps warm-up and the backbone at the head's rate (and each of the two alone), the
   robust backbone with a linear probe then full fine-tuning (lp_ft; the probe in half or a fifth of the steps), the
   clean backbone the same way (a robust linear initialisation, RoLI), and a stock timm resnet18 at 64 px,
   clean-trained on classes 0-4 like our clean backbone, fine-tuned with the warm-up and with the defaults of now;
4. evaluation of every model: clean, PGD-20 and AutoAttack (standard, Linf 8/255) on the first 500 test images of
   classes 5-9; the backbones also clean and PGD-20 on their own classes;
5. OUT/table.md: the results and wall times, to paste into docs/transfer.md.

`--runs NAME ...` trains and evaluates only those runs (and the backbones they fine-tune), in the order given.
`--seeds 0 1 2` repeats every run on classes 5-9 with each seed (`NAME-sS` for seeds other than 0; the backbones
stay seed 0) and adds the mean over seeds to the table. `--no-autoattack` takes clean and PGD-20 from the trainer's
final evaluation (the same 500 images and attack) and runs no evaluation: minutes instead of an hour a model.
Every step is skipped when its output exists; a killed training run resumes from its last epoch checkpoint and a
killed AutoAttack from its state file: rerun the same command. `--toy` runs the whole pipeline in a few minutes
(tiny model, a few images, 2 epochs): it checks the plumbing, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import mean

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
EVAL_N = 500
# (folder, CIFAR-10 classes, training images per class (None: all))
DATASETS = {"c10_0to4": (range(0, 5), None), "c10_5to9_500": (range(5, 10), 500)}
TOY_DATASETS = {"c10_0to4": 40, "c10_5to9_500": 16}  # training images per class
TOY_TEST_PER_CLASS = 20
TOY_TRAIN = ["schedule.epochs=2", "attack.steps=1", "eval.n=20", "eval.steps=2", "eval.every=1", "eval.final_n=20",
             "run.batch_size=32"]
TOY_EVAL = ["--autoattack-version", "custom", "--autoattack-attacks", "apgd-ce,apgd-t"]  # no FAB-T, Square: minutes
SGLR_ZOO = [sys.executable, "-m", "sglr_zoo.cli"]  # `sglr-zoo` of this interpreter


@dataclass
class Run:
    name: str
    recipe: str
    label: str  # the table's row
    backbone: str | None = None  # run name of the backbone this one fine-tunes
    data: str = "c10_5to9_500"
    overrides: list[str] = field(default_factory=list)
    toy_arch: str = "preactresnet_tiny_cifar"  # what --toy builds instead (when the run builds a model)
    seed: int = 0

    def with_seed(self, seed: int) -> Run:
        """This run with another `run.seed`, under its own name (`NAME-sS`; seed 0 keeps the name)."""
        if seed == self.seed:
            return self
        return replace(self, name=f"{self.name}-s{seed}", overrides=[*self.overrides, f"run.seed={seed}"], seed=seed)


RUNS = [
    Run("backbone_sglr", "backbone_sglr.yaml", "robust backbone (SGLR), classes 0-4", data="c10_0to4"),
    Run("backbone_clean", "backbone_clean.yaml", "clean backbone, classes 0-4", data="c10_0to4"),
    Run("robust_linear_probe", "robust_linear_probe.yaml", "robust backbone + linear probe", backbone="backbone_sglr"),
    Run("robust_full", "robust_full.yaml", "robust backbone + adversarial full fine-tune", backbone="backbone_sglr"),
    Run("clean_full", "clean_full.yaml", "clean backbone + adversarial full fine-tune", backbone="backbone_clean"),
    Run("scratch", "scratch.yaml", "from scratch, same budget"),
    # Issue 30: the remedies for a clean backbone, LP-FT for a robust one, and a stock timm backbone.
    Run("clean_warmup", "clean_warmup.yaml", "clean backbone + eps warm-up, backbone at the head's rate",
        backbone="backbone_clean"),
    Run("clean_warmup_only", "clean_warmup_only.yaml", "clean backbone + eps warm-up, backbone at 0.1 x the head's rate",
        backbone="backbone_clean"),
    Run("clean_lr_only", "clean_lr_only.yaml", "clean backbone at the head's rate, no warm-up", backbone="backbone_clean"),
    Run("robust_lp_ft", "robust_lp_ft.yaml", "robust backbone (SGLR) + linear probe, then full fine-tune (lp_ft)",
        backbone="backbone_sglr"),
    Run("robust_lp_ft_short", "robust_lp_ft_short.yaml", "robust backbone (SGLR) + linear probe (first 20 % of the "
        "steps), then full fine-tune", backbone="backbone_sglr"),
    Run("clean_lp_ft", "clean_lp_ft.yaml", "clean backbone at the head's rate, linear probe (first 20 % of the "
        "steps), then full fine-tune", backbone="backbone_clean"),
    Run("clean_scratch_lr", "clean_scratch_lr.yaml", "clean backbone, everything at scratch's rate (0.1): the "
        "not-robust defaults", backbone="backbone_clean"),
    Run("backbone_timm", "backbone_timm.yaml", "clean timm resnet18 at 64 px, classes 0-4", data="c10_0to4",
        toy_arch="test_resnet"),
    Run("timm_clean_warmup", "timm_clean_warmup.yaml", "timm resnet18 (clean, 64 px) + eps warm-up, backbone at the "
        "head's rate", backbone="backbone_timm"),
    Run("timm_scratch_lr", "timm_scratch_lr.yaml", "timm resnet18 (clean, 64 px), everything at scratch's rate (0.1): "
        "the not-robust defaults", backbone="backbone_timm"),
]


def write_subset(source: Path, target: Path, classes: range, train_per_class: int | None,
                 test_per_class: int | None) -> None:
    """CIFAR-10 parquet -> the rows of `classes` (the first `per_class` of each, in file order), labels from 0."""
    target.mkdir(parents=True, exist_ok=True)
    names = [CIFAR10_CLASSES[c] for c in classes]
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        out = target / f"{split}-00000-of-00001.parquet"
        if out.is_file():
            continue
        table = pq.read_table(source / f"{split}-00000-of-00001.parquet")
        labels = table.column("label").to_pylist()
        seen = {c: 0 for c in classes}
        rows = []
        for i, label in enumerate(labels):
            if label in seen and (per_class is None or seen[label] < per_class):
                seen[label] += 1
                rows.append(i)
        subset = table.take(pa.array(rows))
        subset = subset.set_column(1, "label", pc.subtract(subset.column("label"), classes.start))
        features = {"img": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        schema = subset.schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        partial = out.with_suffix(".partial")
        pq.write_table(subset.cast(schema), partial)
        partial.rename(out)  # a killed write never leaves a file that looks complete


class Driver:
    def __init__(self, out: Path, toy: bool):
        self.out, self.toy = out, toy
        self.timings_path = out / "timings.json"

    @property
    def timings(self) -> dict[str, float]:
        return json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}

    def run(self, key: str, command: list[str]) -> None:
        """Runs one step, adding its wall time to OUT/timings.json (a resumed step adds up; the file is read again
        when the step ends, so drivers running other rows side by side keep each other's times)."""
        print(f"\n$ {shlex.join(command)}", flush=True)
        started = time.time()
        subprocess.run(command, check=True)
        timings = self.timings
        timings[key] = timings.get(key, 0.0) + time.time() - started
        partial = self.timings_path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(timings, indent=2) + "\n")
        partial.replace(self.timings_path)

    def data(self) -> None:
        root = Path(os.environ.get("SGLR_ZOO_DATA", HERE.parents[2] / "shared" / "datasets")) / "cifar10"
        if not (root / "train-00000-of-00001.parquet").is_file():
            sys.exit(f"CIFAR-10 parquet files not found in {root}: set SGLR_ZOO_DATA to the folder holding cifar10/")
        for name, (classes, per_class) in DATASETS.items():
            train_n = TOY_DATASETS[name] if self.toy else per_class
            write_subset(root, self.out / "data" / name, classes, train_n, TOY_TEST_PER_CLASS if self.toy else None)

    def train(self, run: Run) -> None:
        if (self.out / run.name / "finished.json").is_file():
            print(f"{run.name}: finished, skipped")
            return
        overrides = [f"data.dataset={self.out / 'data' / run.data}", f"run.output_dir={self.out}",
                     f"run.name={run.name}", *run.overrides]
        if run.backbone:
            overrides.append(f"finetune.backbone={self.out / run.backbone}")
        if self.toy:
            overrides += TOY_TRAIN + ([] if run.backbone else [f"model.arch={run.toy_arch}"])  # fine-tunes: the backbone's
        command = "finetune" if run.backbone else "train"
        self.run(f"train/{run.name}", [*SGLR_ZOO, command, str(HERE / run.recipe), *overrides])

    def evaluate(self, run: Run, data: str, attacks: str, tag: str) -> Path:
        n = 20 if self.toy else EVAL_N
        results = self.out / run.name / "last" / f"results_{tag}_n{n}.json"
        if results.is_file():
            print(f"{results}: exists, skipped")
            return results
        self.run(f"eval/{run.name}/{tag}", [
            *SGLR_ZOO, "eval", str(self.out / run.name / "last"), "--dataset", str(self.out / "data" / data),
            "--attacks", attacks, "--n", str(n), "--out", str(results),
            "--state-path", str(self.out / run.name / f"autoattack_state_{tag}_n{n}.json"),
            *(TOY_EVAL if self.toy and "autoattack" in attacks else [])])
        return results

    def table(self, results: list[tuple[Run, Path]], own: dict[str, Path]) -> str:
        def train_minutes(run: Run) -> float:
            with (self.out / run.name / "metrics.csv").open() as f:
                return sum(float(row["epoch_s"]) for row in csv.DictReader(f)) / 60

        def cell(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        lines = ["| model | seed | clean % | PGD-20 % | AutoAttack % | training, min (sum of epochs) | "
                 "evaluation, min |", "|---|---|---|---|---|---|---|"]
        by_label: dict[str, list[tuple[float, float | None, float | None]]] = {}
        for run, path in results:
            result = json.loads(path.read_text())
            robust = result["robust_accuracy"]
            row = (result["clean_accuracy"], robust.get("pgd20"), robust.get("autoattack"))
            by_label.setdefault(run.label, []).append(row)
            lines.append(f"| {run.label} | {run.seed} | {row[0]:.2f} | {cell(row[1])} | {cell(row[2])} | "
                         f"{train_minutes(run):.1f} | {result['wall_time_s'] / 60:.1f} |")
        repeated = {label: rows for label, rows in by_label.items() if len(rows) > 1}
        if repeated:
            lines += ["", "Mean over seeds (- where a seed lacks the number):", "",
                      "| model | seeds | clean % | PGD-20 % | AutoAttack % |", "|---|---|---|---|---|"]
            for label, rows in repeated.items():
                means = [None if None in column else mean(column) for column in zip(*rows)]
                lines.append(f"| {label} | {len(rows)} | " + " | ".join(cell(m) for m in means) + " |")
        n = 20 if self.toy else EVAL_N
        lines += ["", f"First {n} test images of CIFAR-10 classes 5-9 (dog, frog, horse, ship, truck), Linf 8/255."
                  + (" Toy run: AutoAttack is APGD-CE + APGD-T only; the numbers mean nothing." if self.toy else ""),
                  "", "The backbones on their own task (classes 0-4):", "",
                  "| backbone | clean % | PGD-20 % |", "|---|---|---|"]
        for name, path in own.items():
            result = json.loads(path.read_text())
            pgd20 = result["robust_accuracy"].get("pgd20")
            lines.append(f"| {name} | {result['clean_accuracy']:.2f} | {cell(pgd20)} |")
        lines += ["", f"Step wall times (s, {self.timings_path.name}): " +
                  ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items())]
        return "\n".join(lines) + "\n"


def selected(names: list[str] | None, seeds: Sequence[int] = (0,)) -> list[Run]:
    """The runs named (all when None), each preceded by the backbone it fine-tunes, in the order given; every run on
    classes 5-9 once per seed, the backbones once (seed 0)."""
    by_name = {run.name: run for run in RUNS}
    chosen: list[Run] = []
    for name in names or list(by_name):
        run = by_name[name]
        repeats = [run] if run.data == "c10_0to4" else [run.with_seed(seed) for seed in seeds]
        for needed in ([by_name[run.backbone]] if run.backbone else []) + repeats:
            if needed not in chosen:
                chosen.append(needed)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/transfer"), help="where data, runs and the table go")
    parser.add_argument("--toy", action="store_true", help="a few images, a tiny model, 2 epochs: plumbing only")
    parser.add_argument("--runs", nargs="+", choices=[run.name for run in RUNS], metavar="NAME",
                        help="only these runs and their backbones, in this order (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S",
                        help="run every model on classes 5-9 with each of these seeds (default: 0)")
    parser.add_argument("--no-autoattack", action="store_true",
                        help="clean and PGD-20 from the trainer's final evaluation only, no AutoAttack")
    args = parser.parse_args()
    runs = selected(args.runs, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    driver = Driver(args.out.resolve(), args.toy)
    driver.data()
    for run in runs:
        driver.train(run)
    fine_tunes = [run for run in runs if run.data == "c10_5to9_500"]
    if args.no_autoattack:  # the trainer's final evaluation: eval.final_attacks [clean, pgd20] on the same images
        results = [(run, args.out.resolve() / run.name / "last" / "results.json") for run in fine_tunes]
    else:
        results = [(run, driver.evaluate(run, "c10_5to9_500", "clean,pgd20,autoattack", "transfer"))
                   for run in fine_tunes]
    own = {run.name: driver.evaluate(run, "c10_0to4", "clean,pgd20", "own") for run in runs if run.data == "c10_0to4"}
    table = driver.table(results, own)
    (args.out / "table.md").write_text(table)
    print(f"\n{table}\nwrote {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
