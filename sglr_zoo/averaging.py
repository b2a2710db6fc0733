"""An exponential moving average of a model's weights. The run's averaged model (`recipe.average`) and SGLR's
weight teacher (`method.teacher: weights`) are both a `WeightAverage`; `Averaging` is the loop callback that keeps
the run's average.

Each step the average moves towards the weights, average <- decay * average + (1 - decay) * weights, in fp32
(the weights are fp32 under autocast), parameters and BatchNorm running statistics alike (`buffers: average`,
timm's default) or with the statistics copied (`buffers: copy`); integer buffers (BatchNorm's batch count) are
copied. Every process holds the same weights after a step, so it holds the same average; its BatchNorm statistics
are aligned with the model's at each epoch's end (replicas.sync_buffers).
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.utils import ModelEmaV3
from torch import nn

from sglr_zoo.loop import Callback, StepResult
from sglr_zoo.runstate import RunState
from sglr_zoo.schedule import Plans


class WeightAverage(ModelEmaV3):
    """timm's ModelEmaV3 of `model` (its copy is `.module`, in eval mode), moved with `update_to`."""

    def __init__(self, model: nn.Module, decay: float, buffers: Literal["average", "copy"] = "average"):
        super().__init__(model, decay=decay, exclude_buffers=buffers == "copy")

    @torch.no_grad()
    def update_to(self, model: nn.Module, decay: float | None = None) -> None:
        """One step towards `model`'s weights, at `decay` (this average's own when None; 0 copies them)."""
        decay = self.decay if decay is None else decay
        if self.exclude_buffers:
            self.apply_update_no_buffers_(model, decay)
        else:
            self.apply_update_(model, decay)

    def describe(self, start: float = 0.0) -> str:
        """The average in words, for run.json and model cards."""
        begins = f"from {start:.0%} of the run's steps, copying the weights before" if start else "from the first step"
        statistics = "copied" if self.exclude_buffers else "averaged like the weights"
        return (f"exponential moving average of the weights, decay {self.decay:g} per step, {begins}; BatchNorm "
                f"statistics {statistics}")


class Averaging(Callback):
    """Keeps the run's `average` of `model` after each optimiser step: a copy of the weights until the fraction
    `start` of the run (as `plans` say at that step), an exponential moving average from there on."""

    def __init__(self, average: WeightAverage, model: nn.Module, plans: Plans, start: float):
        self.average, self.model, self.plans, self.start = average, model, plans, start

    def on_step_end(self, state: RunState, result: StepResult) -> None:
        started = self.plans.fraction(state.global_step) >= self.start
        self.average.update_to(self.model, None if started else 0.0)
