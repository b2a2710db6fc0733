"""The time budget's arithmetic: durations, where a step falls in the lr schedule, how many steps fit."""

from __future__ import annotations

import csv
import json
import math
import time

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from sglr_zoo import training
from sglr_zoo.errors import UserError
from sglr_zoo.recipe import from_dict, load_recipe
from sglr_zoo.schedule import BudgetPlan, epoch_progress, parse_budget, plan_budget
from sglr_zoo.training import train

DURATIONS = [(480, 480.0), (2.5, 2.5), ("480", None), ("480s", 480.0), ("8m", 480.0), ("1.5h", 5400.0),
             ("1h30m", 5400.0), ("1m 30s", 90.0), ("8 m", 480.0), ("8", None), ("m", None), ("8d", None),
             ("-8m", None), (0, None), ("0s", None), (True, None), ("eight minutes", None)]


@pytest.mark.parametrize("value, seconds", DURATIONS)
def test_parse_budget(value, seconds):
    if seconds is None:
        with pytest.raises(ValueError, match="duration"):
            parse_budget(value)
    else:
        assert parse_budget(value) == seconds


@pytest.mark.parametrize("schedule, message", [
    ({"budget": "8m", "name": "onecycle"}, None),
    ({"budget": 480, "name": "cosine"}, None),
    ({"budget": "8 minutes", "name": "onecycle"}, "schedule.budget: expected a duration"),
    ({"budget": "8m", "name": "multistep"}, "schedule.budget: needs a cosine, onecycle or constant"),
    ({"steps": 0}, "schedule.steps: must be >= 1"),
    ({"budget": "8m", "name": "onecycle", "warmup_epochs": 1}, "schedule.warmup_epochs: must be 0 with a budget"),
    ({"steps": 10, "first_steps": 20, "replanned_at": 3}, None),
    ({"steps": 10, "first_steps": 20}, "schedule.replanned_at: is written by a budgeted run"),
    ({"first_steps": 20, "replanned_at": 3}, "schedule.replanned_at: is written by a budgeted run"),
    ({"steps": 10, "first_steps": 20, "replanned_at": 10}, "schedule.replanned_at: is written by a budgeted run"),
])
def test_recipe_budget_fields(schedule, message):
    if message is None:
        assert from_dict({"schedule": schedule}).schedule.budget == schedule.get("budget")
    else:
        with pytest.raises(UserError, match=message):
            from_dict({"schedule": schedule})


@pytest.mark.parametrize("epochs, steps_per_epoch", [(3, 391), (200, 390), (1, 7)])
def test_epoch_progress_without_steps_is_the_epoch_fraction(epochs, steps_per_epoch):
    for global_step in (0, 1, steps_per_epoch - 1, steps_per_epoch, epochs * steps_per_epoch - 1):
        epoch, step = divmod(global_step, steps_per_epoch)
        expected = epoch + step / steps_per_epoch
        assert epoch_progress(epochs, None, global_step, steps_per_epoch) == pytest.approx(expected)


def test_epoch_progress_with_steps_spans_exactly_those_steps():
    """812 steps over 3 epochs of 391: the schedule starts at 0 and reaches its end (3 epochs) at step 812."""
    progress = [epoch_progress(3, 812, step, 391) for step in range(813)]
    assert progress[0] == 0 and progress[-1] == pytest.approx(3.0)
    assert all(a < b for a, b in zip(progress, progress[1:]))


def test_epoch_progress_after_a_replan_continues_the_first_plan():
    """A plan of 500 steps over 2 epochs, re-planned at step 50 to 800 steps over 3: the first 50 steps follow the
    first plan's pace, then the rest of the schedule is stretched without a jump to end at step 800."""
    first = [epoch_progress(2, 500, step, 391) / 2 for step in range(51)]
    replanned = [epoch_progress(3, 800, step, 391, replan=(50, 500)) / 3 for step in range(801)]
    assert replanned[:50] == pytest.approx(first[:50])
    assert replanned[50] == pytest.approx(first[50])  # continuous at the switch: 10% of the schedule done
    assert replanned[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(replanned, replanned[1:]))


def test_plan_budget_counts_the_steps_done():
    """Re-planning after 50 steps: 480 - 100 spent - 30 final - 2 x 10 monitoring = 330 s = 660 more steps."""
    plan = plan_budget(480, 100, step_s=0.5, steps_per_epoch=391, monitor_s=10, monitor_every=1, final_s=30,
                       done_steps=50, margin=0.0)
    assert (plan.steps, plan.epochs, plan.train_s) == (710, 2, 330)
    late = plan_budget(480, 470, step_s=0.5, steps_per_epoch=391, monitor_s=10, monitor_every=1, final_s=30,
                       done_steps=50)
    assert late.steps == 50  # nothing more fits


def test_plan_budget_fills_the_time_left():
    plan = plan_budget(480, 40, step_s=0.5, steps_per_epoch=391, monitor_s=10, monitor_every=1, final_s=30,
                       margin=0.0)
    # 480 - 40 - 30 = 410 s: 3 epochs' monitoring (30 s) leaves 380 s = 760 steps, which need 2 epochs only; with
    # 2 monitoring passes (20 s) 390 s = 780 steps need 2 epochs: consistent.
    assert (plan.steps, plan.epochs) == (780, 2)
    assert plan.train_s + plan.monitor_s + plan.final_s + 40 <= 480


@pytest.mark.parametrize("budget, elapsed, step_s, spe, monitor_s, every, final_s", [
    (480, 40, 0.5, 391, 10, 1, 30),
    (600, 100, 1.4, 313, 25, 1, 80),
    (36000, 60, 2.0, 390, 60, 5, 300),
    (60, 5, 0.01, 4, 0.5, 1, 2),
    (100, 10, 0.3, 50, 3, 2, 10),
])
def test_plan_budget_never_exceeds_the_budget(budget, elapsed, step_s, spe, monitor_s, every, final_s):
    plan = plan_budget(budget, elapsed, step_s=step_s, steps_per_epoch=spe, monitor_s=monitor_s, monitor_every=every,
                       final_s=final_s)
    assert plan.steps >= 1 and plan.epochs == math.ceil(plan.steps / spe)
    predicted = elapsed + plan.steps * step_s + plan.monitor_s + final_s
    assert predicted <= budget
    assert predicted + step_s + monitor_s > budget * 0.95 - 1e-9  # and leaves no more than the margin unused
    assert plan.monitor_s == monitor_s * (plan.epochs // every + (plan.epochs % every != 0))


def test_plan_budget_with_no_time_left_plans_nothing():
    plan = plan_budget(60, 50, step_s=1.0, steps_per_epoch=10, monitor_s=5, monitor_every=1, final_s=10)
    assert plan.steps == 0


# ---- the trainer with a budget ----------------------------------------------------------------------------------

def budget_recipe(dataset, output_dir, *overrides: str):
    """The tiny model on 64 images (4 steps of 16 per epoch), sized by a budget."""
    return from_dict({
        "data": {"dataset": str(dataset)}, "model": {"arch": "preactresnet_tiny_cifar"}, "attack": {"steps": 1},
        "method": {"name": "sglr", "start_epoch": 0.5}, "schedule": {"name": "onecycle", "budget": "8s"},
        "eval": {"n": 8, "steps": 1, "batch_size": 8, "final_attacks": ["clean"], "final_n": 8},
        "run": {"output_dir": str(output_dir), "name": "run", "batch_size": 16, "mixed_precision": "no",
                "channels_last": False, "threads": 1}}, list(overrides))




def test_step_time_is_the_median_after_a_warm_up():
    """A slow first call (compilation) and one call slowed by another program do not count."""
    delays = iter([0.3, 0.02, 0.02, 0.3, 0.02, 0.02])
    seconds = training.median_step_seconds(lambda: time.sleep(next(delays)), torch.device("cpu"))
    assert 0.02 <= seconds < 0.1 and next(delays, None) is None


def test_budget_run_is_repeated_by_its_resolved_recipe(tmp_path, tiny_dataset, fresh_accelerate, capsys, monkeypatch):
    """The calibration runs for real; the plan is fixed (6 steps: a full epoch of 4 and one cut at 2), so that the
    test does not depend on the machine's speed."""
    planned = []

    def plan(*args, **kwargs) -> BudgetPlan:
        planned.append(plan_budget(*args, **kwargs))  # the real arithmetic on the measured times
        return BudgetPlan(steps=6, epochs=2, train_s=1.0, monitor_s=1.0, final_s=1.0)

    monkeypatch.setattr(training, "plan_budget", plan)
    run_dir = train(budget_recipe(tiny_dataset, tmp_path / "a"))
    assert "schedule.budget: budget 8 s:" in capsys.readouterr().out
    assert planned and planned[0].final_s > 0 and planned[0].monitor_s > 0
    resolved = load_recipe(run_dir / "recipe.yaml")
    steps, epochs = resolved.schedule.steps, resolved.schedule.epochs
    assert resolved.schedule.budget is None and (steps, epochs) == (6, 2)
    assert json.loads((run_dir / "finished.json").read_text())["global_step"] == steps
    with (run_dir / "metrics.csv").open() as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, epochs + 1))

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    rerun = train(from_dict(resolved.to_dict(), [f"run.output_dir={tmp_path / 'b'}"]))
    first, second = load_file(run_dir / "last" / "model.safetensors"), load_file(rerun / "last" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("start, replanned_steps, epochs, start_epoch", [
    (0.5, 10, 3, 2),  # fewer epochs: refined labels from round(0.5 x 3) = 2
    (0.5, 25, 7, 4),  # more epochs than the first plan's 6
    (0.1, 10, 3, 1),  # the first plan's start, epoch 1, has begun: it stays
])
def test_a_replanned_run_is_repeated_by_its_resolved_recipe(tmp_path, tiny_dataset, fresh_accelerate, monkeypatch,
                                                             capsys, start, replanned_steps, epochs, start_epoch):
    """The first plan (24 steps = 6 epochs of 4) is fixed; after 3 steps (a tenth, rounded up) the run plans again
    from its measured speed, to a fixed number here so that the test does not depend on the machine's speed."""
    calls = []

    def plan(*args, **kwargs) -> BudgetPlan:
        calls.append(plan_budget(*args, **kwargs))  # the real arithmetic on the measured times
        steps = 24 if len(calls) == 1 else replanned_steps
        return BudgetPlan(steps=steps, epochs=math.ceil(steps / 4), train_s=1.0, monitor_s=1.0, final_s=1.0)

    monkeypatch.setattr(training, "plan_budget", plan)
    run_dir = train(budget_recipe(tiny_dataset, tmp_path / "a", f"method.start_epoch={start}", "schedule.budget=10m"))
    assert "re-planned after 3 steps" in capsys.readouterr().out
    assert len(calls) == 2 and calls[1].train_s > 0 and calls[1].steps > 3
    resolved = load_recipe(run_dir / "recipe.yaml")
    assert (resolved.schedule.steps, resolved.schedule.epochs) == (replanned_steps, epochs)
    assert (resolved.schedule.first_steps, resolved.schedule.replanned_at) == (24, 3)
    assert resolved.method.start_epoch == start_epoch and resolved.schedule.budget is None
    assert json.loads((run_dir / "finished.json").read_text())["global_step"] == replanned_steps
    with (run_dir / "metrics.csv").open() as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, epochs + 1))

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    rerun = train(from_dict(resolved.to_dict(), [f"run.output_dir={tmp_path / 'b'}"]))
    first, second = load_file(run_dir / "last" / "model.safetensors"), load_file(rerun / "last" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert len(calls) == 2  # the rerun planned nothing


def test_a_replanned_run_resumes_with_both_plans(tmp_path, tiny_dataset, fresh_accelerate, monkeypatch):
    """Stopped after 8 steps (run.max_steps, the end of epoch 2) and resumed with its first recipe: the resumed run keeps the plans its
    resolved recipe records and ends with the weights of the run that was never stopped."""
    def plan(*args, **kwargs) -> BudgetPlan:
        steps = 10 if kwargs.get("done_steps") else 24  # the first plan, then the second
        return BudgetPlan(steps=steps, epochs=math.ceil(steps / 4), train_s=1.0, monitor_s=1.0, final_s=1.0)

    monkeypatch.setattr(training, "plan_budget", plan)
    whole = train(budget_recipe(tiny_dataset, tmp_path, "run.name=whole", "schedule.budget=10m"))
    for max_steps in (8, None):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        resumed = train(budget_recipe(tiny_dataset, tmp_path, "run.name=resumed", "schedule.budget=10m",
                                      f"run.max_steps={max_steps or 'null'}"))
    kept, planned = load_recipe(resumed / "recipe.yaml"), load_recipe(whole / "recipe.yaml")
    assert (kept.schedule, kept.method) == (planned.schedule, planned.method) and kept.schedule.replanned_at == 3
    first, second = load_file(whole / "last" / "model.safetensors"), load_file(resumed / "last" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("overrides, message", [
    (["eval.final_attacks=[clean, autoattack]"], "AutoAttack's time cannot be predicted"),
    (["method.start_epoch=2"], "method.start_epoch: with schedule.budget"),
    (["schedule.budget=1s"], "schedule.budget: 1s leaves no time to train"),
    (["schedule.steps=5", "schedule.budget=null", "schedule.epochs=1"],
     "schedule.steps: 5 steps of 4 per epoch take 2"),
])
def test_budget_mistakes_are_user_errors(tmp_path, tiny_dataset, fresh_accelerate, overrides, message):
    with pytest.raises(UserError, match=message):
        train(budget_recipe(tiny_dataset, tmp_path, *overrides))
