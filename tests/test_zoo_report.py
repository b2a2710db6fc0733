"""benchmarks/zoo_report.py: docs/zoo.md's table and figure are read from the bundled entries' own files."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglr_zoo.zoo import ZOO
from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo_report.py"


@pytest.fixture(scope="module")
def zoo_report():
    return load_script(SCRIPT, "zoo_report")


def test_every_bundled_entry_is_a_row_with_its_evaluated_numbers(zoo_report, tmp_path, capsys):
    zoo_report.main(["--table", str(tmp_path / "table.md"), "--figure", str(tmp_path / "zoo.png")])
    printed = capsys.readouterr().out
    text = (tmp_path / "table.md").read_text()
    assert text.strip() in printed and (tmp_path / "zoo.png").read_bytes().startswith(b"\x89PNG")
    bundled = [entry for entry in ZOO.values() if entry.bundle]
    lines = {line.split("|")[1].strip(" `"): line for line in text.splitlines()[2:]}
    for entry in bundled:
        results = entry.results
        cells = [cell.strip(" *") for cell in lines[entry.name].split("|")]
        assert cells[7:11] == [f"{results.clean_accuracy:.1f}", f"{results.robust_accuracy['pgd20']:.1f}",
                               f"{results.robust_accuracy['autoattack']:.1f}", str(results.n_examples)]
    rows = zoo_report.zoo_rows()
    assert [row.autoattack for row in rows] == sorted((row.autoattack for row in rows), reverse=True)
    assert all(row.train_hours > 0 for row in rows)


def test_the_preset_names_the_training_attack_and_levers(zoo_report):
    from sglr_zoo.recipe import load_recipe

    root = SCRIPT.parents[1] / "recipes"
    assert zoo_report.preset(load_recipe(root / "prn18_cifar10.yaml"), 200) == "PGD-10, multistep 200 ep"
    # as a short run resolves data.augment: auto and average.min_epochs
    quickstart = load_recipe(root / "quickstart_cifar10.yaml", ["data.augment=false", "average.decay=0"])
    assert zoo_report.preset(quickstart, 8) == "N-FGSM, onecycle 8 ep, no augmentation"
    long_cpu = load_recipe(root / "prn18_cifar10_cpu.yaml", ["data.augment=true"])  # as a run planned for 12 epochs
    assert zoo_report.preset(long_cpu, 12) == "N-FGSM, weight averaging 0.998, onecycle 12 ep"
    quickstart.attack.noise, quickstart.attack.project, quickstart.attack.step_size = 1, True, 10 / 255
    assert zoo_report.training_attack(quickstart) == "FGSM-RS"


def test_an_entry_trained_on_from_another_counts_both_stages(zoo_report, tmp_path, monkeypatch):
    """A second stage's row (run.json's `backbone` names a zoo entry) counts the first stage's training time, read
    from its record in model_cards/ once it has left the bundle; other weights of that name start no stage."""
    import json

    from sglr_zoo import zoo

    monkeypatch.setattr(zoo, "MODEL_CARDS", tmp_path)
    first, second = (zoo.ZooEntry(name, "preactresnet18_cifar", f"org/{name}", "sglr", "recipes/r.yaml",
                                  sha256=digit * 64) for name, digit in (("first", "a"), ("second", "b")))
    for entry in (first, second):
        monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    (tmp_path / "second.run.json").write_text(json.dumps({"train_seconds": 50.0,
                                                          "backbone": {"name": "first", "sha256": "a" * 64}}))
    with pytest.raises(SystemExit, match="first: no .*first.run.json"):
        zoo_report.stages(second)
    (tmp_path / "first.run.json").write_text(json.dumps({"train_seconds": 100.0}))
    runs = zoo_report.stages(second)
    assert [entry.name for entry, _ in runs] == ["first", "second"]
    assert sum(zoo_report.training_seconds(entry, run) for entry, run in runs) == 150.0
    (tmp_path / "second.run.json").write_text(json.dumps({"train_seconds": 50.0,
                                                          "backbone": {"name": "first", "sha256": "c" * 64}}))
    assert [entry.name for entry, _ in zoo_report.stages(second)] == ["second"]
