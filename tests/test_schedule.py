"""The time budget's arithmetic: durations, where a step falls in the lr schedule, how many steps fit."""

from __future__ import annotations

import csv
import json
import math
import time

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from sglr_zoo import training
from sglr_zoo.errors import UserError
from sglr_zoo.objectives import PGDAT
from sglr_zoo.recipe import from_dict, load_recipe
from sglr_zoo.rundir import RunDir
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
    ({"steps": 10, "plans": [[0, 20], [3, 12], [6, 10]]}, None),
    ({"steps": 10, "plans": [[0, 20], [3, 12]]}, "schedule.plans: is written by a budgeted run"),  # not at steps
    ({"plans": [[0, 20]]}, "schedule.plans: is written by a budgeted run"),
    ({"steps": 10, "plans": [[1, 20], [3, 10]]}, "schedule.plans: is written by a budgeted run"),
    ({"steps": 10, "plans": [[0, 20], [3, 12], [12, 10]]}, "schedule.plans: is written by a budgeted run"),
    ({"steps": 10, "plans": [[0, 20], [6, 12], [3, 10]]}, "schedule.plans: is written by a budgeted run"),
    ({"steps": 10, "plans": [[0, 20, 1], [3, 10]]}, "schedule.plans: is written by a budgeted run"),
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


def test_epoch_steps_are_cut_at_the_planned_end():
    """The progress bar's total: a budget's last epoch of 391 batches that ends at step 812 runs 30 of them."""
    recipe = from_dict({"schedule": {"epochs": 3, "steps": 812, "milestones": []}, "method": {"start_epoch": 0.5}})
    assert [training.epoch_steps(recipe, first, 391) for first in (0, 391, 782)] == [391, 391, 30]
    recipe.run.max_steps = 800
    assert training.epoch_steps(recipe, 782, 391) == 18


def test_epoch_progress_follows_each_plan_from_where_the_last_left_off():
    """Planned for 500 steps over 2 epochs, again at step 50 for 800 over 3, again at step 400 for 700: each plan
    keeps the pace of the one before up to its first step, then stretches the rest of the schedule to its end."""
    plans = [[0, 500], [50, 800], [400, 700]]
    fraction = [epoch_progress(2, 700, step, 391, plans) / 2 for step in range(701)]
    assert fraction[:51] == pytest.approx([step / 500 for step in range(51)])  # continuous at step 50: 10% done
    assert fraction[400] == pytest.approx(0.1 + 0.9 * 350 / 750)  # the second plan's pace up to step 400
    assert fraction[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(fraction, fraction[1:]))
    assert epoch_progress(2, 700, 123, 391, [[0, 700]]) == epoch_progress(2, 700, 123, 391)


def test_plan_budget_counts_the_steps_done():
    """Re-planning after 50 steps: 480 - 100 spent - 30 final - 2 x 10 monitoring = 330 s = 660 more steps. After
    400 steps the first epoch's monitoring is spent already: one pass is left."""
    plan = plan_budget(480, 100, step_s=0.5, steps_per_epoch=391, monitor_s=10, monitor_every=1, final_s=30,
                       done_steps=50, margin=0.0)
    assert (plan.steps, plan.epochs, plan.train_s, plan.monitor_s) == (710, 2, 330, 20)
    later = plan_budget(480, 300, step_s=0.5, steps_per_epoch=391, monitor_s=10, monitor_every=1, final_s=30,
                        done_steps=400, margin=0.0)
    assert (later.steps, later.epochs, later.monitor_s) == (680, 2, 10)
    at_the_end_of_an_epoch = plan_budget(480, 300, step_s=0.5, steps_per_epoch=391, monitor_s=10, monitor_every=1,
                                         final_s=30, done_steps=391, margin=0.0)
    assert at_the_end_of_an_epoch.monitor_s == 20  # its own monitoring is still to run
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
    printed = capsys.readouterr()
    assert "schedule.budget: budget 8 s:" in printed.out
    assert "epoch 1/200" not in printed.err  # no progress bar for the calibration's throwaway steps
    assert "epoch 1/2" in printed.err
    assert planned and planned[0].final_s > 0 and planned[0].monitor_s > 0
    resolved = load_recipe(run_dir / "recipe.yaml")
    steps, epochs = resolved.schedule.steps, resolved.schedule.epochs
    assert resolved.schedule.budget is None and (steps, epochs) == (6, 2)
    assert_finished(run_dir, steps, epochs)
    assert_same_weights(run_dir, rerun_in(tmp_path / "b", resolved))


def assert_finished(run_dir, steps: int, epochs: int) -> None:
    assert json.loads((run_dir / "finished.json").read_text())["global_step"] == steps
    with (run_dir / "metrics.csv").open() as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, epochs + 1))


def rerun_in(output_dir, resolved):
    """Trains a run's resolved recipe again, into `output_dir`, with a fresh Accelerate state."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train(from_dict(resolved.to_dict(), [f"run.output_dir={output_dir}"]))


def assert_same_weights(run_a, run_b) -> None:
    first, second = load_file(run_a / "last" / "model.safetensors"), load_file(run_b / "last" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def fixed_plans(calls: list[BudgetPlan], replans: dict[int, int]):
    """plan_budget for a test: the real arithmetic on the measured times, kept in `calls`, but the first plan is 24
    steps (6 epochs of 4; re-planned every 5 steps with REPLAN_EVERY 0.2) and the one made after step k is
    `replans[k]` steps, so that the test does not depend on the machine's speed."""
    def plan(*args, **kwargs) -> BudgetPlan:
        calls.append(plan_budget(*args, **kwargs))
        steps = replans[kwargs["done_steps"]] if kwargs.get("done_steps") else 24
        return BudgetPlan(steps=steps, epochs=math.ceil(steps / 4), train_s=1.0, monitor_s=1.0, final_s=1.0)
    return plan


@pytest.mark.parametrize("start, replans, plans, start_epoch", [
    (0.5, {5: 30, 10: 14}, [[0, 24], [5, 30], [10, 14]], 4),  # longer, then shorter: refined labels from epoch 4 of 4
    (0.1, {5: 30, 10: 14}, [[0, 24], [5, 30], [10, 14]], 1),  # refined labels from epoch 1: begun, so kept
    (0.5, {5: 26, 10: 26, 15: 26, 20: 26, 25: 26}, [[0, 24], [5, 26], [10, 26], [15, 26], [20, 26], [25, 26]], 4),
    (0.5, {5: 5}, [[0, 24], [5, 6]], 3),  # no time left: one more step ends the schedule; epoch 3 never comes
])
def test_a_replanned_run_is_repeated_by_its_resolved_recipe(tmp_path, tiny_dataset, fresh_accelerate, monkeypatch,
                                                             capsys, start, replans, plans, start_epoch):
    calls = []
    monkeypatch.setattr(training, "plan_budget", fixed_plans(calls, replans))
    monkeypatch.setattr(training, "REPLAN_EVERY", 0.2)
    run_dir = train(budget_recipe(tiny_dataset, tmp_path / "a", f"method.start_epoch={start}", "schedule.budget=10m"))
    assert "planned again after 5 steps" in capsys.readouterr().out
    assert len(calls) == len(plans) and all(plan.train_s > 0 and plan.steps > 5 for plan in calls[1:])
    resolved = load_recipe(run_dir / "recipe.yaml")
    steps, epochs = plans[-1][1], math.ceil(plans[-1][1] / 4)
    assert (resolved.schedule.steps, resolved.schedule.epochs, resolved.schedule.plans) == (steps, epochs, plans)
    assert resolved.method.start_epoch == start_epoch and resolved.schedule.budget is None
    assert_finished(run_dir, steps, epochs)
    assert_same_weights(run_dir, rerun_in(tmp_path / "b", resolved))
    assert len(calls) == len(plans)  # the rerun planned nothing


def test_planning_again_uses_the_latest_stretch_when_it_is_slower(tmp_path, tiny_dataset, fresh_accelerate,
                                                                    monkeypatch):
    """Steps of 1 s, then of 3 s: the run's mean (about 2 s) would hide the slowdown; the plan uses 3 s. Faster
    again: the mean is the slower, and is used."""
    step_times = [1.0] * 10 + [3.0] * 10 + [0.5] * 10
    clock = iter(torch.tensor([0.0, *step_times]).cumsum(0).tolist())
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    step_s = []

    def plan(*args, **kwargs) -> BudgetPlan:
        step_s.append(kwargs["step_s"])
        return BudgetPlan(steps=100, epochs=1, train_s=1.0, monitor_s=1.0, final_s=1.0)

    monkeypatch.setattr(training, "plan_budget", plan)
    recipe = budget_recipe(tiny_dataset, tmp_path, "schedule.budget=null", "schedule.steps=100", "schedule.epochs=1")
    replan = training.Replan(Accelerator(cpu=True), RunDir(tmp_path), budget_s=1000.0, started=0.0,
                             every=10, calibrated_step_s=1.0, monitor_s=0.0, final_s=0.0, steps_per_epoch=100,
                             start_fraction=None)
    replan.last_step_done = next(clock)
    for step in range(1, 31):
        replan.after_step(step, recipe, PGDAT())
    # The first step of an epoch is not timed (it follows monitoring): steps 2-10, 11-20 and 21-30 are.
    assert step_s == pytest.approx([1.0, 3.0, (9 * 1.0 + 10 * 3.0 + 10 * 0.5) / 29])


class Killed(Exception):
    pass


def test_a_run_killed_after_planning_again_resumes_with_every_plan(tmp_path, tiny_dataset, fresh_accelerate,
                                                                    monkeypatch):
    """Killed in epoch 3, after its plan at step 10 but before that epoch's checkpoint: the resumed run continues
    from epoch 2's checkpoint (which holds the plans up to step 5) with every plan, and ends with the weights of
    the run that was never killed."""
    monkeypatch.setattr(training, "plan_budget", fixed_plans([], {5: 30, 10: 14}))
    monkeypatch.setattr(training, "REPLAN_EVERY", 0.2)
    recipe = budget_recipe(tiny_dataset, tmp_path, "schedule.budget=10m")
    whole = train(from_dict(recipe.to_dict(), ["run.name=whole"]))
    monitor = training.monitor

    def killed_in_epoch_3(model, splits, recipe, accelerator):
        if (recipe.schedule.plans or [])[-1:] == [[10, 14]]:
            raise Killed
        return monitor(model, splits, recipe, accelerator)

    monkeypatch.setattr(training, "monitor", killed_in_epoch_3)
    for again in (False, True):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        if again:
            monkeypatch.setattr(training, "monitor", monitor)
            resumed = train(from_dict(recipe.to_dict(), ["run.name=resumed"]))
        else:
            with pytest.raises(Killed):
                train(from_dict(recipe.to_dict(), ["run.name=resumed"]))
    assert load_recipe(resumed / "recipe.yaml").schedule.plans == [[0, 24], [5, 30], [10, 14]]
    assert_same_weights(whole, resumed)


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
