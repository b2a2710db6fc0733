"""`finetune.mode: lp_ft`: an adversarial linear probe, then full fine-tuning, in one run (LP-FT, Kumar et al.,
2022). For the steps that start before `finetune.probe_share` of the run only the head trains, the backbone as in a
linear probe (its weights and BatchNorm statistics unchanged); then everything trains as in mode `full`, the backbone
at `finetune.backbone_lr_scale`, from the probed head: one head module throughout, never reset.

Nothing is frozen: with several processes Accelerate wraps the model in DDP at prepare time, and DDP syncs only the
parameters that require grad then. So every parameter requires grad, and the optimizer holds them all in a `head` and
a `backbone` group (`finetune.param_groups`). While the head probes, a loop callback holds the backbone group
(`StepParts.held`): `loop.train_step` drops its gradients after the backward pass, so SGD leaves its weights bit for
bit and keeps no momentum for them (neither a checkpoint, a guard's snapshot nor full fine-tuning carries the probe's
gradients), and neither the clipped norm nor fp16's loss scaler sees them; its modules stay in eval mode
(`finetune.set_train_mode`). The probe's head is thus a linear probe's, bit for bit. The schedule spans the whole
run: at the switch the backbone takes its rate from it. The phase follows from the step count (`Plans.fraction`, as
the eps warm-up's), so a resumed run lands in the right one.
"""

from __future__ import annotations

from sglr_zoo import finetune
from sglr_zoo.loop import Callback, StepParts, StepResult
from sglr_zoo.runstate import RunState
from sglr_zoo.schedule import Plans

HELD = frozenset({"backbone"})  # the backbone's parameter group, as finetune.param_groups names it


class ProbeThenTune(Callback):
    """Holds the backbone group while the head probes, at the steps that `plans` count as the run's first
    `finetune.probe_share` (a resumed run's too), then lets it train for the rest of the run."""

    def __init__(self, parts: StepParts, plans: Plans, state: RunState):
        self.parts, self.plans, self.share = parts, plans, parts.recipe.finetune.probe_share
        self.parts.held = HELD if self.probing(state.global_step) else frozenset()  # the first step's

    def probing(self, global_step: int) -> bool:
        """Whether the step after `global_step` steps belongs to the linear probe."""
        return self.plans.fraction(global_step) < self.share

    def on_step_end(self, state: RunState, result: StepResult | None) -> None:
        if self.parts.held and not self.probing(state.global_step):
            self.parts.held = frozenset()
            finetune.set_train_mode(self.parts.model)  # the backbone's BatchNorm and dropout train from here
