"""The catastrophic-overfitting guard: its decision and rollback, its records, resume, and a real collapse."""

from __future__ import annotations

import copy
import csv
import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from sglr_zoo.data import ImageSet, to_float
from sglr_zoo.errors import UserError
from sglr_zoo.evaluate import attack_correct
from sglr_zoo.guard import OverfittingGuard, fallback_attack
from sglr_zoo.loop import StepParts, train_step
from sglr_zoo.models import create_model
from sglr_zoo.monitoring import metric_columns
from sglr_zoo.objectives import build_objective
from sglr_zoo.recipe import from_dict
from sglr_zoo.rundir import RunDir
from sglr_zoo.runstate import RunState
from sglr_zoo.training import train

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/conftest.py: one thread, a fresh Accelerator state

# FGSM training (one step, no random start) of a tiny SGLR run: 64 train images, batch 16.
FGSM = {
    "data": {"augment": False},
    "model": {"arch": "preactresnet_tiny_cifar"},
    "attack": {"steps": 1, "step_size": "8/255", "random_start": False},
    "method": {"name": "sglr", "start_epoch": 1},
    "schedule": {"epochs": 2, "name": "cosine"},
    "eval": {"n": 16, "steps": 2, "batch_size": 32, "final_attacks": ["pgd2"], "final_n": 8},
    "guard": {"every": 2, "n": 16, "steps": 2, "patience": 1},
    "run": {"batch_size": 16, "name": "run", "mixed_precision": "no", "threads": 1},
}


def scripted(monkeypatch, accuracies: list[float]) -> list[float]:
    """The guard's checks return `accuracies` in turn; returns the list of those not yet returned."""
    left = list(accuracies)
    monkeypatch.setattr(OverfittingGuard, "check", lambda self: left.pop(0))
    return left


def read_metrics(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


# ---- the decision and the rollback, step by step --------------------------------------------------------------

def tiny_parts() -> tuple[StepParts, ImageSet, torch.Tensor]:
    recipe = from_dict(FGSM)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    model = create_model(recipe.model.arch, 10)
    objective = build_objective(recipe.method, labels=labels, num_classes=10, start_epoch=1, model=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    accelerator = Accelerator(cpu=True)
    return StepParts(model, model, objective, optimizer, accelerator, recipe), ImageSet(images, labels, []), labels


def states(parts: StepParts) -> list[dict]:
    return [copy.deepcopy(item.state_dict()) for item in (parts.model, parts.optimizer, parts.objective)]


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_good_good_collapse_restores_the_last_good_check(monkeypatch):
    parts, held_out, labels = tiny_parts()
    assert parts.attack is parts.recipe.attack  # the recipe's by default
    given = parts.recipe.attack
    scripted(monkeypatch, [20.0, 30.0, 12.0])  # 12 < 0.5 x 30: a collapse
    state = RunState()
    guard = OverfittingGuard(parts, held_out, [parts.model, parts.optimizer, parts.objective], state)
    saved = {}
    for step in range(1, 7):
        train_step(parts, held_out.images[:16], labels[:16], torch.arange(16), epoch=1, lr=0.1)
        state.global_step = step
        if step == 4:
            saved = states(parts)  # what the second check (good) keeps
        guard.on_step_end(state, None)
        assert len(state.guard_events) == (step == 6)
    assert_same(states(parts), saved)
    assert parts.attack == fallback_attack(given, 2) and parts.recipe.attack is given and given.steps == 1
    assert parts.attack.steps == 2 and parts.attack.step_size == Fraction(5, 4) * given.eps
    assert parts.attack.random_start and parts.attack.project and parts.attack.noise == 1.0
    assert state.guard_events == [{"step": 6, "epoch": 1, "accuracy": 12.0, "best": 30.0, "restored_step": 4,
                                   "fallback_steps": 2}]
    assert state.guard_best == 30.0 and state.guard_check == {"step": 6, "accuracy": 12.0}
    assert guard.epoch_metrics(state, 4) == {"guard_pgd2_acc": 12.0, "guard_rollbacks": 1}
    assert guard.epoch_metrics(state, 6) == {"guard_rollbacks": 1}  # no check in an epoch that began after step 6

    restored = RunState()
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))  # as a checkpoint's state.json
    parts_again, _, _ = tiny_parts()
    OverfittingGuard(parts_again, held_out, [parts_again.model], restored)
    assert parts_again.attack == parts.attack  # a resumed run trains on with the fallback


def test_patience_waits_for_checks_in_a_row(monkeypatch):
    """`guard.patience: 2`: one check below the threshold is neither kept nor acted on; a passing one resets the
    count; two in a row roll back to the last passing check."""
    parts, held_out, labels = tiny_parts()
    parts.recipe.guard.patience = 2
    scripted(monkeypatch, [30.0, 12.0, 31.0, 12.0, 10.0])
    state = RunState()
    guard = OverfittingGuard(parts, held_out, [parts.model, parts.optimizer, parts.objective], state)
    for step in range(1, 11):
        train_step(parts, held_out.images[:16], labels[:16], torch.arange(16), epoch=1, lr=0.1)
        state.global_step = step
        if step == 6:
            saved = states(parts)  # the third check passes: the last kept
        guard.on_step_end(state, None)
        assert len(state.guard_events) == (step == 10), step
    assert_same(states(parts), saved)
    assert state.guard_events[0]["restored_step"] == 6 and state.guard_best == 31.0


def test_no_collapse_before_a_best_and_a_collapse_with_nothing_to_restore(monkeypatch):
    parts, held_out, _ = tiny_parts()
    scripted(monkeypatch, [0.0, 0.0, 5.0, 2.0])
    state = RunState()
    guard = OverfittingGuard(parts, held_out, [parts.model], state)
    for step in (2, 4, 6):  # 0% is no best: nothing is a collapse below it
        state.global_step = step
        guard.on_step_end(state, None)
    assert not state.guard_events and state.guard_best == 5.0
    resumed = OverfittingGuard(parts, held_out, [parts.model], state)  # a resume: no snapshot in memory
    weights = states(parts)[0]
    state.global_step = 8
    resumed.on_step_end(state, None)
    assert state.guard_events[0]["restored_step"] is None and parts.attack.steps == 2
    assert_same(states(parts)[0], weights)


def test_the_check_is_the_evaluators_pgd_and_draws_no_training_randomness():
    parts, held_out, _ = tiny_parts()
    guard = OverfittingGuard(parts, held_out, [parts.model], RunState())
    parts.model.train()
    torch.manual_seed(1)
    accuracy = guard.check()
    after = torch.rand(1)
    torch.manual_seed(1)
    correct = attack_correct(parts.model, to_float(held_out.images[:16], 32), held_out.labels[:16], attack="pgd2",
                             eps=parts.recipe.eval_eps)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(1))  # the check drew nothing from the global generator
    assert accuracy == 100 * correct.float().mean().item() and parts.model.training


# ---- whole runs: tests/conftest.py's tiny dataset, 4 steps an epoch ---------------------------------------------

def run_train(base: dict, dataset: Path, output_dir: Path, *overrides: str) -> Path:
    return train(from_dict(base, [f"data.dataset={dataset}", f"run.output_dir={output_dir}", *overrides]),
                 command="pytest")


@pytest.fixture
def attacks(monkeypatch) -> list[int]:
    """The steps of each training attack run."""
    from sglr_zoo import loop

    seen, pgd = [], loop.pgd
    monkeypatch.setattr(loop, "pgd", lambda *args, **kwargs: seen.append(kwargs["steps"]) or pgd(*args, **kwargs))
    return seen


def test_a_run_rolls_back_at_a_collapse_and_trains_on(tmp_path, tiny_dataset, monkeypatch, attacks):
    from sglr_zoo.cards import _guard_text

    left = scripted(monkeypatch, [20.0, 30.0, 10.0, 25.0])  # checks after steps 2, 4, 6, 8: a collapse at 6
    run = run_train(FGSM, tiny_dataset, tmp_path)
    assert not left and attacks == [1] * 6 + [2] * 2  # the fallback from step 7 on
    event = {"step": 6, "epoch": 2, "accuracy": 10.0, "best": 30.0, "restored_step": 4, "fallback_steps": 2}
    info = json.loads((run / "run.json").read_text())
    assert info["last_epoch"] == 2
    assert info["guard"] == {"enabled": True, "every": 2, "n": 16, "steps": 2, "drop": 0.5, "patience": 1,
                             "fallback_steps": 2,
                             "best": 30.0, "events": [event]}
    state = json.loads((run / "checkpoints" / "epoch_0002" / "state.json").read_text())
    assert state["guard_events"] == [event] and state["guard_best"] == 30.0
    rows = read_metrics(run)
    assert [(r["guard_pgd2_acc"], r["guard_rollbacks"]) for r in rows] == [("30.0", "0"), ("25.0", "1")]
    assert list(rows[0]) == metric_columns(from_dict(FGSM))
    assert _guard_text(info["guard"]) == ("on (PGD-2 on 16 held-out images every 2 steps); at step 6 (PGD-2 accuracy "
                                          "10.0% < 0.5 x the best 30.0%) rolled back to step 4; trained on with PGD-2")


def test_a_guard_that_never_acts_changes_nothing(tmp_path, tiny_dataset):
    """Real checks after every second step, none a collapse: the run is bit for bit the unguarded one."""
    guarded = run_train(FGSM, tiny_dataset, tmp_path / "a", "data.val_size=16")
    unguarded = run_train(FGSM, tiny_dataset, tmp_path / "b", "data.val_size=16", "guard.enabled=false")
    info = json.loads((guarded / "run.json").read_text())
    assert info["guard"]["events"] == [] and info["guard"]["best"] is not None
    assert json.loads((unguarded / "run.json").read_text())["guard"] == {"enabled": False}
    for which in ("last", "best"):
        assert (guarded / which / "model.safetensors").read_bytes() == (unguarded / which / "model.safetensors").read_bytes()
    timing = {"img_per_s", "epoch_s"}
    rows, plain = read_metrics(guarded), read_metrics(unguarded)
    assert all(row["guard_pgd2_acc"] != "" for row in rows) and "guard_rollbacks" not in plain[0]
    assert [{k: v for k, v in row.items() if k not in timing and not k.startswith("guard_")} for row in rows] == [
        {k: v for k, v in row.items() if k not in timing} for row in plain]


def test_a_resumed_run_trains_on_with_the_fallback(tmp_path, tiny_dataset, monkeypatch, attacks):
    scripted(monkeypatch, [20.0, 30.0, 10.0])
    run = RunDir(run_train(FGSM, tiny_dataset, tmp_path, "run.max_steps=6"))  # stopped right after the rollback
    assert attacks == [1] * 6
    attacks.clear()
    scripted(monkeypatch, [25.0])
    run_train(FGSM, tiny_dataset, tmp_path)
    assert attacks == [2, 2]
    info = json.loads(run.run_info.read_text())
    assert [e["step"] for e in info["guard"]["events"]] == [6] and info["guard"]["best"] == 30.0
    assert [r["guard_rollbacks"] for r in read_metrics(run.root)] == ["0", "1"]


def test_auto_is_single_step_adversarial_training():
    assert from_dict(FGSM).guarded
    assert not from_dict(FGSM, ["guard.enabled=auto", "attack.steps=2"]).guarded
    assert not from_dict(FGSM, ["attack.eps=0"]).guarded
    assert not from_dict(FGSM, ["guard.enabled=false"]).guarded
    assert from_dict(FGSM, ["guard.enabled=true", "attack.steps=10"]).guarded
    assert metric_columns(from_dict(FGSM, ["guard.enabled=false"])) == metric_columns(from_dict(FGSM, ["attack.steps=2"]))


@pytest.mark.parametrize("override, error", [
    ("guard.drop=1.5", "guard.drop: must be in (0, 1)"),
    ("guard.every=0", "guard.every: must be >= 1"),
    ("guard.n=0", "guard.n: must be >= 1"),
    ("guard.steps=1", "guard.steps: must be >= 2"),
    ("guard.fallback_steps=1", "guard.fallback_steps: must be >= 2"),
    ("guard.enabled=maybe", "guard.enabled"),
])
def test_bad_guard_settings_name_the_key(override, error):
    with pytest.raises(UserError, match=error.replace("(", r"\(").replace(")", r"\)")):
        from_dict(FGSM, [override])


def test_a_forced_guard_needs_an_attack():
    with pytest.raises(UserError, match=r"guard.enabled: needs adversarial training \(attack.eps > 0\)"):
        from_dict(FGSM, ["guard.enabled=true", "attack.eps=0"])


GOOD_EVENT = {"step": 6, "epoch": 2, "accuracy": 10.0, "best": 30.0, "restored_step": 4, "fallback_steps": 2}


@pytest.mark.parametrize("change, error", [
    ({"guard_best": float("nan")}, "guard_best is nan, not a finite number"),
    ({"guard_check": {"step": 2}}, "guard_check is {'step': 2}, not {} or a step and an accuracy"),
    ({"guard_events": [{**GOOD_EVENT, "step": -1}]}, "guard_events is [{'step': -1"),
    ({"guard_events": [{**GOOD_EVENT, "rm": 1}]}, "not a list of rollbacks"),
    ({"guard_events": [{**GOOD_EVENT, "restored_step": "4"}]}, "not a list of rollbacks"),
    ({"guard_events": GOOD_EVENT}, "not a list of rollbacks"),
    ({"history": [{"epoch": 1, "guard_x": 1.0}]}, "history row 1's column is 'guard_x', not a metrics.csv column"),
])
def test_a_bad_guard_record_is_refused(change, error):
    good = {"epoch": 1, "global_step": 4, "best_epoch": 0, "best_val_pgd": -1.0, "history": [],
            "guard_best": 30.0, "guard_check": {"step": 6, "accuracy": 10.0},
            "guard_events": [GOOD_EVENT, {**GOOD_EVENT, "restored_step": None}]}
    RunState().load_state_dict(good)
    with pytest.raises(ValueError) as info:
        RunState().load_state_dict({**good, **change})
    assert error in str(info.value)
