"""A run sized to a time budget (`schedule.budget: 8m`), and where in the learning-rate schedule a step falls.

Plain Python: the trainer measures the costs (seconds per training step, per monitoring pass, for the final
evaluation) and `plan_budget` turns them into a number of optimiser steps, written back into the run's resolved
recipe as `schedule.steps` and `schedule.epochs`, so that rerunning that recipe repeats the run exactly. The first
plan rests on a few steps timed before training; every tenth of it the trainer plans the rest again from the run's
own speed (the slower of its mean and its latest tenth), and the resolved recipe records every plan (`schedule.plans`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

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
