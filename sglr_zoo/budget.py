"""A run's plans: from its recipe, repeated from a plans file, or sized to `schedule.budget` and revised while it
trains (`Replanner`, a loop callback).

The budget's first plan rests on a few training steps (`loop.train_step`) and a monitoring attack timed on a
throwaway model; every REPLAN_EVERY of it the `Replanner` plans the rest again from the run's own speed. Plans are
values (`schedule.Plan`): the recipe is never changed; they go to RUN/plans.json and into every checkpoint, and
`schedule.plans: RUN/plans.json` repeats them.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from sglr_zoo import finetune
from sglr_zoo.attacks import pgd
from sglr_zoo.data import IndexedDataset, Splits, to_float
from sglr_zoo.errors import UserError
from sglr_zoo.hardware import SpeedSettings
from sglr_zoo.loop import Callback, StepParts, StepResult, train_step
from sglr_zoo.objectives import build_objective
from sglr_zoo.recipe import Recipe
from sglr_zoo.rundir import RunDir
from sglr_zoo.runstate import RunState
from sglr_zoo.schedule import Plan, Plans, parse_budget, plan_budget, resolve_start

# The evaluator's sanity checks on an export, in fp32 forward-backward passes of one image: PGD-20 at a large
# eps and the input gradients, on up to 100 examples (sglr_zoo.evaluate); a budget reserves time for them.
FINAL_SANITY_PASSES = 100 * 23
# A budgeted run plans the rest again, from its own speed, after each such fraction of its first plan.
REPLAN_EVERY = 0.1


def plan_run(recipe: Recipe, splits: Splits, accelerator: Accelerator, speed: SpeedSettings, run: RunDir,
             started: float) -> tuple[Plans, list[Callback]]:
    """The run's plans and the callbacks that revise them: the plans `schedule.plans` names (a plans file, or
    `[from_step, end_step]` pairs), else the recipe's own when it has no budget, else a budget's plans (kept from
    RUN/plans.json when the run resumes; `fit_to_budget` otherwise)."""
    steps_per_epoch = math.ceil(len(splits.train) / recipe.run.batch_size)
    schedule = recipe.schedule
    if isinstance(schedule.plans, str):
        plans = Plans.load(Path(schedule.plans), steps_per_epoch)
        accelerator.print(f"schedule.plans: repeating the {len(plans.all)} plans in {schedule.plans}: "
                          f"{plans.last.steps} steps in {plans.last.epochs} epochs")
        return plans, []
    if schedule.plans is not None or schedule.budget is None:
        return Plans.of_recipe(schedule, recipe.method.start_epoch, steps_per_epoch), []
    if recipe.run.resume != "never" and run.plans.is_file():
        plans = Plans.load(run.plans, steps_per_epoch)
        accelerator.print(f"schedule.budget: resuming, so keeping the {plans.last.steps} steps planned in {run.plans}; "
                          "a new budget needs a new run (run.name=...)")
        return plans, []
    return fit_to_budget(recipe, splits, accelerator, speed, run, started)


def median_step_seconds(step: Callable[[], object], device: torch.device, timed: int = 5) -> float:
    """The median time of `timed` calls of `step` after a warm-up call (kernel choice, compilation). The median, so
    that one step slowed by another program does not shrink a budgeted run (the plan is made once); a machine slow
    for the whole calibration still is (benchmarks/RESULTS.md)."""
    times = []
    for _ in range(1 + timed):
        clock = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - clock)
    return statistics.median(times[1:])


@dataclass
class Replanner(Callback):
    """Plans the rest of a budgeted run again every `every` steps from the run's own speed: a plan made from a few
    timed steps misjudges a shared machine whose speed drifts by 10-20% from minute to minute
    (benchmarks/RESULTS.md). The step time is the slower of the run's mean so far and the mean since the last
    plan, so that a slowdown late in a long run, which the mean hides, still shortens it. The monitoring and
    final-evaluation costs, timed with the calibration, are scaled by the ratio of that to the calibrated step.
    Each plan is added to `plans` and written to `path` (the main process's RUN/plans.json; None: not written)."""

    accelerator: Accelerator
    plans: Plans
    path: Path | None
    budget_s: float
    started: float  # time.perf_counter() at the start of train(): what the budget counts from
    every: int
    calibrated_step_s: float
    monitor_s: float  # one monitoring pass, as calibrated
    final_s: float  # the final evaluation, as calibrated
    monitor_every: int  # eval.every
    start_fraction: float | None  # method.start_epoch when a fraction of the run
    timed_s: float = 0.0
    timed_steps: int = 0
    recent_s: float = 0.0  # the same, since the last plan
    recent_steps: int = 0
    last_step_done: float = 0.0

    def on_step_end(self, state: RunState, result: StepResult) -> None:
        self.after_step(state.global_step)

    def after_step(self, global_step: int) -> None:
        """Times the step (not an epoch's first: it follows monitoring and checkpoints) and, every `every` steps
        before the end, adds a plan for the rest: a method's start that has begun stays, one still to come moves
        with the run's length."""
        now, steps_per_epoch, current = time.perf_counter(), self.plans.steps_per_epoch, self.plans.last
        if (global_step - 1) % steps_per_epoch:
            self.timed_s, self.timed_steps = self.timed_s + now - self.last_step_done, self.timed_steps + 1
            self.recent_s, self.recent_steps = self.recent_s + now - self.last_step_done, self.recent_steps + 1
        self.last_step_done = now
        if global_step % self.every or global_step >= current.steps or not self.timed_steps:
            return
        recent_step_s = self.recent_s / self.recent_steps if self.recent_steps else 0.0
        self.recent_s, self.recent_steps = 0.0, 0
        step_s, elapsed = self.accelerator.gather(torch.tensor(
            [[max(self.timed_s / self.timed_steps, recent_step_s), now - self.started]],
            device=self.accelerator.device, dtype=torch.float64)).amax(0).tolist()
        scale = step_s / self.calibrated_step_s
        plan = plan_budget(self.budget_s, elapsed, step_s=step_s, steps_per_epoch=steps_per_epoch,
                           monitor_s=scale * self.monitor_s, monitor_every=self.monitor_every,
                           final_s=scale * self.final_s, done_steps=global_step)
        if plan.steps == global_step:  # nothing more fits: one more step, so that a plan still ends after its start
            plan = dataclasses.replace(plan, steps=global_step + 1, train_s=step_s,
                                       epochs=math.ceil((global_step + 1) / steps_per_epoch))
        start = current.start_epoch
        epoch = global_step // steps_per_epoch + 1  # the epoch of the next step
        if self.start_fraction is not None and start > epoch:
            start = max(epoch + 1, round(self.start_fraction * plan.epochs))
        self.plans.add(Plan(made_at=global_step, epochs=plan.epochs, steps=plan.steps, start_epoch=start))
        if self.path is not None:  # the message goes above the epoch's progress bar
            self.plans.save(self.path)
            tqdm.write(f"schedule.budget: planned again after {global_step} steps ({elapsed:.0f} s spent): "
                       f"{plan.describe(step_s, steps_per_epoch)}")


def with_arch(recipe: Recipe, arch: str) -> Recipe:
    """The recipe with `model.arch` set to one architecture (a copy; the given recipe is unchanged)."""
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, arch=arch))


def picked(recipe: Recipe, plans: Plans, log: Callable[[str], object]) -> Recipe:
    """The recipe the run trains: a `model.arch` list resolved to the architecture its plans picked, and
    `data.augment: auto` to whether the first plan trains `data.augment_min_epochs` epochs or more, and the average
    turned off when it trains fewer than `average.min_epochs` (a resumed or repeated run has the same first plan, so
    the same answers); says what it chose through `log`."""
    if isinstance(recipe.model.arch, list):
        if plans.arch not in recipe.model.arch:
            raise UserError(f"model.arch: the plans give {plans.arch!r}, which is not one of {recipe.model.arch}; "
                            "give the recipe those plans were made with, or train anew under another run.name")
        recipe = with_arch(recipe, plans.arch)
    if recipe.data.augment == "auto":
        augment = plans.first_epochs >= recipe.data.augment_min_epochs
        log(f"data.augment: auto, so {'crops and flips' if augment else 'no augmentation'}: the run was planned for "
            f"{plans.first_epochs:.1f} epochs ({'>=' if augment else '<'} data.augment_min_epochs "
            f"{recipe.data.augment_min_epochs:g})")
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, augment=augment))
    if recipe.average.decay and recipe.average.min_epochs:
        averaged = plans.first_epochs >= recipe.average.min_epochs
        log(f"average: {'on' if averaged else 'off'}: the run was planned for {plans.first_epochs:.1f} epochs "
            f"({'>=' if averaged else '<'} average.min_epochs {recipe.average.min_epochs:g})")
        if not averaged:
            recipe = dataclasses.replace(recipe, average=dataclasses.replace(recipe.average, decay=0.0))
    return recipe


def time_training(recipe: Recipe, splits: Splits, accelerator: Accelerator,
                  speed: SpeedSettings) -> tuple[float, float]:
    """The seconds of one training step and of one evaluation "pass" (a forward and backward of one image in fp32,
    eval mode, as the evaluator's attacks run) of `recipe.model.arch`, on a throwaway model, objective and optimizer
    with the random number generators restored afterwards; the slowest process's."""
    probe_n = min(recipe.eval.batch_size, len(splits.test), 64)
    # `data.augment: auto` is decided from the plan this timing makes: time the augmented step, the costlier.
    augmented = dataclasses.replace(recipe.data, augment=recipe.data.augment is not False)
    recipe = dataclasses.replace(recipe, data=augmented)
    memory_format = torch.channels_last if speed.channels_last.value else torch.contiguous_format
    device = accelerator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = finetune.build_model(recipe, splits.num_classes, splits.train.class_names)
        model = model.to(device, memory_format=memory_format)
        objective = build_objective(recipe.method, labels=splits.train.labels, num_classes=splits.num_classes,
                                    start_epoch=1, model=model).to(device)  # refined labels: the costlier step
        if objective.start_epoch is not None and recipe.method.start_epoch >= 1:
            raise UserError("method.start_epoch: with schedule.budget the number of epochs is decided at run time; "
                            "give the start as a fraction of the run (e.g. 0.5)")
        optimizer = torch.optim.SGD(finetune.param_groups(model, recipe), lr=recipe.optim.lr,
                                    momentum=recipe.optim.momentum, weight_decay=recipe.optim.weight_decay,
                                    nesterov=recipe.optim.nesterov)
        trained = torch.compile(model) if speed.compile.value else model
        parts = StepParts(trained, trained, objective, optimizer, accelerator, recipe, memory_format)
        # The probe's batch, on the device as a prepared loader delivers it (the timed steps exclude the copy).
        batches = torch.utils.data.DataLoader(IndexedDataset(splits.train),
                                              batch_size=recipe.run.batch_size // accelerator.num_processes)
        batch = [t.to(device) for t in next(iter(batches))]  # every timed step trains on this one batch
        finetune.set_train_mode(trained)
        step_s = median_step_seconds(lambda: train_step(parts, *batch, epoch=1, lr=recipe.optim.lr), device)
        x = to_float(splits.test.images[:probe_n], recipe.data.image_size).to(device, memory_format=memory_format)
        y = splits.test.labels[:probe_n].to(device)
        attack_s = median_step_seconds(lambda: pgd(trained, x, y, threat=recipe.attack.threat,
                                                   eps=float(recipe.eval_eps), steps=recipe.eval.steps),
                                       device, timed=1)  # a warm-up, then one timed (and on a GPU, waited for)
    step_s, pass_s = accelerator.gather(torch.tensor([[step_s, attack_s / (probe_n * recipe.eval.steps)]],
                                                     device=device, dtype=torch.float64)).amax(0).tolist()
    return step_s, pass_s


def fit_to_budget(recipe: Recipe, splits: Splits, accelerator: Accelerator, speed: SpeedSettings, run: RunDir,
                  started: float) -> tuple[Plans, list[Callback]]:
    """The first plan of a run that `schedule.budget` sizes (the whole train() call, from `started`), and the
    `Replanner` that revises it every REPLAN_EVERY of the run (none when the plan is too short to revise).

    The training step and the monitoring attack are timed (`time_training`) so that the run itself is the one its
    plans describe. The evaluations are costed as if every image were attacked (the evaluator attacks the
    clean-correct ones only), so the plan errs on the short side. Given a list of architectures (`model.arch`,
    largest first), the budget trains the first whose plan has `model.arch_min_epochs` epochs, else the last: on a
    fast CPU a bigger model in fewer epochs is the more robust, on a slow one the smaller (docs/time_to_robustness.md).
    """
    if "autoattack" in recipe.eval.final_attacks:
        raise UserError("schedule.budget: AutoAttack's time cannot be predicted; drop it from eval.final_attacks "
                        "and run `sglr-zoo eval` on the export afterwards")
    # A monitoring pass per epoch: eval.n images of each split, a clean forward and eval.steps attack steps (+1).
    monitored = sum(min(len(data), recipe.eval.n) for data in (splits.train, splits.val, splits.test)
                    if data is not None)
    final_passes = sum(1 if attack == "clean" else int(attack.removeprefix("pgd").removeprefix("cw")) + 1
                       for attack in recipe.eval.final_attacks)
    final_n = min(recipe.eval.final_n, len(splits.test))
    exports = 2 if splits.val is not None else 1
    budget_s = parse_budget(recipe.schedule.budget)
    steps_per_epoch = math.ceil(len(splits.train) / recipe.run.batch_size)
    candidates = recipe.model.arch if isinstance(recipe.model.arch, list) else [recipe.model.arch]
    considered = []
    for arch in candidates:
        step_s, pass_s = time_training(with_arch(recipe, arch), splits, accelerator, speed)
        elapsed = accelerator.gather(torch.tensor([time.perf_counter() - started], device=accelerator.device,
                                                  dtype=torch.float64)).amax().item()
        monitor_s = pass_s * monitored * (recipe.eval.steps + 2)
        final_s = exports * pass_s * (final_n * final_passes + FINAL_SANITY_PASSES)
        plan = plan_budget(budget_s, elapsed, step_s=step_s, steps_per_epoch=steps_per_epoch, monitor_s=monitor_s,
                           monitor_every=recipe.eval.every, final_s=final_s)
        considered.append(f"{arch} {plan.steps / steps_per_epoch:.1f}")
        if plan.steps >= recipe.model.arch_min_epochs * steps_per_epoch:
            break
    if len(candidates) > 1:
        accelerator.print(f"model.arch: {arch}, the first of {', '.join(candidates)} that the budget trains for "
                          f"{recipe.model.arch_min_epochs:g} epochs or more (else the last); epochs it would get: "
                          f"{'; '.join(considered)}")
    summary = (f"budget {budget_s:.0f} s: {elapsed:.0f} s spent before training (data, calibration); "
               f"{plan.describe(step_s, steps_per_epoch)}")
    if plan.steps < 1:
        raise UserError(f"schedule.budget: {recipe.schedule.budget} leaves no time to train ({summary}); raise it, "
                        "or lower eval.n, eval.final_n or data.n_test")
    start = recipe.method.start_epoch
    first = Plan(made_at=0, epochs=plan.epochs, steps=plan.steps, start_epoch=resolve_start(start, plan.epochs))
    plans = Plans([first], steps_per_epoch, arch if isinstance(recipe.model.arch, list) else None)
    every = math.ceil(REPLAN_EVERY * plan.steps)
    replanner = Replanner(accelerator, plans, run.plans if accelerator.is_main_process else None, budget_s, started,
                          every, step_s, monitor_s, final_s, recipe.eval.every,
                          start if start < 1 else None) if 3 <= every < plan.steps else None
    accelerator.print(f"schedule.budget: {summary}" + (f"; planned again every {every} steps" if replanner else "")
                      + f". The plans go to {run.plans}; `sglr-zoo train {run.recipe} schedule.plans={run.plans} "
                      "run.name=NEW` repeats them")
    return plans, [replanner] if replanner else []
