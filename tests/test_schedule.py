"""The time budget's arithmetic: durations, where a step falls in the lr schedule, how many steps fit."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from sglr_zoo import budget, training
from sglr_zoo.errors import UserError
from sglr_zoo.loop import epoch_steps, train_step
from sglr_zoo.recipe import Recipe, from_dict, load_recipe, save_recipe
from sglr_zoo.schedule import BudgetPlan, Plan, Plans, epoch_progress, parse_budget, plan_budget
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
    ({"budget": "8m", "name": "onecycle", "plans": "runs/x/plans.json"}, None),  # repeats those plans
    ({"plans": " "}, "schedule.plans: give a run's plans.json"),
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
    assert [epoch_steps(first, 391, None, 812) for first in (0, 391, 782)] == [391, 391, 30]
    assert epoch_steps(782, 391, 800, 812) == 18  # run.max_steps first
    assert epoch_steps(782, 391, None, None) == 391


def test_plans_are_values_read_at_each_step():
    """The plan in force at a step is the last one made at or before it; plans that do not follow each other, or
    a plans file made for other data, are refused."""
    plans = Plans([Plan(made_at=0, epochs=6, steps=24, start_epoch=3)], steps_per_epoch=4)
    plans.add(Plan(made_at=5, epochs=8, steps=30, start_epoch=4))
    assert [plans.in_force(step).made_at for step in (0, 4, 5, 29)] == [0, 0, 5, 5]
    assert plans.progress(3) == epoch_progress(6, 24, 3, 4) and plans.progress(7) == epoch_progress(
        8, 30, 7, 4, [[0, 24], [5, 30]])
    for late in (Plan(made_at=5, epochs=8, steps=30, start_epoch=4), Plan(made_at=31, epochs=9, steps=33, start_epoch=4),
                 Plan(made_at=9, epochs=3, steps=None, start_epoch=4)):
        with pytest.raises(ValueError, match="does not follow"):
            plans.add(late)
    with pytest.raises(ValueError, match="a plan holds counts"):
        Plan.from_dict({"made_at": -1, "epochs": 1, "steps": 2, "start_epoch": 1})
    recipe = from_dict({"schedule": {"epochs": 4, "steps": 14, "plans": [[0, 24], [5, 30], [10, 14]], "name": "cosine"},
                        "method": {"start_epoch": 0.5}})
    assert Plans.of_recipe(recipe.schedule, 0.5, 4).all == [Plan(0, 6, 24, 2), Plan(5, 8, 30, 2), Plan(10, 4, 14, 2)]
    assert Plans.of_recipe(from_dict({}).schedule, 90, 4).all == [Plan(0, 200, None, 90)]


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
    seconds = budget.median_step_seconds(lambda: time.sleep(next(delays)), torch.device("cpu"))
    assert 0.02 <= seconds < 0.1 and next(delays, None) is None


def test_budget_run_is_repeated_by_its_plans(tmp_path, tiny_dataset, fresh_accelerate, capsys, monkeypatch):
    """The calibration runs for real; the plan is fixed (6 steps: a full epoch of 4 and one cut at 2), so that the
    test does not depend on the machine's speed."""
    planned = []

    def plan(*args, **kwargs) -> BudgetPlan:
        planned.append(plan_budget(*args, **kwargs))  # the real arithmetic on the measured times
        return BudgetPlan(steps=6, epochs=2, train_s=1.0, monitor_s=1.0, final_s=1.0)

    monkeypatch.setattr(budget, "plan_budget", plan)
    recipe = budget_recipe(tiny_dataset, tmp_path / "a")
    run_dir = train(recipe)
    printed = capsys.readouterr()
    assert "schedule.budget: budget 8 s:" in printed.out and f"schedule.plans={run_dir / 'plans.json'}" in printed.out
    assert "epoch 1/200" not in printed.err  # no progress bar for the calibration's throwaway steps
    assert "epoch 1/2" in printed.err
    assert planned and planned[0].final_s > 0 and planned[0].monitor_s > 0
    assert load_recipe(run_dir / "recipe.yaml").to_dict() == recipe.to_dict()  # the budget, as given
    assert plans_of(run_dir) == [Plan(made_at=0, epochs=2, steps=6, start_epoch=1)]
    assert json.loads((run_dir / "run.json").read_text())["plans"] == Plans(plans_of(run_dir), 4).to_list()
    assert_finished(run_dir, 6, 2)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(UserError, match="already finished"):  # its plan is done, though the recipe says 200 epochs
        train(recipe)
    assert_same_weights(run_dir, rerun_in(tmp_path / "b", run_dir))
    assert len(planned) == 1  # the rerun planned nothing


def plans_of(run_dir) -> list[Plan]:
    return [Plan(**plan) for plan in json.loads((run_dir / "plans.json").read_text())["plans"]]


def assert_finished(run_dir, steps: int, epochs: int) -> None:
    assert json.loads((run_dir / "finished.json").read_text())["global_step"] == steps
    with (run_dir / "metrics.csv").open() as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, epochs + 1))


def rerun_in(output_dir, run_dir):
    """Trains a run's recipe again with its plans (`schedule.plans=RUN/plans.json`), into `output_dir`, with a
    fresh Accelerate state."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train(load_recipe(run_dir / "recipe.yaml", [f"run.output_dir={output_dir}",
                                                       f"schedule.plans={run_dir / 'plans.json'}"]))


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
def test_a_replanned_run_is_repeated_by_its_plans(tmp_path, tiny_dataset, fresh_accelerate, monkeypatch, capsys,
                                                  start, replans, plans, start_epoch):
    """Each plan is recorded in plans.json; the recipe given to train() and RUN/recipe.yaml never change while the
    run plans again; rerunning the recipe with its plans repeats every plan and the weights."""
    calls, recipe_files = [], []
    monkeypatch.setattr(budget, "plan_budget", fixed_plans(calls, replans))
    monkeypatch.setattr(budget, "REPLAN_EVERY", 0.2)
    monitor = training.monitor

    def reading_the_recipe_file(model, splits, recipe, accelerator):  # after each epoch, plans made meanwhile
        recipe_files.append((tmp_path / "a" / "run" / "recipe.yaml").read_bytes())
        return monitor(model, splits, recipe, accelerator)

    monkeypatch.setattr(training, "monitor", reading_the_recipe_file)
    recipe = budget_recipe(tiny_dataset, tmp_path / "a", f"method.start_epoch={start}", "schedule.budget=10m")
    given = recipe.to_dict()
    run_dir = train(recipe)
    assert "planned again after 5 steps" in capsys.readouterr().out
    assert len(calls) == len(plans) and all(plan.train_s > 0 and plan.steps > 5 for plan in calls[1:])
    assert recipe.to_dict() == given  # the recipe object is never changed
    save_recipe(recipe, tmp_path / "given.yaml")
    assert set(recipe_files) == {(run_dir / "recipe.yaml").read_bytes()} == {(tmp_path / "given.yaml").read_bytes()}
    made = plans_of(run_dir)
    assert [[plan.made_at, plan.steps] for plan in made] == plans and made[-1].start_epoch == start_epoch
    steps, epochs = plans[-1][1], math.ceil(plans[-1][1] / 4)
    assert made[-1].epochs == epochs
    assert_finished(run_dir, steps, epochs)
    monkeypatch.setattr(training, "monitor", monitor)
    assert_same_weights(run_dir, rerun_in(tmp_path / "b", run_dir))
    assert len(calls) == len(plans)  # the rerun planned nothing
    assert plans_of(tmp_path / "b" / "run") == made


def test_planning_again_uses_the_latest_stretch_when_it_is_slower(tmp_path, tiny_dataset, fresh_accelerate,
                                                                    monkeypatch):
    """Steps of 1 s, then of 3 s: the run's mean (about 2 s) would hide the slowdown; the plan uses 3 s. Faster
    again: the mean is the slower, and is used."""
    step_times = [1.0] * 10 + [3.0] * 10 + [0.5] * 10
    clock = iter(torch.tensor([0.0, *step_times]).cumsum(0).tolist())
    monkeypatch.setattr(budget.time, "perf_counter", lambda: next(clock))
    step_s = []

    def plan(*args, **kwargs) -> BudgetPlan:
        step_s.append(kwargs["step_s"])
        return BudgetPlan(steps=100, epochs=1, train_s=1.0, monitor_s=1.0, final_s=1.0)

    monkeypatch.setattr(budget, "plan_budget", plan)
    plans = Plans([Plan(made_at=0, epochs=1, steps=100, start_epoch=1)], steps_per_epoch=100)
    replan = budget.Replanner(Accelerator(cpu=True), plans, path=None, budget_s=1000.0, started=0.0, every=10,
                              calibrated_step_s=1.0, monitor_s=0.0, final_s=0.0, monitor_every=1, start_fraction=None)
    replan.last_step_done = next(clock)
    for step in range(1, 31):
        replan.after_step(step)
    # The first step of an epoch is not timed (it follows monitoring): steps 2-10, 11-20 and 21-30 are.
    assert step_s == pytest.approx([1.0, 3.0, (9 * 1.0 + 10 * 3.0 + 10 * 0.5) / 29])
    assert [plan.made_at for plan in plans.all] == [0, 10, 20, 30]


class Killed(Exception):
    pass


def test_a_run_killed_after_planning_again_resumes_with_every_plan(tmp_path, tiny_dataset, fresh_accelerate,
                                                                    monkeypatch):
    """Killed in epoch 3, after its plan at step 10 but before that epoch's checkpoint: the resumed run continues
    from epoch 2's checkpoint (which holds the plans up to step 5) with every plan, and ends with the weights of
    the run that was never killed."""
    monkeypatch.setattr(budget, "plan_budget", fixed_plans([], {5: 30, 10: 14}))
    monkeypatch.setattr(budget, "REPLAN_EVERY", 0.2)
    recipe = budget_recipe(tiny_dataset, tmp_path, "schedule.budget=10m")
    whole = train(from_dict(recipe.to_dict(), ["run.name=whole"]))
    monitor = training.monitor

    def killed_in_epoch_3(model, splits, recipe, accelerator):
        if plans_of(tmp_path / "resumed")[-1].made_at == 10:
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
    assert [[plan.made_at, plan.steps] for plan in plans_of(resumed)] == [[0, 24], [5, 30], [10, 14]]
    assert_same_weights(whole, resumed)


def test_a_resumed_run_refuses_plans_other_than_its_checkpoints(tmp_path, tiny_dataset, fresh_accelerate,
                                                                monkeypatch):
    monkeypatch.setattr(budget, "plan_budget", fixed_plans([], {}))
    monkeypatch.setattr(budget, "REPLAN_EVERY", 1.0)  # one plan
    recipe = budget_recipe(tiny_dataset, tmp_path, "schedule.budget=10m")
    run_dir = train(from_dict(recipe.to_dict(), ["run.max_steps=5"]))  # checkpointed in epoch 2
    Plans([Plan(made_at=0, epochs=5, steps=20, start_epoch=3)], 4).save(run_dir / "plans.json")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(UserError, match="was trained under other plans"):
        train(recipe)


def timed_by_arch(step_s: dict[str, float], timed: list[str]):
    """budget.time_training for a test: each architecture's step time from `step_s`, the pass time tiny."""
    def time_training(recipe, splits, accelerator, speed) -> tuple[float, float]:
        timed.append(recipe.model.arch)
        return step_s[recipe.model.arch], 1e-6
    return time_training


def one_plan_timed_at(step_s: float, monkeypatch) -> None:
    """Budgets plan once, from a training step of the tiny model timed at `step_s`."""
    monkeypatch.setattr(budget, "time_training", timed_by_arch({"preactresnet_tiny_cifar": step_s}, []))
    monkeypatch.setattr(budget, "REPLAN_EVERY", 1.0)


def train_again(recipe: Recipe, *overrides: str) -> Path:
    """`recipe` trained again in this process with `overrides` (resumed, or repeated under another name)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train(from_dict(recipe.to_dict(), list(overrides)))


@pytest.mark.parametrize("wrn_step_s, trained", [(0.05, "wrn_tiny_cifar"), (5.0, "preactresnet_tiny_cifar")])
def test_a_budget_picks_the_first_architecture_it_trains_long_enough(tmp_path, tiny_dataset, fresh_accelerate,
                                                                     monkeypatch, capsys, wrn_step_s, trained):
    """A 60 s budget gives the first architecture about 300 steps at 0.05 s (75 epochs of 4 steps: it is trained)
    and 12 at 5 s (3 epochs, under arch_min_epochs 10: the last is trained). The pick is recorded in plans.json;
    RUN/recipe.yaml and the export name the architecture trained; a resumed run keeps it without timing again;
    `schedule.plans` repeats it."""
    timed = []
    monkeypatch.setattr(budget, "time_training", timed_by_arch(
        {"wrn_tiny_cifar": wrn_step_s, "preactresnet_tiny_cifar": 0.05}, timed))
    monkeypatch.setattr(budget, "REPLAN_EVERY", 1.0)  # one plan
    candidates = ["model.arch=[wrn_tiny_cifar, preactresnet_tiny_cifar]", "model.arch_min_epochs=10"]
    recipe = budget_recipe(tiny_dataset, tmp_path, "schedule.budget=60s", "run.max_steps=2", *candidates)
    run_dir = train(recipe)
    assert timed == ["wrn_tiny_cifar", *([] if trained == "wrn_tiny_cifar" else ["preactresnet_tiny_cifar"])]
    assert f"model.arch: {trained}, the first of wrn_tiny_cifar, preactresnet_tiny_cifar" in capsys.readouterr().out
    assert json.loads((run_dir / "plans.json").read_text())["arch"] == trained
    assert load_recipe(run_dir / "recipe.yaml").model.arch == trained
    assert json.loads((run_dir / "last" / "config.json").read_text())["architecture"] == trained
    timed.clear()
    train_again(recipe, "run.max_steps=3")  # resumed from step 2: the same architecture
    assert timed == [] and json.loads((run_dir / "plans.json").read_text())["arch"] == trained
    repeated = train_again(recipe, f"schedule.plans={run_dir / 'plans.json'}", "run.name=again")
    assert timed == [] and load_recipe(repeated / "recipe.yaml").model.arch == trained


@pytest.mark.parametrize("step_s, augmented", [(0.05, True), (5.0, False)])
def test_a_budget_augments_when_it_trains_long_enough(tmp_path, tiny_dataset, fresh_accelerate, monkeypatch,
                                                      capsys, step_s, augmented):
    """`data.augment: auto`: a 60 s budget plans about 75 epochs of 4 steps at 0.05 s a step (>= 10: crops and
    flips) and 3 at 5 s (no augmentation). RUN/recipe.yaml records the choice; a resumed run and `schedule.plans`
    keep it (the same first plan) without timing anything."""
    one_plan_timed_at(step_s, monkeypatch)
    recipe = budget_recipe(tiny_dataset, tmp_path, "schedule.budget=60s", "run.max_steps=2", "data.augment=auto",
                           "data.augment_min_epochs=10")
    run_dir = train(recipe)
    assert f"data.augment: auto, so {'crops and flips' if augmented else 'no augmentation'}" in capsys.readouterr().out
    assert load_recipe(run_dir / "recipe.yaml").data.augment is augmented
    monkeypatch.setattr(budget, "time_training", None)  # neither run below may time anything
    train_again(recipe, "run.max_steps=3")  # resumed from step 2
    assert load_recipe(run_dir / "recipe.yaml").data.augment is augmented
    repeated = train_again(recipe, f"schedule.plans={run_dir / 'plans.json'}", "run.name=again")
    assert load_recipe(repeated / "recipe.yaml").data.augment is augmented


def test_with_augment_auto_the_budget_times_an_augmented_step(tmp_path, tiny_dataset, fresh_accelerate,
                                                             monkeypatch):
    """`data.augment: auto` is decided from the plan that the timed steps make, so they time the costlier step:
    with crops and flips."""
    timed = []

    def recorded(parts, *batch, **kwargs):
        timed.append(parts.recipe.data.augment)
        return train_step(parts, *batch, **kwargs)

    monkeypatch.setattr(budget, "train_step", recorded)
    train(budget_recipe(tiny_dataset, tmp_path, "schedule.budget=60s", "run.max_steps=1", "data.augment=auto"))
    assert len(timed) == 6 and set(timed) == {True}  # a warm-up and five timed steps


@pytest.mark.parametrize("min_epochs, augmented", [(2, True), (2.5, False)])
def test_augment_auto_without_a_budget_follows_the_recipes_epochs(tmp_path, tiny_dataset, fresh_accelerate,
                                                                  min_epochs, augmented):
    run_dir = train(budget_recipe(tiny_dataset, tmp_path, "schedule.budget=null", "schedule.epochs=2",
                                  "data.augment=auto", f"data.augment_min_epochs={min_epochs}"))
    assert load_recipe(run_dir / "recipe.yaml").data.augment is augmented


@pytest.mark.parametrize("step_s, averaged", [(0.05, True), (5.0, False)])
def test_a_budget_averages_the_weights_only_when_it_trains_long_enough(tmp_path, tiny_dataset, fresh_accelerate,
                                                                       monkeypatch, capsys, step_s, averaged):
    """`average.min_epochs`: the 60 s budget above plans about 75 epochs at 0.05 s a step (>= 10: averaged) and 3 at
    5 s (the average off). RUN/recipe.yaml records the decay trained with; a resumed run keeps it without timing."""
    one_plan_timed_at(step_s, monkeypatch)
    recipe = budget_recipe(tiny_dataset, tmp_path, "schedule.budget=60s", "run.max_steps=2", "average.decay=0.9",
                           "average.min_epochs=10")
    run_dir = train(recipe)
    assert f"average: {'on' if averaged else 'off'}: the run was planned for" in capsys.readouterr().out
    assert load_recipe(run_dir / "recipe.yaml").average.decay == (0.9 if averaged else 0.0)
    assert any((run_dir / "checkpoints").rglob("average.safetensors")) is averaged
    monkeypatch.setattr(budget, "time_training", None)  # the resumed run may not time anything
    train_again(recipe, "run.max_steps=3")  # resumed from step 2
    assert load_recipe(run_dir / "recipe.yaml").average.decay == (0.9 if averaged else 0.0)


def test_min_epochs_out_of_range_are_refused():
    with pytest.raises(UserError, match="data.augment_min_epochs: must be > 0"):
        from_dict({"data": {"augment_min_epochs": 0}})
    with pytest.raises(UserError, match="average.min_epochs: must be >= 0"):
        from_dict({"average": {"min_epochs": -1}})


def test_plans_of_another_architecture_list_are_refused(tmp_path, tiny_dataset, fresh_accelerate):
    Plans([Plan(made_at=0, epochs=2, steps=6, start_epoch=1)], 4, "resnet_tiny_cifar").save(tmp_path / "plans.json")
    with pytest.raises(UserError, match="model.arch: the plans give 'resnet_tiny_cifar', which is not one of"):
        train(budget_recipe(tiny_dataset, tmp_path, f"schedule.plans={tmp_path / 'plans.json'}",
                            "model.arch=[wrn_tiny_cifar, preactresnet_tiny_cifar]"))


@pytest.mark.parametrize("model, schedule, message", [
    ({"arch": ["a", "b"]}, {"budget": "8m", "name": "onecycle"}, None),
    ({"arch": ["a", "b"]}, {}, "model.arch: a list of architectures needs schedule.budget"),
    ({"arch": ["a", "a"]}, {"budget": "8m", "name": "onecycle"}, "model.arch: must name a timm architecture"),
    ({"arch": []}, {"budget": "8m", "name": "onecycle"}, "model.arch: must name a timm architecture"),
    ({"arch": ["a", "b"], "pretrained": "x"}, {"budget": "8m", "name": "onecycle"},
     "model.arch: a fine-tuned backbone fixes the architecture"),
    ({"arch": "a", "arch_min_epochs": 0}, {}, "model.arch_min_epochs: must be > 0"),
])
def test_recipe_architecture_lists(model, schedule, message):
    if message is None:
        assert from_dict({"model": model, "schedule": schedule}).model.arch == model["arch"]
    else:
        with pytest.raises(UserError, match=message):
            from_dict({"model": model, "schedule": schedule})


def test_plans_of_other_data_are_refused(tmp_path, tiny_dataset, fresh_accelerate):
    Plans([Plan(made_at=0, epochs=2, steps=6, start_epoch=1)], 3).save(tmp_path / "plans.json")
    with pytest.raises(UserError, match="plans are for 3 steps per epoch, this run has 4"):
        train(budget_recipe(tiny_dataset, tmp_path, f"schedule.plans={tmp_path / 'plans.json'}"))


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
