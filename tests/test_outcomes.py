"""Per-example outcomes beside the results, and the paired test that compares two evaluations."""

import json
import os

import pytest
import torch

from sglr_zoo import evaluate as ev
from sglr_zoo.errors import UserError
from sglr_zoo.models import create_model
from sglr_zoo.outcomes import Outcomes, mcnemar_p, paired_test


@pytest.mark.parametrize("n", [1, 7, 8, 9, 21])
def test_outcomes_round_trip(tmp_path, n):
    flags = [(i * 7) % 3 == 0 for i in range(n)]
    path = Outcomes(n, "w", "d", {"clean": flags, "pgd20": [False] * n}).save(tmp_path / "r.outcomes.json")
    loaded = Outcomes.load(path)
    assert loaded.correct == {"clean": flags, "pgd20": [False] * n} and loaded.n_examples == n
    assert len(json.loads(path.read_text())["correct"]["clean"]) == 2 * ((n + 7) // 8)  # one bit per example


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema="x"), "not a sglr_zoo.outcomes/1 file"),
    (lambda d: d["correct"].update(clean="ff"), "must be 2 bytes of hex for 9 examples"),
    (lambda d: d["correct"].update(clean="ffff"), "set bits past the last example"),
    (lambda d: d["correct"].update(clean="zz00"), "non-hexadecimal"),
])
def test_broken_outcomes_files_are_one_line(tmp_path, edit, message):
    path = Outcomes(9, None, None, {"clean": [True] * 9}).save(tmp_path / "o.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        Outcomes.load(path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UserError, match="not a regular file"):
        Outcomes.load(tmp_path / "fifo")


@pytest.mark.parametrize("only_a, only_b, p", [(0, 0, 1.0), (5, 5, 1.0), (0, 6, 2 / 64), (1, 9, 22 / 1024)])
def test_mcnemar_exact_p(only_a, only_b, p):
    assert mcnemar_p(only_a, only_b) == pytest.approx(p)


def test_paired_test_counts_disagreements_and_refuses_other_images():
    a = Outcomes(4, data_sha256="d", correct={"pgd20": [True, True, False, False]})
    b = Outcomes(4, data_sha256="d", correct={"pgd20": [True, False, True, True]})
    test = paired_test(a, b, "pgd20")
    assert (test.only_a, test.only_b, test.accuracy_a, test.accuracy_b) == (1, 2, 50.0, 75.0)
    assert "+25.00 points" in test.describe()
    with pytest.raises(UserError, match="not on the same images"):
        paired_test(a, Outcomes(4, data_sha256="e", correct=b.correct), "pgd20")
    with pytest.raises(UserError, match="A and B did not run autoattack; both ran pgd20"):
        paired_test(a, b, "autoattack")


@pytest.mark.slow
def test_evaluate_writes_the_outcomes_of_each_attack(tmp_path):
    """The file holds the same per-example decisions that the accuracies in the results count."""
    torch.manual_seed(0)
    model = create_model("preactresnet_tiny_cifar", 10).eval()
    images, labels = torch.rand(12, 3, 32, 32), torch.arange(12) % 10
    path = tmp_path / "results.outcomes.json"
    results = ev.evaluate(model, images, labels, attacks=["clean", "pgd2"], batch_size=4, outcomes_path=path)
    outcomes = Outcomes.load(path)
    assert list(outcomes.correct) == ["clean", "pgd2"]
    assert outcomes.accuracy("clean") == results.clean_accuracy
    assert outcomes.accuracy("pgd2") == results.robust_accuracy["pgd2"]
    assert outcomes.weights_sha256 == results.weights_sha256
    assert all(c or not r for c, r in zip(outcomes.correct["clean"], outcomes.correct["pgd2"]))  # robust => correct


@pytest.mark.slow
def test_a_stopped_evaluation_keeps_the_attacks_it_finished(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = create_model("preactresnet_tiny_cifar", 10).eval()
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    path = tmp_path / "o.json"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "run_autoattack", killed)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model, images, labels, attacks=["clean", "pgd1", "autoattack"], outcomes_path=path)
    assert list(Outcomes.load(path).correct) == ["clean", "pgd1"]


def test_eps_sweep_png_is_a_picture():
    from sglr_zoo.plots import eps_sweep_png
    from sglr_zoo.results import EpsSweep

    png = eps_sweep_png(EpsSweep("pgd20", ["0", "2/255", "8/255"], [80.0, 60.0, 40.0], 55.0), "model")
    assert png.startswith(b"\x89PNG") and len(png) > 5000
