"""The zoo beside the field (issue 29, item 6): the table and the figure of docs/zoo.md.

Every number of ours is read from the bundled entries (`sglr_zoo/bundled/NAME/`): the evaluator's results.json
(clean, PGD-20, AutoAttack and their n), recipe.yaml (the preset), run.json (the data, the machine) and metrics.csv
(the training time: the epochs' seconds, monitoring and evaluation excluded). An entry trained on from another zoo
entry (run.json's `backbone`) counts that entry's training time too, from its run.json (in its bundle, or in
model_cards/ once it has left the bundle). The anchors are the published numbers
that the issues compare against, each with its source; their training times are as reported (GPU hours), which is
why the figure's axis is marked by hardware. Nothing is typed in twice: rerun this after a zoo entry changes.

    python benchmarks/zoo_report.py                     # prints the Markdown table, draws docs/zoo.png
    python benchmarks/zoo_report.py --table zoo_table.md --figure zoo.png   # elsewhere
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sglr_zoo.recipe import Recipe, load_recipe  # noqa: E402
from sglr_zoo.zoo import ZOO, ZooEntry, lookup  # noqa: E402

ARCH_LABELS = {"preactresnet18_cifar": "PreActResNet-18", "preactresnet10_quarter_cifar": "PreActResNet-10 (1/4 width)",
               "preactresnet10_slim_cifar": "PreActResNet-10 (1/2 width)", "resnet18_cifar": "ResNet-18",
               "wrn34_10_cifar": "WRN-34-10"}
METHOD_LABELS = {"sglr": "SGLR", "pgd_at": "PGD-AT", "trades": "TRADES", "sglr_trades": "SGLR-TRADES"}


@dataclass(frozen=True)
class Anchor:
    """A published CIFAR-10 L-inf 8/255 result (AutoAttack on the full test set) to compare the zoo against."""

    name: str
    arch: str
    clean: float | None
    autoattack: float
    gpu_hours: float | None  # training time as its source reports it; None: not reported
    source: str


ANCHORS = [
    Anchor("Fast-AT (FGSM-RS), RobustBench Wong2020Fast", "PreActResNet-18", 83.34, 43.21, None,
           "RobustBench; Wong et al. 2020 (minutes on one GPU)"),
    Anchor("SGLR authors, PGD-AT + SGLS, 200 epochs", "ResNet-18", 83.0, 50.2, None, "shared/SGLR.md (authors' README)"),
    Anchor("FastAT Benchmark: PGD-AT + averaging + LS 0.4", "ResNet-18", None, 50.49, 1.95, "arXiv 2604.22853"),
    Anchor("FastAT Benchmark: N-FGSM", "ResNet-18", None, 47.77, 0.54, "arXiv 2604.22853"),
    Anchor("FastAT Benchmark: FGSM-RS", "ResNet-18", None, 43.09, 0.53, "arXiv 2604.22853"),
    Anchor("FastAT Benchmark: PGD-AT, last epoch", "ResNet-18", None, 44.33, 1.93, "arXiv 2604.22853"),
    Anchor("ADR (self-distilled soft labels)", "WRN-34-10", None, 53.2, None, "ICLR 2024 (issue 29's target)"),
]


@dataclass(frozen=True)
class Row:
    """One bundled zoo entry, as the table shows it."""

    name: str
    arch: str
    method: str
    preset: str
    data: str
    machine: str
    train_hours: float  # every stage's
    stages: int  # training runs: 2 when trained on from another zoo entry's weights
    gpu: bool
    clean: float
    pgd20: float | None
    autoattack: float | None
    n: int


def training_attack(recipe: Recipe) -> str:
    """The training attack's usual name: PGD-K, FGSM-RS or N-FGSM."""
    attack = recipe.attack
    if attack.steps > 1:
        return f"PGD-{attack.steps}"
    return "N-FGSM" if not attack.project and attack.noise > 1 else "FGSM-RS"


def preset(recipe: Recipe, epochs: int) -> str:
    """The levers in a few words: the attack, weight averaging, label smoothing, the schedule and its epochs."""
    parts = [training_attack(recipe)]
    if recipe.average.decay:
        parts.append(f"weight averaging {recipe.average.decay:g}")
    if recipe.method.label_smoothing:
        parts.append(f"label smoothing {recipe.method.label_smoothing:g}")
    parts.append(f"{recipe.schedule.name} {epochs} ep" + ("" if recipe.data.augment else ", no augmentation"))
    return ", ".join(parts)


def trained_on_gpu(run: dict) -> bool:
    """Whether run.json says the training ran on a GPU: its machine, else its speed levers' device."""
    if "machine" in run:
        return "CPUs" not in run["machine"]
    return "cuda" in json.dumps(run.get("speed", {}))


def machine(run: dict) -> str:
    """The machine a run.json names (its CPU's threads too), or which kind it was when it names none."""
    gpu = trained_on_gpu(run)
    name = run.get("machine") or ("a GPU, not recorded (see its card)" if gpu else "a CPU, not recorded")
    threads = run.get("speed", {}).get("threads", {}).get("value")
    return name + (f"; {threads} thread{'s' * (threads > 1)}" if threads and not gpu else "")


def stages(entry: ZooEntry) -> list[tuple[ZooEntry, dict]]:
    """The training runs that made `entry`'s weights, first stage first, each with its run.json: a run that trained
    on from a zoo entry's weights (run.json's `backbone`, the same sha256) follows that entry's own stages."""
    path = entry.record("run.json")
    if not path.is_file():
        raise SystemExit(f"{entry.name}: no {path}: a zoo entry that another trained on from keeps its run.json "
                         f"(copy it from its last bundle, {entry.last_bundled})")
    run = json.loads(path.read_text())
    backbone = run.get("backbone") or {}
    earlier = lookup(backbone.get("name") or "")
    if earlier is not None and earlier.sha256 == backbone.get("sha256"):
        return [*stages(earlier), (entry, run)]
    return [(entry, run)]


def training_seconds(entry: ZooEntry, run: dict) -> float:
    """One stage's training time: run.json's `train_seconds`, else the sum of metrics.csv's epoch seconds."""
    if run.get("train_seconds"):
        return run["train_seconds"]
    with open(entry.record("metrics.csv"), newline="") as file:
        return sum(float(row["epoch_s"]) for row in csv.DictReader(file))


def zoo_rows() -> list[Row]:
    """The bundled entries, each read from its own files (and those of the entries it trained on from)."""
    rows = []
    for entry in ZOO.values():
        if entry.folder is None:
            continue
        runs = stages(entry)
        run, results = runs[-1][1], entry.results
        with open(entry.folder / "metrics.csv", newline="") as file:
            epochs = int(list(csv.DictReader(file))[-1]["epoch"])
        levers = preset(load_recipe(entry.folder / "recipe.yaml"), epochs)
        if len(runs) > 1:
            levers += f"; trained on from `{runs[-2][0].name}`"
        rows.append(Row(entry.name, ARCH_LABELS.get(entry.arch, entry.arch), METHOD_LABELS[entry.method], levers,
                        f"{run['num_examples_train']:,} train images",
                        " then ".join(dict.fromkeys(machine(stage_run) for _, stage_run in runs)),
                        sum(training_seconds(stage, stage_run) for stage, stage_run in runs) / 3600, len(runs),
                        trained_on_gpu(run), results.clean_accuracy, results.robust_accuracy.get("pgd20"),
                        results.robust_accuracy.get("autoattack"), results.n_examples))
    return sorted(rows, key=lambda row: -(row.autoattack or 0))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(rows: list[Row]) -> str:
    """The Markdown table of docs/zoo.md: ours, then the anchors."""
    lines = ["| name | architecture | method | preset | data | training time, machine | clean % | PGD-20 % | "
             "AutoAttack % | n |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        time = f"{row.train_hours * 60:.0f} min" + (f" in {row.stages} stages" if row.stages > 1 else "")
        lines.append(f"| `{row.name}` | {row.arch} | {row.method} | {row.preset} | {row.data} | {time}, {row.machine} "
                     f"| {_cell(row.clean)} | {_cell(row.pgd20)} | **{_cell(row.autoattack)}** | {row.n} |")
    for anchor in ANCHORS:
        hours = "not reported" if anchor.gpu_hours is None else f"{anchor.gpu_hours:g} GPU h"
        lines.append(f"| *{anchor.name}* | {anchor.arch} | | | CIFAR-10 train | {hours} | {_cell(anchor.clean)} "
                     f"| | **{anchor.autoattack:.1f}** | as reported |")
    return "\n".join(lines)


# The figure's time axis, labelled in the units people plan in (hours on the log scale underneath).
TIME_TICKS = [(5 / 60, "5 min"), (10 / 60, "10 min"), (0.5, "30 min"), (1, "1 h"), (2, "2 h"), (5, "5 h"), (10, "10 h"),
              (24, "24 h")]


def figure(rows: list[Row], path: Path) -> None:
    """AutoAttack accuracy against training hours (log scale): ours by hardware, anchors with a reported time."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(8, 5))
    axes = fig.subplots()
    for gpu, marker, label in ((False, "o", "ours, on CPU cores"), (True, "s", "ours, on one GPU")):
        mine = [row for row in rows if row.gpu == gpu and row.autoattack is not None]
        if not mine:  # no legend entry for hardware the zoo has no entry from
            continue
        axes.scatter([r.train_hours for r in mine], [r.autoattack for r in mine], marker=marker, s=45, label=label)
        for row in mine:
            axes.annotate(row.name, (row.train_hours, row.autoattack), xytext=(5, 3), textcoords="offset points",
                          fontsize=7)
    timed = [anchor for anchor in ANCHORS if anchor.gpu_hours is not None]
    axes.scatter([a.gpu_hours for a in timed], [a.autoattack for a in timed], marker="^", color="grey", s=45,
                 label="anchors: GPU hours as reported")
    for anchor in timed:
        axes.annotate(anchor.name.removeprefix("FastAT Benchmark: "), (anchor.gpu_hours, anchor.autoattack),
                      xytext=(5, -9), textcoords="offset points", fontsize=7, color="grey")
    for anchor in ANCHORS:
        if anchor.gpu_hours is None:
            axes.axhline(anchor.autoattack, color="grey", alpha=0.3, linestyle=":")
            axes.annotate(f"{anchor.name} ({anchor.arch})", (0.02, anchor.autoattack), xycoords=("axes fraction",
                          "data"), xytext=(0, 2), textcoords="offset points", fontsize=6, color="grey")
    n = "/".join(str(k) for k in sorted({row.n for row in rows}))
    axes.set(xscale="log", xlabel="training time (log scale; ours: the epochs' seconds on the machine marked)",
             ylabel=f"AutoAttack accuracy (%; ours: first {n} test images)",
             title="CIFAR-10, L-inf 8/255: the zoo against the field")
    right = max([row.train_hours for row in rows] + [anchor.gpu_hours for anchor in timed])
    axes.set_xlim(right=right * 5)  # room for the labels
    low, high = axes.get_xlim()
    ticks = [(hours, label) for hours, label in TIME_TICKS if low <= hours <= high]
    axes.set_xticks([hours for hours, _ in ticks], [label for _, label in ticks])
    axes.xaxis.set_minor_formatter(NullFormatter())  # the log axis's own labels (2x10^-1, ...) overlap
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, help="write the Markdown table here too (it is always printed)")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "zoo.png")
    args = parser.parse_args(argv)
    rows = zoo_rows()
    text = table(rows)
    print(text)
    if args.table:
        args.table.write_text(text + "\n")
    figure(rows, args.figure)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
