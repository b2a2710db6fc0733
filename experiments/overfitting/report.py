"""The robust-overfitting experiment's report: table, claim check and figure (docs/overfitting.md, issue 9).

    python experiments/overfitting/report.py [--out runs/overfitting] [--doc docs/overfitting.md]

Every accuracy comes from the evaluator's results files (`sglr_zoo.results.Results`: each run's best/ and last/
results.json, and last/results_autoattack.json for the first seed) and every per-epoch number from the runs'
metrics.csv (the trainer's monitoring, measured by the evaluator's `attack_correct`). OUT/report.md and
OUT/overfitting.png are written; with --doc, the section between the markers of that Markdown file is replaced
and the figure is copied beside it. Runs that do not exist yet are reported as "not run yet".
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sglr_zoo.errors import UserError
from sglr_zoo.recipe import Recipe, load_recipe
from sglr_zoo.results import Results
from sglr_zoo.rundir import RunDir

METHODS = ("pgd_at", "sglr", "trades", "sglr_trades")  # recipes METHOD.yaml beside this file; more can be added
LABELS = {"pgd_at": "PGD-AT", "sglr": "SGLR", "trades": "TRADES", "sglr_trades": "SGLR-TRADES"}
SEEDS = (0, 1)
# (baseline, SGLR variant): the first pair is the claim; the second is checked the same way.
CLAIMS = (("pgd_at", "sglr"), ("trades", "sglr_trades"))
BEGIN, END = "<!-- overfitting-results:begin -->", "<!-- overfitting-results:end -->"
FIGURE = "overfitting.png"


def label(method: str) -> str:
    """How the text names a method: its paper name, or a variant's recipe name (e.g. sglr_alpha095)."""
    return LABELS.get(method, method)


def recipe_names() -> list[str]:
    """The method recipes beside this file (common.yaml is their shared base)."""
    return sorted(path.stem for path in Path(__file__).parent.glob("*.yaml") if path.stem != "common")


@dataclass(frozen=True)
class Experiment:
    """Where the experiment's runs and files live under its output folder (each run is a `RunDir`)."""

    out: Path

    def run(self, method: str, seed: int) -> RunDir:
        return RunDir(self.out / f"{method}_s{seed}")

    def autoattack_results(self, method: str, seed: int) -> Path:
        """The evaluator's AutoAttack results for a run's final model."""
        return self.run(method, seed).export("last") / "results_autoattack.json"

    def autoattack_state(self, method: str, seed: int) -> Path:
        """AutoAttack's progress for `autoattack_results`: a killed evaluation resumes from it."""
        return self.run(method, seed).export("last") / "autoattack_state_eval.json"

    @property
    def timings(self) -> Path:
        """Wall seconds of every driver step, and the machines it ran on."""
        return self.out / "timings.json"

    @property
    def report(self) -> Path:
        return self.out / "report.md"

    @property
    def figure(self) -> Path:
        return self.out / FIGURE


@dataclass
class RunSummary:
    """One run's numbers: the evaluator's results objects and the monitoring rows of metrics.csv."""

    method: str
    seed: int
    recipe: Recipe | None = None  # the run's resolved recipe
    finished: bool = False  # the trainer marked the run finished
    best_epoch: int | None = None
    best: Results | None = None
    last: Results | None = None
    autoattack: Results | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    attack: str = "pgd10"  # the monitoring attack, as it names the metrics.csv columns

    def monitored(self, key: str) -> tuple[list[float], list[float]]:
        """Epochs and values of a metrics.csv column, where it was measured."""
        rows = [row for row in self.history if not math.isnan(row.get(key, math.nan))]
        return [row["epoch"] for row in rows], [row[key] for row in rows]

    @property
    def drop(self) -> float | None:
        """Best-to-final drop of PGD-20 accuracy (points) on the same test images."""
        if self.best is None or self.last is None:
            return None
        return self.best.robust_accuracy["pgd20"] - self.last.robust_accuracy["pgd20"]

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's row of a finished run (the trainer always monitors the last epoch); {} before."""
        return self.history[-1] if self.finished and self.history else {}

    @property
    def gap(self) -> float | None:
        """Final train-test robust gap (points): train minus test monitoring accuracy at the last epoch."""
        train, test = self.final.get(f"train_{self.attack}_acc"), self.final.get(f"test_{self.attack}_acc")
        return None if train is None or test is None else train - test


    def at_epoch(self, epoch: int) -> dict[str, float]:
        """metrics.csv's row of `epoch`, {} when there is none."""
        return next((row for row in self.history if row["epoch"] == epoch), {})


def _read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv as floats; an empty cell (an epoch that was not monitored) becomes nan."""
    with path.open(newline="") as file:
        return [{key: float(value) if value != "" else math.nan for key, value in row.items()}
                for row in csv.DictReader(file)]


def _results(path: Path) -> Results | None:
    return Results.load(path) if path.is_file() else None


def collect(experiment: Experiment, methods: list[str], seeds: list[int]) -> list[RunSummary]:
    """A summary of every (method, seed) run, empty where the run has not produced that file yet; a variant's
    (a recipe not in METHODS) seeds that were never started are left out."""
    summaries = []
    for method in methods:
        for seed in seeds:
            run = experiment.run(method, seed)
            if method not in METHODS and not run.root.is_dir():
                continue
            summary = RunSummary(method, seed, finished=run.finished.is_file())
            if run.recipe.is_file():
                summary.recipe = load_recipe(run.recipe)
                summary.attack = f"pgd{summary.recipe.eval.steps}"
            if run.metrics.is_file():
                summary.history = _read_metrics(run.metrics)
            if run.run_info.is_file():
                summary.best_epoch = json.loads(run.run_info.read_text())["best_epoch"]
            if summary.finished:  # a run being trained again (resumed) has no final numbers yet
                summary.best, summary.last = _results(run.results("best")), _results(run.results("last"))
                summary.autoattack = _results(experiment.autoattack_results(method, seed))
            summaries.append(summary)
    return summaries


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present and len(present) == len(values) else None


def _attack_label(summaries: list[RunSummary]) -> str:
    """The monitoring attack as the text names it ("PGD-10")."""
    return summaries[0].attack.replace("pgd", "PGD-") if summaries else "PGD-10"


def table(summaries: list[RunSummary]) -> str:
    """The results table: a row per run, and a mean row per method with more than one seed."""
    attack = _attack_label(summaries)
    head = ("| method | seed | best epoch | best clean | best PGD-20 | final clean | final PGD-20 | best-to-final drop "
            f"| final train {attack} | final test {attack} | final gap | final grad norm | final AutoAttack |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for method in dict.fromkeys(s.method for s in summaries):
        rows = [s for s in summaries if s.method == method]
        for s in rows:
            if not s.finished:
                state = "not run yet"
                if s.history:
                    state = f"in progress (epoch {s.history[-1]['epoch']:.0f} of {s.recipe.schedule.epochs})"
                lines.append(f"| {label(method)} | {s.seed} | {state} |" + " |" * 10)
                continue
            lines.append("| " + " | ".join([
                label(method), str(s.seed), str(s.best_epoch or "-"),
                _cell(s.best.clean_accuracy if s.best else None),
                _cell(s.best.robust_accuracy.get("pgd20") if s.best else None),
                _cell(s.last.clean_accuracy if s.last else None),
                _cell(s.last.robust_accuracy.get("pgd20") if s.last else None), _cell(s.drop),
                _cell(s.final.get(f"train_{s.attack}_acc")), _cell(s.final.get(f"test_{s.attack}_acc")), _cell(s.gap),
                f"{s.final['grad_norm']:.3f}" if s.final else "-",
                _cell(s.autoattack.robust_accuracy.get("autoattack") if s.autoattack else None)]) + " |")
        drop, gap = _mean([s.drop for s in rows]), _mean([s.gap for s in rows])
        if len(rows) > 1 and (drop, gap) != (None, None):
            lines.append(f"| {label(method)} | mean | | | | | | {_cell(drop)} | | | {_cell(gap)} | | |")
    return "\n".join(lines)


def after_decay(summaries: list[RunSummary]) -> str:
    """What changed from the first learning-rate decay to the end, per finished run: the train-test robust gap,
    test robust accuracy and the gradient norm (metrics.csv rows of the first milestone epoch and the last epoch).
    Robust overfitting is what happens after the decay; the final gap also holds the gap that small data has from
    the start. Post hoc: the claim check above uses the final gap, as the issue states it."""
    runs = [s for s in summaries if s.finished and s.recipe is not None and s.recipe.schedule.milestones]
    if not runs:
        return ""
    attack, decay, recipe = _attack_label(runs), runs[0].recipe.schedule.milestones[0], runs[0].recipe
    n_train = f"{recipe.data.n_train:,}" if recipe.data.n_train else "all the"
    lines = ["Not part of the claim (chosen after seeing seed 0): the gap's growth from the first decay to the end "
             f"separates robust overfitting from the gap that {n_train} training images give every method before "
             f"it. Rows of metrics.csv ({recipe.eval.n:,} images each).", "",
             f"| method | seed | gap at epoch {decay} | final gap | gap growth | test {attack} at epoch {decay} | "
             f"final test {attack} | grad norm at epoch {decay} | final grad norm |", "|" + "---|" * 9]
    for s in runs:
        start, end = s.at_epoch(decay), s.final
        gaps = [row.get(f"train_{s.attack}_acc", math.nan) - row.get(f"test_{s.attack}_acc", math.nan)
                for row in (start, end)]
        lines.append("| " + " | ".join([
            label(s.method), str(s.seed), _cell(gaps[0]), _cell(gaps[1]), _cell(gaps[1] - gaps[0]),
            _cell(start.get(f"test_{s.attack}_acc")), _cell(end.get(f"test_{s.attack}_acc")),
            f"{start.get('grad_norm', math.nan):.2f}", f"{end.get('grad_norm', math.nan):.2f}"]) + " |")
    return "\n".join(lines)


def _standard_error(summaries: list[RunSummary]) -> float | None:
    """The binomial standard error (points) of one PGD-20 accuracy on the evaluated test images."""
    finals = [s.last for s in summaries if s.last is not None]
    if not finals:
        return None
    p = statistics.fmean(r.robust_accuracy["pgd20"] for r in finals) / 100
    return 100 * math.sqrt(p * (1 - p) / finals[0].n_examples)


def claim_check(summaries: list[RunSummary]) -> str:
    """The issue's claim (SGLR's final AutoAttack >= PGD-AT's; its drop and gap <= half of PGD-AT's) per pair of
    methods, stated as holds / does not hold from the numbers, or why it cannot be stated yet."""
    by_method: dict[str, list[RunSummary]] = {}
    for s in summaries:
        by_method.setdefault(s.method, []).append(s)
    lines = []
    error = _standard_error(summaries)
    for baseline, variant in CLAIMS:
        if baseline not in by_method or variant not in by_method:
            continue
        base, ours = by_method[baseline], by_method[variant]
        names = label(baseline), label(variant)
        lines += [*([""] if lines else []), f"**{names[1]} against {names[0]}**", ""]
        aa = [runs[0].autoattack.robust_accuracy["autoattack"] if runs[0].autoattack else None for runs in (base, ours)]
        if None in aa:
            lines.append(f"- final AutoAttack, {names[1]} >= {names[0]}: not run yet")
        else:
            verdict = "holds" if aa[1] >= aa[0] else "does not hold"
            lines.append(f"- final AutoAttack, {names[1]} >= {names[0]} (seed {base[0].seed}, first "
                         f"{base[0].autoattack.n_examples} test images): {aa[1]:.1f}% vs {aa[0]:.1f}%: **{verdict}**")
        gap = f"final train-test gap of {_attack_label(summaries)}"
        for what, key in (("best-to-final drop of PGD-20", "drop"), (gap, "gap")):
            means = [_mean([getattr(s, key) for s in runs]) for runs in (base, ours)]
            if None in means:
                lines.append(f"- {what}, {names[1]} <= half of {names[0]}'s: not run yet")
                continue
            verdict = "holds" if means[1] <= means[0] / 2 else "does not hold"
            lines.append(f"- {what}, {names[1]} <= half of {names[0]}'s (mean over {len(base)} seeds): "
                         f"{means[1]:.1f} vs {means[0] / 2:.1f} (= {means[0]:.1f} / 2): **{verdict}**")
            if key == "drop" and error is not None and means[0] < 2 * error:
                lines.append(f"  - {names[0]}'s drop ({means[0]:.1f}) is under twice the standard error of one "
                             f"accuracy ({error:.1f} points): not distinguished from noise, so this comparison "
                             "says little at this scale")
    return "\n".join(lines) if lines else "not run yet"


def plot(summaries: list[RunSummary], path: Path, methods: tuple[str, ...] = ("pgd_at", "sglr")) -> bool:
    """Train and test robust accuracy and the gradient norm per epoch, PGD-AT against SGLR (first seed of each);
    returns False (and writes nothing) when neither has monitoring rows yet."""
    shown = [next((s for s in summaries if s.method == m and s.history), None) for m in methods]
    shown = [s for s in shown if s is not None]
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (accuracy, grad) = plt.subplots(1, 2, figsize=(11, 4))
    for s, color in zip(shown, ("tab:red", "tab:blue")):
        name = f"{label(s.method)} (seed {s.seed})"
        accuracy.plot(*s.monitored(f"train_{s.attack}_acc"), color=color, linestyle="--", label=f"{name} train")
        accuracy.plot(*s.monitored(f"test_{s.attack}_acc"), color=color, label=f"{name} test")
        grad.plot(*s.monitored("grad_norm"), color=color, label=name)
    if shown[0].recipe is not None:
        for axes in (accuracy, grad):
            for milestone in shown[0].recipe.schedule.milestones:
                axes.axvline(milestone, color="grey", linestyle=":", linewidth=1)
    attack = _attack_label(shown)
    accuracy.set(xlabel="epoch", ylabel=f"{attack} accuracy (%)", title=f"robust accuracy ({attack}, Linf 8/255)")
    grad.set(xlabel="epoch (dotted: learning-rate decays)", ylabel="mean gradient norm",
             title="gradient norm of the training loss")
    for axes in (accuracy, grad):
        axes.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _wall_times(experiment: Experiment) -> str:
    if not experiment.timings.is_file():
        return "Wall time: not run yet."
    timings = json.loads(experiment.timings.read_text())
    hours = {kind: sum(s for key, s in timings["steps"].items() if key.startswith(kind + "/")) / 3600
             for kind in ("train", "eval", "autoattack")}
    return (f"Wall time ({experiment.timings.name} beside the runs): training {hours['train']:.2f} h (the final "
            f"evaluation of best/ and last/ included), evaluation stage {hours['eval']:.2f} h, AutoAttack "
            f"{hours['autoattack']:.2f} h; machine: {'; '.join(timings['machines'])}.")


def _setting(summaries: list[RunSummary]) -> str:
    """One sentence naming the recipe the runs used, read from the first run's resolved recipe."""
    for s in summaries:
        if s.recipe is not None:
            r = s.recipe
            images = f"first {r.data.n_train:,}" if r.data.n_train else "all"
            return (f"{r.model.arch}, {images} CIFAR-10 training images, {r.schedule.epochs} epochs, "
                    f"lr x{r.schedule.gamma:g} at epochs {', '.join(map(str, r.schedule.milestones))}, "
                    f"PGD-{r.attack.steps} training (Linf {r.attack.eps}), monitoring on the first {r.eval.n} "
                    f"images of each split {'every epoch' if r.eval.every == 1 else f'every {r.eval.every} epochs'}.")
    return ""


def _autoattack_version(summaries: list[RunSummary]) -> str:
    """AutoAttack's version as the results record it ("standard", or "custom: apgd-ce, ...")."""
    for s in summaries:
        if s.autoattack is not None:
            settings = s.autoattack.attacks["autoattack"]
            custom = settings["version"] == "custom"
            return settings["version"] + (f": {', '.join(settings['sub_attacks'])}" if custom else "")
    return "standard"


def render(experiment: Experiment, summaries: list[RunSummary], figure: str | None) -> str:
    """The Markdown section: setting, table, claim check, figure, wall time."""
    parts = [_setting(summaries), "", table(summaries), "",
             "Accuracies in %. Best and final: the evaluator's clean and PGD-20 accuracy (results.json of best/ and "
             f"last/; best = the monitored epoch with the highest validation {_attack_label(summaries)}). Train/test "
             f"{_attack_label(summaries)}, the gap and "
             f"the gradient norm: the last epoch's row of metrics.csv. AutoAttack ({_autoattack_version(summaries)}): "
             "on the final model of the first seed (last/results_autoattack.json).", "", "### Claim check", "",
             claim_check(summaries), ""]
    decay = after_decay(summaries)
    if decay:
        parts += ["### After the first learning-rate decay", "", decay, ""]
    if figure:
        parts += [f"![train and test robust accuracy and gradient norm per epoch, PGD-AT vs SGLR]({figure})", ""]
    parts.append(_wall_times(experiment))
    return "\n".join(parts).strip() + "\n"


def replace_section(doc: Path, text: str) -> None:
    """Replaces what lies between the BEGIN and END markers of `doc` with `text`."""
    content = doc.read_text() if doc.is_file() else ""
    if content.count(BEGIN) != 1 or content.count(END) != 1 or content.index(BEGIN) > content.index(END):
        raise UserError(f"{doc}: needs one {BEGIN} line followed by one {END} line; the report goes between them")
    head, rest = content.split(BEGIN)
    doc.write_text(f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}")


def write_report(out: Path, methods: list[str], seeds: list[int], doc: Path | None = None) -> str:
    """Writes OUT/report.md and OUT/overfitting.png (and the section of `doc`); returns the Markdown."""
    experiment = Experiment(out)
    summaries = collect(experiment, methods, seeds)
    has_figure = plot(summaries, experiment.figure)
    text = render(experiment, summaries, FIGURE if has_figure else None)
    out.mkdir(parents=True, exist_ok=True)
    experiment.report.write_text(text)
    if doc is not None:
        if has_figure:
            shutil.copyfile(experiment.figure, doc.parent / FIGURE)
        replace_section(doc, text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/overfitting"), help="the driver's output folder")
    parser.add_argument("--doc", type=Path, help="a Markdown file whose marked section gets the report")
    parser.add_argument("--methods", nargs="+", choices=recipe_names(), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    args = parser.parse_args(argv)
    try:
        print(write_report(args.out, args.methods, args.seeds, args.doc))
    except UserError as error:
        sys.exit(f"report: error: {error}")


if __name__ == "__main__":
    main()
