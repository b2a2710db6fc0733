"""The transfer experiment's driver (experiments/transfer/run.py): what `--runs` and `--seeds` select; its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_script

DRIVER = Path(__file__).resolve().parents[1] / "experiments" / "transfer" / "run.py"


@pytest.fixture(scope="module")
def driver():
    return load_script(DRIVER, "transfer_driver")


def names(runs) -> list[str]:
    return [run.name for run in runs]


def test_selected_adds_each_backbone_before_its_fine_tune_once(driver):
    chosen = driver.selected(["clean_warmup", "scratch", "clean_full"])
    assert names(chosen) == ["backbone_clean", "clean_warmup", "scratch", "clean_full"]


def test_selected_defaults_to_every_run_in_the_driver_order(driver):
    assert names(driver.selected(None)) == names(driver.RUNS)


def test_every_fine_tune_names_a_backbone_run_with_a_recipe(driver):
    by_name = {run.name: run for run in driver.RUNS}
    for run in driver.RUNS:
        assert (DRIVER.parent / run.recipe).is_file(), run.recipe
        if run.backbone:
            assert by_name[run.backbone].backbone is None and by_name[run.backbone].data == "c10_0to4"


def test_seeds_repeat_the_fine_tunes_under_their_own_names_and_the_backbones_once(driver):
    chosen = driver.selected(["clean_warmup", "scratch"], seeds=[0, 2])
    assert names(chosen) == ["backbone_clean", "clean_warmup", "clean_warmup-s2", "scratch", "scratch-s2"]
    assert [run.seed for run in chosen] == [0, 0, 2, 0, 2]
    assert "run.seed=2" in chosen[2].overrides and not any("run.seed" in o for o in chosen[1].overrides)
    assert chosen[2].label == chosen[1].label and chosen[2].backbone == "backbone_clean"


def write_result(folder: Path, clean: float, pgd20: float) -> Path:
    (folder / "last").mkdir(parents=True)
    (folder / "metrics.csv").write_text("epoch,epoch_s\n1,30\n2,30\n")
    path = folder / "last" / "results.json"
    path.write_text(json.dumps({"clean_accuracy": clean, "robust_accuracy": {"pgd20": pgd20}, "wall_time_s": 6.0}))
    return path


def test_the_table_has_a_row_a_seed_and_their_mean(driver, tmp_path):
    runs = driver.selected(["scratch"], seeds=[0, 1])
    results = [(run, write_result(tmp_path / run.name, clean, pgd))
               for run, clean, pgd in zip(runs, (70.0, 80.0), (50.0, 53.0))]
    table = driver.Driver(tmp_path, toy=False).table(results, own={})
    assert "| from scratch, same budget | 1 | 80.00 | 53.00 | - | 1.0 | 0.1 |" in table
    assert "| from scratch, same budget | 2 | 75.00 | 51.50 | - |" in table


def test_drivers_side_by_side_keep_each_others_step_times(driver, tmp_path):
    first, second = driver.Driver(tmp_path, toy=True), driver.Driver(tmp_path, toy=True)  # both started, no times
    first.run("eval/a", ["true"])
    second.run("eval/b", ["true"])
    first.run("eval/a", ["true"])  # a resumed step adds up
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"eval/a", "eval/b"}
    assert list(tmp_path.iterdir()) == [tmp_path / "timings.json"]
