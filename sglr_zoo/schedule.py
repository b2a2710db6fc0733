"""A run's plans (epochs, steps, the method's start), a run sized to a time budget (`schedule.budget: 8m`), and
where in the learning-rate schedule a step falls.

Plain Python. A `Plan` is a value: what a run decided at a step (0: before training). A run without a budget has
one, read from its recipe. A budgeted run's first plan comes from a few timed steps (`plan_budget` turns the costs
into optimiser steps); every tenth of it the trainer plans the rest again from the run's own speed
(sglr_zoo.budget). The recipe is never changed: the plans are recorded in RUN/plans.json (`Plans.save`) and in
every checkpoint, and a recipe with `schedule.plans: RUN/plans.json` repeats them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sglr_zoo.errors import UserError
from sglr_zoo.files import read_regular, write_atomic

if TYPE_CHECKING:  # recipe imports this module (parse_budget)
    from sglr_zoo.recipe import ScheduleConfig

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_budget(value: str | float | int) -> float:
    """Seconds from `480`, `"480s"`, `"8m"`, `"1.5h"` or `"1h30m"`; raises ValueError on anything else."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 8m, 90s or 1h30m, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        parts = re.fullmatch(r"\s*((?:\d+(?:\.\d+)?\s*[smh]\s*)+)", str(value))
        if parts is None:
            raise ValueError(f"expected a duration like 8m, 90s or 1h30m, got {value!r}")
        seconds = sum(float(number) * _UNITS[unit]
                      for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([smh])", parts[1]))
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expected a positive duration like 8m, got {value!r}")
    return seconds


def lr_factor(cfg: ScheduleConfig, epoch_progress: float, epochs: int | None = None) -> float:
    """Learning-rate multiplier at a fractional epoch (0 = start of training), per batch, for a run of `epochs`
    (the plan's; `cfg.epochs` when None)."""
    epochs = cfg.epochs if epochs is None else epochs
    if cfg.warmup_epochs and epoch_progress < cfg.warmup_epochs:
        return epoch_progress / cfg.warmup_epochs
    t = (epoch_progress - cfg.warmup_epochs) / (epochs - cfg.warmup_epochs)
    if cfg.name == "multistep":  # as in the authors' code: lr * gamma from (1-based) epoch m on
        return cfg.gamma ** sum(int(epoch_progress) + 1 >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.name == "onecycle":
        return t / cfg.peak_at if t < cfg.peak_at else max(0.0, (1 - t) / (1 - cfg.peak_at))
    return 1.0


def warmup_factor(fraction: float, warmup: float, start: float = 0.0, shape: str = "linear") -> float:
    """The multiplier of eps (and the step size) a fraction `fraction` into a run whose attack ramps from `start` x
    eps to eps over its first `warmup` (linearly or along half a cosine); 1 after the ramp or without one."""
    if fraction >= warmup:
        return 1.0
    t = fraction / warmup
    return start + (1 - start) * (t if shape == "linear" else (1 - math.cos(math.pi * t)) / 2)


def epoch_progress(epochs: int, steps: int | None, global_step: int, steps_per_epoch: int,
                   plans: list[list[int]] | None = None) -> float:
    """The fractional epoch (0 = start) at which the learning-rate schedule is read before `global_step`.

    With `steps` (a budgeted run), the schedule's `epochs` are stretched over exactly `steps` steps, so that it
    ends on the last step even when the last epoch is cut short; with `plans`, as `schedule_fraction` says.
    """
    if steps is None:
        return global_step / steps_per_epoch
    return epochs * schedule_fraction(global_step, plans or [[0, steps]])


def schedule_fraction(global_step: int, plans: list[list[int]]) -> float:
    """The fraction of the learning-rate schedule done before `global_step` under a run's plans, `[from_step,
    end_step]` each: from its first step on, a plan stretches what is left of the schedule to end at its last, so
    the learning rate stays continuous where the plan changes."""
    done = 0.0
    for (start, end), following in zip(plans, [*plans[1:], None], strict=True):
        if following is None or global_step < following[0]:
            return done + (1 - done) * (global_step - start) / (end - start)
        done += (1 - done) * (following[0] - start) / (end - start)
    raise AssertionError("unreachable: the last plan returns")


@dataclass(frozen=True)
class BudgetPlan:
    """What a budget buys: `steps` optimiser steps over `epochs` epochs (the last one possibly cut short)."""

    steps: int  # from the start of the run
    epochs: int
    train_s: float  # predicted seconds of the training still to run, monitoring excluded
    monitor_s: float  # predicted seconds of the per-epoch monitoring still to run, all epochs together
    final_s: float  # predicted seconds of the final evaluation

    def describe(self, step_s: float, steps_per_epoch: int) -> str:
        last = self.steps - (self.epochs - 1) * steps_per_epoch
        cut = "" if last == steps_per_epoch else f", the last cut at {last} steps"
        epochs = f"{self.epochs} epoch{'s' * (self.epochs != 1)}"
        return (f"{step_s:.3f} s per step -> {self.steps} steps = {epochs} of {steps_per_epoch}{cut}; "
                f"predicted: training {self.train_s:.0f} s, monitoring {self.monitor_s:.0f} s, final evaluation "
                f"{self.final_s:.0f} s")


def plan_budget(budget_s: float, elapsed_s: float, *, step_s: float, steps_per_epoch: int, monitor_s: float,
                monitor_every: int, final_s: float, done_steps: int = 0, margin: float = 0.05) -> BudgetPlan:
    """The most optimiser steps that fit the budget after what is spent and what must still run.

    Args:
        budget_s: the whole budget; `elapsed_s` of it is spent already (data decoding, calibration, the first
            `done_steps` steps of training and the monitoring of the epochs they finished).
        step_s: seconds per training step; `steps_per_epoch` steps make an epoch.
        monitor_s: seconds of one per-epoch monitoring pass, run every `monitor_every` epochs and after the last.
        final_s: seconds of the final evaluation.
        margin: fraction of the training time kept free for checkpoints, plots and timing noise.

    Returns steps = done_steps when nothing more fits; the caller says why.
    """
    def passes(epochs: int) -> int:  # monitoring passes of a run of `epochs`: every monitor_every, and the last
        return epochs // monitor_every + (epochs % monitor_every != 0)

    monitored = (max(0, done_steps - 1) // steps_per_epoch) // monitor_every  # an epoch ends before its monitoring
    available = budget_s - elapsed_s - final_s
    steps = done_steps
    for epochs in range(max(1, math.ceil(done_steps / steps_per_epoch)), 10**6):  # the fewest that leave room
        fit = done_steps + math.floor((available - (passes(epochs) - monitored) * monitor_s) * (1 - margin) / step_s)
        if fit <= epochs * steps_per_epoch:
            steps = max(done_steps, fit)
            break
    epochs = max(1, math.ceil(steps / steps_per_epoch))
    return BudgetPlan(steps=steps, epochs=epochs, train_s=(steps - done_steps) * step_s,
                      monitor_s=(passes(epochs) - monitored) * monitor_s, final_s=final_s)


def resolve_start(start: float, epochs: int) -> int:
    """The 1-based epoch from which the method changes (SGLR's refined labels): `start`, or a fraction f < 1 of a
    run of `epochs`, epoch round(f * epochs) (as `Recipe.start_epoch`)."""
    return max(1, round(start * epochs)) if start < 1 else int(start)


@dataclass(frozen=True)
class Plan:
    """What a run decided after `made_at` optimiser steps (0: before training): `epochs`, `steps` in all (None:
    epochs x the data) and the method's resolved `start_epoch`."""

    made_at: int
    epochs: int
    steps: int | None
    start_epoch: int

    @classmethod
    def from_dict(cls, data: object) -> Plan:
        """Raises ValueError naming what is wrong."""
        names = [field.name for field in dataclasses.fields(cls)]
        if not isinstance(data, dict) or sorted(data) != sorted(names):
            raise ValueError(f"a plan is a mapping of {', '.join(names)}, not {data!r:.80}")
        least = {"made_at": 0, "epochs": 1, "steps": 1, "start_epoch": 1}
        if not all(isinstance(data[name], int) and not isinstance(data[name], bool)
                   and least[name] <= data[name] < 2**63
                   for name in names if data[name] is not None or name != "steps"):
            raise ValueError(f"a plan holds counts, not {data!r:.80}")
        return cls(**data)


class Plans:
    """A run's plans in the order made; the one in force at a step is the last made at or before it. The loop
    reads the plan from here, never from the recipe; a budget's re-planning adds to it (`add`). `arch` is the
    architecture a budget picked from the recipe's list (`model.arch`), None when the recipe names one."""

    def __init__(self, plans: list[Plan], steps_per_epoch: int, arch: str | None = None):
        self.all, self.steps_per_epoch, self.arch = list(plans), steps_per_epoch, arch
        problem = _plans_problem(self.all)
        if problem:
            raise ValueError(problem)

    @classmethod
    def of_recipe(cls, schedule: ScheduleConfig, start: float, steps_per_epoch: int) -> Plans:
        """A run's plan as its recipe states it; a list of `schedule.plans` (`[from_step, end_step]` pairs, as
        budgeted runs of sglr_zoo 0.x recorded them) is repeated plan by plan."""
        pairs = schedule.plans if isinstance(schedule.plans, list) else [[0, schedule.steps]]
        epochs = [*(math.ceil(end / steps_per_epoch) for _, end in pairs[:-1]), schedule.epochs]
        return cls([Plan(made_at, count, end, resolve_start(start, epochs[-1]))
                    for (made_at, end), count in zip(pairs, epochs, strict=True)], steps_per_epoch)

    @property
    def last(self) -> Plan:
        return self.all[-1]

    @property
    def first_epochs(self) -> float:
        """The length of the run as planned before its first step, in epochs."""
        first = self.all[0]
        return first.epochs if first.steps is None else first.steps / self.steps_per_epoch

    def in_force(self, global_step: int) -> Plan:
        """The plan for the step after `global_step` steps."""
        return [plan for plan in self.all if plan.made_at <= global_step][-1]

    def add(self, plan: Plan) -> None:
        problem = _plans_problem([*self.all, plan])
        if problem:
            raise ValueError(problem)
        self.all.append(plan)

    def progress(self, global_step: int) -> float:
        """The fractional epoch at which the learning-rate schedule is read before `global_step` (`epoch_progress`
        under the plan in force)."""
        plan = self.in_force(global_step)
        pairs = [[p.made_at, p.steps] for p in self.all] if len(self.all) > 1 else None
        return epoch_progress(plan.epochs, plan.steps, global_step, self.steps_per_epoch, pairs)

    def fraction(self, global_step: int) -> float:
        """The fraction of the run done before `global_step`, as its learning-rate schedule counts it."""
        return self.progress(global_step) / self.in_force(global_step).epochs

    def to_list(self) -> list[dict]:
        return [dataclasses.asdict(plan) for plan in self.all]

    def save(self, path: Path) -> None:
        """Writes the plans file (atomically): what `schedule.plans: PATH` repeats."""
        data = {"steps_per_epoch": self.steps_per_epoch, "plans": self.to_list(),
                **({"arch": self.arch} if self.arch else {})}
        write_atomic(path, json.dumps(data, indent=1).encode())

    @classmethod
    def load(cls, path: Path, steps_per_epoch: int) -> Plans:
        """Reads a plans file; raises UserError naming it when it is not one, or was made for other data."""
        try:
            data = json.loads(read_regular(path, 1 << 20, "plans file"))
            if data["steps_per_epoch"] != steps_per_epoch:
                raise UserError(f"{path}: these plans are for {data['steps_per_epoch']} steps per epoch, this run has "
                                f"{steps_per_epoch}: they repeat a run on the same data and run.batch_size only")
            arch = data.get("arch")
            if arch is not None and not (isinstance(arch, str) and arch):
                raise ValueError(f"arch is an architecture's name, not {arch!r:.80}")
            return cls(list(map(Plan.from_dict, data["plans"])), steps_per_epoch, arch)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"{path}: not a plans file written by a run ({error}); give schedule.plans the "
                            "plans.json of a run directory") from None


def _plans_problem(plans: list[Plan]) -> str | None:
    if not plans or plans[0].made_at != 0:
        return "the first plan is made at step 0"
    for before, after in zip(plans, plans[1:]):
        if not before.made_at < after.made_at < (before.steps or math.inf) or after.steps is None:
            return f"plan {after} does not follow {before}: made later, before that plan's end, with steps"
    return None
