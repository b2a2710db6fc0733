"""The transfer experiment's driver (experiments/transfer/run.py): which runs `--runs` selects."""

from __future__ import annotations

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
