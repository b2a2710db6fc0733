"""The robust-overfitting experiment's driver and report (experiments/overfitting/), at toy scale."""

from __future__ import annotations

import csv
import json
import re
import shutil
import time

import pytest

from sglr_zoo.errors import UserError
from sglr_zoo.recipe import load_recipe
from sglr_zoo.results import Provenance, Results
from tests.conftest import REPO, load_script, write_parquet_dataset

EXPERIMENT = REPO / "experiments" / "overfitting"


driver, report = (load_script(EXPERIMENT / f"{name}.py", f"overfitting_{name}") for name in ("run", "report"))


def _rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    """The results table's rows by (method label, seed), as lists of cells."""
    rows = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 13 and cells[1] not in ("seed", "---"):
            rows[cells[0], cells[1]] = cells
    return rows


def _final_metrics(run) -> dict[str, str]:
    with run.metrics.open() as file:
        return list(csv.DictReader(file))[-1]


@pytest.mark.slow
def test_toy_experiment_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SGLR_ZOO_DATA", str(tmp_path))
    write_parquet_dataset(tmp_path / "cifar10")
    out = tmp_path / "runs"
    doc = tmp_path / "doc.md"
    doc.write_text(f"# before\n{report.BEGIN}\nold\n{report.END}\nafter\n")
    args = ["--scale", "toy", "--out", str(out), "--methods", "pgd_at", "sglr", "--seeds", "0", "--doc", str(doc)]
    driver.main(args)

    experiment = report.Experiment(out)
    text = experiment.report.read_text()
    rows = _rows(text)
    for method, label in (("pgd_at", "PGD-AT"), ("sglr", "SGLR")):
        run = experiment.run(method, 0)
        assert run.finished.is_file()
        assert load_recipe(run.recipe).method.name == method and load_recipe(run.recipe).run.seed == 0
        best, last = Results.load(run.results("best")), Results.load(run.results("last"))
        autoattack = Results.load(experiment.autoattack_results(method, 0))
        assert last.n_examples == 16 and autoattack.n_examples == 8 and "autoattack" in autoattack.robust_accuracy
        metrics = _final_metrics(run)
        row = rows[label, "0"]
        # Every number of the row is the results objects' or metrics.csv's, formatted.
        assert row[4] == f"{best.robust_accuracy['pgd20']:.1f}" and row[6] == f"{last.robust_accuracy['pgd20']:.1f}"
        assert row[5] == f"{last.clean_accuracy:.1f}"
        assert row[7] == f"{best.robust_accuracy['pgd20'] - last.robust_accuracy['pgd20']:.1f}"
        gap = float(metrics["train_pgd2_acc"]) - float(metrics["test_pgd2_acc"])
        assert row[8] == f"{float(metrics['train_pgd2_acc']):.1f}" and row[10] == f"{gap:.1f}"
        assert row[11] == f"{float(metrics['grad_norm']):.3f}"
        assert row[12] == f"{autoattack.robust_accuracy['autoattack']:.1f}"
    assert "**SGLR against PGD-AT**" in text and "not run yet" not in text.split("### Claim check")[1]
    assert text in doc.read_text() and doc.read_text().startswith("# before\n") and doc.read_text().endswith("after\n")
    assert (tmp_path / "overfitting.png").is_file() and experiment.figure.is_file()

    # A second call resumes a killed run from its last checkpoint, skips the finished one and the existing
    # evaluations, and re-measures a missing results.json through the evaluator.
    killed, done = experiment.run("pgd_at", 0), experiment.run("sglr", 0)
    killed.finished.unlink()
    shutil.rmtree(killed.checkpoint(3))  # killed during epoch 3: epoch 2 is its last checkpoint
    finished = done.finished.stat().st_mtime_ns
    done.results("best").unlink()
    rows = _rows(report.write_report(out, ["pgd_at", "sglr"], [0]))
    assert rows["PGD-AT", "0"][2] == "in progress (epoch 3 of 3)" and rows["SGLR", "0"][4] == "-"
    (out / "sglr_start035_s0").mkdir()  # a variant's run that was started: the report lists it after the methods
    capsys.readouterr()
    driver.main(args)
    printed = capsys.readouterr().out
    assert [key for key in _rows(experiment.report.read_text()) if key[0] not in ("PGD-AT", "SGLR")] == [
        ("sglr_start035", "0")]
    assert f"resumed from {killed.checkpoint(2)} (epoch 2," in printed and killed.finished.is_file()
    with killed.metrics.open() as file:
        assert [int(row["epoch"]) for row in csv.DictReader(file)] == [1, 2, 3]
    assert printed.count("finished, skipped") == 1 and done.finished.stat().st_mtime_ns == finished
    assert printed.count("results_autoattack.json: exists, skipped") == 2
    remeasured = Results.load(done.results("best"))
    assert remeasured.n_examples == 16 and remeasured.provenance.command.startswith("sglr-zoo eval ")
    steps = json.loads(experiment.timings.read_text())["steps"]
    assert set(steps) == {"train/pgd_at_s0", "train/sglr_s0", "autoattack/pgd_at_s0", "autoattack/sglr_s0",
                          "eval/sglr_s0/best"}


def _summary(method: str, seed: int, best: float, last: float, gap: float, autoattack: float) -> report.RunSummary:
    def results(pgd20: float, **extra: float) -> Results:
        return Results(provenance=Provenance(), arch=None, threat="linf", eps="8/255", n_examples=1000,
                       clean_accuracy=60.0, robust_accuracy={"pgd20": pgd20, **extra}, seed=seed, device="cpu",
                       versions={}, wall_time_s=1.0, created="2026-01-01T00:00:00+00:00")

    return report.RunSummary(method, seed, finished=True, best=results(best), last=results(last),
                             autoattack=results(last, autoattack=autoattack),
                             history=[{"epoch": 80.0, "grad_norm": 0.5, "train_pgd10_acc": 30.0 + gap,
                                       "test_pgd10_acc": 30.0}])


def test_the_plan_stage_times_the_trainers_step(tmp_path, monkeypatch, capsys, fresh_accelerate):
    """`--stage plan` times `sglr_zoo.loop.train_step` (no run.max_steps trick), also where the data has fewer
    batches than the steps it times."""
    import sglr_zoo.loop

    steps = []
    real = sglr_zoo.loop.train_step
    monkeypatch.setattr(sglr_zoo.loop, "train_step", lambda *args, **kwargs: steps.append(kwargs) or real(*args, **kwargs))
    monkeypatch.setenv("SGLR_ZOO_DATA", str(tmp_path))
    write_parquet_dataset(tmp_path / "cifar10")
    driver.main(["--stage", "plan", "--scale", "toy", "--out", str(tmp_path / "runs"), "--methods", "pgd_at", "sglr",
                 "--seeds", "0"])
    assert len(steps) == 2 * 4 and all(step["epoch"] == 1 for step in steps)  # a warm-up and 3 timed, per method
    assert "training, sglr" in capsys.readouterr().out and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("sglr", "verdicts"), [
    ((41, 39, 15, 34), ["holds", "holds", "holds"]),  # drop 2 <= 10 / 2, gap 15 <= 40 / 2, AutoAttack 34 >= 33
    ((41, 35, 25, 32), ["does not hold"] * 3),  # drop 6 > 5, gap 25 > 20, AutoAttack 32 < 33
])
def test_claim_check_states_each_part(sglr, verdicts):
    best, last, gap, autoattack = sglr
    summaries = [_summary("pgd_at", seed, 40, 30, 40, 33) for seed in (0, 1)]
    summaries += [_summary("sglr", seed, best, last, gap, autoattack) for seed in (0, 1)]
    text = report.claim_check(summaries)
    assert re.findall(r"\*\*(holds|does not hold)\*\*", text) == verdicts
    assert "not distinguished from noise" not in text and "TRADES" not in text


def test_claim_check_says_when_the_baseline_drop_is_noise():
    summaries = [_summary("pgd_at", 0, 31, 30, 40, 33), _summary("sglr", 0, 30, 30, 10, 34)]
    assert "PGD-AT's drop (1.0) is under twice the standard error of one accuracy (1.4 points)" in \
        report.claim_check(summaries)


def test_after_decay_reads_the_milestone_and_last_rows():
    run = _summary("pgd_at", 0, 40, 30, 20, 33)
    run.recipe = load_recipe(EXPERIMENT / "pgd_at.yaml")  # first milestone: epoch 40
    run.history = [{"epoch": 40.0, "grad_norm": 0.8, "train_pgd10_acc": 35.0, "test_pgd10_acc": 21.0},
                   {"epoch": 41.0, "grad_norm": 0.9}, *run.history]
    text = report.after_decay([run, _summary("sglr", 0, 40, 39, 10, 34)])  # no recipe: left out
    assert "| PGD-AT | 0 | 14.0 | 20.0 | 6.0 | 21.0 | 30.0 | 0.80 | 0.50 |" in text and "SGLR" not in text
    assert "1,000 training images" in text


def test_report_before_any_run(tmp_path):
    doc = tmp_path / "overfitting.md"
    doc.write_text(f"intro\n{report.BEGIN}\n{report.END}\n")
    text = report.write_report(tmp_path / "runs", list(report.METHODS), [0, 1], doc)
    assert len(_rows(text)) == 8 and all(row[2] == "not run yet" for row in _rows(text).values())
    assert "Wall time: not run yet." in text and "overfitting.png" not in text
    assert doc.read_text() == f"intro\n{report.BEGIN}\n{text}{report.END}\n"


def test_a_variant_lists_only_its_started_seeds(tmp_path):
    (tmp_path / "sglr_start035_s0").mkdir()
    summaries = report.collect(report.Experiment(tmp_path), ["pgd_at", "sglr_start035"], [0, 1])
    assert [(s.method, s.seed) for s in summaries] == [("pgd_at", 0), ("pgd_at", 1), ("sglr_start035", 0)]


@pytest.mark.parametrize("content", ["no markers\n", f"{report.END}\n{report.BEGIN}\n",
                                     f"{report.BEGIN}\n{report.BEGIN}\n{report.END}\n"])
def test_report_needs_one_pair_of_markers(tmp_path, content):
    doc = tmp_path / "doc.md"
    doc.write_text(content)
    with pytest.raises(UserError, match="doc.md: needs one"):
        report.replace_section(doc, "table\n")
    assert doc.read_text() == content


def test_method_recipes_differ_only_in_the_method():
    """Same data, model, attack, schedule, budget and evaluation for every method; SGLR starts at the paper's
    fractions of the run (90/200, and 70/200 for TRADES)."""
    recipes = {method: load_recipe(EXPERIMENT / f"{method}.yaml") for method in report.METHODS}
    trees = {method: {k: v for k, v in recipe.to_dict().items() if k not in ("method", "run")} |
             {"run": {k: v for k, v in recipe.to_dict()["run"].items() if k != "name"}}
             for method, recipe in recipes.items()}
    assert all(tree == trees["pgd_at"] for tree in trees.values())
    assert {method: recipe.method.name for method, recipe in recipes.items()} == {m: m for m in report.METHODS}
    assert recipes["sglr"].start_epoch == 36 and recipes["sglr_trades"].start_epoch == 28
    schedule = recipes["pgd_at"].schedule
    assert schedule.name == "multistep" and [m / schedule.epochs for m in schedule.milestones] == [0.5, 0.75]
    assert recipes["pgd_at"].run.resume == "auto" and recipes["pgd_at"].run.mixed_precision == "auto"


@pytest.mark.real_data
def test_full_scale_data_is_as_documented(real_cifar10, monkeypatch):
    from sglr_zoo.data import load_splits

    monkeypatch.setenv("SGLR_ZOO_DATA", str(real_cifar10.parent))
    splits = load_splits(load_recipe(EXPERIMENT / "common.yaml").data)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1000, 500, 1000)
    assert splits.train.labels.bincount(minlength=10).min() >= 75  # every class is there, roughly balanced (85-112)


def test_a_killed_step_records_its_time(tmp_path):
    run = driver.Driver(tmp_path, driver.SCALES["toy"], ["pgd_at"], [0], None)

    def killed() -> None:
        time.sleep(0.05)
        raise KeyboardInterrupt

    run.timed("train/pgd_at_s0", lambda: time.sleep(0.05))
    with pytest.raises(KeyboardInterrupt):
        run.timed("train/pgd_at_s0", killed)
    timings = json.loads(run.experiment.timings.read_text())
    assert list(timings["steps"]) == ["train/pgd_at_s0"] and timings["steps"]["train/pgd_at_s0"] >= 0.1
