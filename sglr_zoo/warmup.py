"""Epsilon warm-up: the training attack's radius (and its step size) ramps up from a fraction of eps to eps over
the first part of a run (`attack.warmup`), so that features that have never seen an adversary (a clean backbone
being fine-tuned) are not hit at full strength at once. A loop callback sets the scale of each step; per-epoch
monitoring, the guard and the final evaluation always attack at the full eps."""

from __future__ import annotations

from sglr_zoo.loop import Callback, StepParts, StepResult
from sglr_zoo.recipe import AttackConfig
from sglr_zoo.runstate import RunState
from sglr_zoo.schedule import Plans, warmup_factor


def describe_warmup(attack: AttackConfig) -> str:
    """The ramp in words, for the console and model cards."""
    return (f"eps warm-up: from {attack.warmup_from:g} x eps to eps = {attack.eps} over the first {attack.warmup:.0%} "
            f"of the run ({attack.warmup_shape}), the step size with it; monitoring and evaluation at the full eps")


class EpsWarmup(Callback):
    """Sets `parts.eps_scale` for each step: the ramp's factor (`schedule.warmup_factor`) at the fraction of the run
    that `plans` say the step is at (a resumed run's too)."""

    def __init__(self, parts: StepParts, plans: Plans, state: RunState):
        self.parts, self.plans, self.attack = parts, plans, parts.recipe.attack
        self.on_step_end(state, None)  # the first step's

    def on_step_end(self, state: RunState, result: StepResult | None) -> None:
        self.parts.eps_scale = warmup_factor(self.plans.fraction(state.global_step), self.attack.warmup,
                                             self.attack.warmup_from, self.attack.warmup_shape)
