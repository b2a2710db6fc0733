"""One optimiser step (`train_step`), one epoch of them (`train_one_epoch`), and the callbacks the loop offers.

`train_step` is the step that the trainer, the time budget's calibration and benchmarks/train_throughput.py all run:
the learning rate, uint8 batch -> augmentation -> the training attack -> objective -> backward -> gradient clipping
-> optimizer step -> the objective's own update. Other concerns (a time-budget planner, CPU-thread sharing, a guard,
weight averaging) are `Callback`s that the loop calls at named points; the loop knows nothing of them, nor of which
objective runs: it reads the plan in force from `schedule.Plans` and hands it to the objective (`Objective.follow`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from sglr_zoo import finetune
from sglr_zoo.attacks import pgd
from sglr_zoo.data import augment, to_float
from sglr_zoo.errors import UserError
from sglr_zoo.recipe import AttackConfig, Recipe
from sglr_zoo.runstate import SUMS, RunState
from sglr_zoo.schedule import Plans, lr_factor

if TYPE_CHECKING:  # objectives import this module's Callback (through sglr_zoo.averaging)
    from sglr_zoo.objectives import Objective


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class StepParts:
    """What an optimiser step works with. `model` trains (prepared: DDP when several processes, compiled if asked);
    `unwrapped` holds the same weights without DDP or autocast wrapper: the attack runs through it and all-reduces
    nothing. `recipe` gives the data's image size and augmentation and the gradient clipping; `attack` is the
    training attack in force: the recipe's unless a callback changed it (the guard's fallback, sglr_zoo.guard), at
    `eps_scale` times its eps and step size (an eps warm-up, sglr_zoo.warmup). `held` names the optimizer's parameter
    groups that a callback holds still without freezing them (DDP syncs the parameters that require grad at prepare
    time): their learning rate is 0, their gradients stay out of the clipped norm, and the modules made of their
    parameters stay in eval mode (lp_ft's probe, sglr_zoo.lp_ft)."""

    model: nn.Module
    unwrapped: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    recipe: Recipe
    memory_format: torch.memory_format = torch.contiguous_format
    attack: AttackConfig | None = None  # None: the recipe's
    eps_scale: float = 1.0
    held: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.attack = self.attack or self.recipe.attack

    def held_parameters(self) -> list[nn.Parameter]:
        """The parameters of the `held` groups."""
        return [p for group in self.optimizer.param_groups if group.get("name") in self.held for p in group["params"]]


@dataclass(frozen=True)
class StepResult:
    """What one step adds to an epoch's sums (this process's share), and the host time until the attack returned
    (on a GPU, without waiting for it)."""

    loss: torch.Tensor  # the mean loss times the batch size
    adv_correct: torch.Tensor  # adversarial examples classified correctly
    grad_norm: torch.Tensor  # the global gradient norm (held groups' aside) before clipping: the same on every process
    examples: int
    attack_s: float


class Callback:
    """A concern that the loop calls at named points, as Lightning calls its callbacks and accelerate its trackers.
    Every method does nothing unless overridden."""

    def on_step_end(self, state: RunState, result: StepResult) -> None:
        """After each optimiser step; `state.global_step` counts it."""

    def epoch_metrics(self, state: RunState, first_step: int) -> dict[str, float]:
        """Columns of its own for the metrics.csv row of the epoch that began after global step `first_step`."""
        return {}

    def on_epoch_end(self, state: RunState, row: dict[str, float]) -> None:
        """After an epoch's training, monitoring and records (`row`: its metrics.csv row), before its checkpoint."""


def train_step(parts: StepParts, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, *, epoch: int,
               lr: float, step: int = 0, freeze: bool = True) -> StepResult:
    """One optimiser step on a batch of uint8 `images` (indices `index` into the training data) at learning rate
    `lr` (a fine-tuned backbone's group at its `lr_scale` of it; a `held` group's gradients are dropped before the
    update, so that it does not train), in `epoch` (the objective's schedule).

    `step` numbers the step in its epoch for the divergence error; `freeze` is the attack's (`attacks.pgd`).
    Raises TrainingDiverged before the update when the loss is not finite (fp16's loss scaler skips such steps).
    """
    accelerator, recipe = parts.accelerator, parts.recipe
    for group in parts.optimizer.param_groups:  # finetune.param_groups: the backbone's own rate
        group["lr"] = lr * group.get("lr_scale", 1.0)
    started = time.perf_counter()
    x = to_float(images, recipe.data.image_size)
    x = augment(x) if recipe.data.augment else x
    x = x.contiguous(memory_format=parts.memory_format)
    with accelerator.autocast():
        attack = parts.attack
        x_adv = pgd(parts.unwrapped, x, labels, threat=attack.threat, eps=float(attack.eps) * parts.eps_scale,
                    step_size=float(attack.step_size) * parts.eps_scale, steps=attack.steps,
                    random_start=attack.random_start,
                    loss=parts.objective.attack_loss, mode=attack.model_mode, freeze=freeze, noise=attack.noise,
                    project=attack.project)
        attacked = time.perf_counter()
        out = parts.objective(parts.model, x, x_adv, labels, index, epoch)
    loss = out["loss"]
    if not torch.isfinite(loss) and accelerator.mixed_precision != "fp16":
        raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch}, step {step}; nothing was saved for this "
                               "epoch. Lower optim.lr or set optim.grad_clip, then resume")
    accelerator.backward(loss)
    for parameter in parts.held_parameters():  # SGD, the clipped norm and fp16's loss scaler all skip them
        parameter.grad = None
    grad_norm = accelerator.clip_grad_norm_(parts.model.parameters(), recipe.optim.grad_clip or float("inf"))
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.objective.after_step(out, parts.unwrapped, accelerator.gather_for_metrics)
    return StepResult(loss=loss.detach().float() * len(labels), adv_correct=(out["logits"].argmax(1) == labels).sum(),
                      grad_norm=grad_norm, examples=len(labels), attack_s=attacked - started)


def max_steps_reached(global_step: int, *limits: int | None) -> bool:
    """Whether `global_step` has reached any of `limits` (run.max_steps, the plan's steps; None: no limit)."""
    return any(limit and global_step >= limit for limit in limits)


def epoch_steps(first_step: int, batches: int, *limits: int | None) -> int:
    """How many steps an epoch of `batches` that starts after `first_step` runs: cut at run.max_steps or at the
    plan's steps (a budgeted run's last epoch)."""
    return min([batches, *(limit - first_step for limit in limits if limit)])


def train_one_epoch(epoch: int, parts: StepParts, loader: torch.utils.data.DataLoader, state: RunState,
                    plans: Plans, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """One pass over the training data, or up to run.max_steps or the plan's steps. Returns the epoch's training
    metrics, over all processes, with the callbacks' own columns (`Callback.epoch_metrics`), and records in
    `state` where it stopped; an epoch that run.max_steps stopped inside (`state.epoch_step`) goes on after the
    steps done, with their sums."""
    accelerator, recipe = parts.accelerator, parts.recipe
    finetune.set_train_mode(parts.model, parts.held_parameters())  # a frozen or held backbone stays in eval mode
    done = state.epoch_step if state.epoch == epoch else 0
    before = state.epoch_sums if done else {}  # the reduced sums: carried by one process
    sums = {name: torch.tensor(before.get(name, 0.0) if accelerator.is_main_process else 0.0,
                               device=accelerator.device) for name in SUMS}
    started, first_step = time.perf_counter(), state.global_step - done  # the global step the epoch began after

    def limits() -> tuple[int | None, int | None]:
        return recipe.run.max_steps, plans.in_force(state.global_step).steps

    batches = tqdm(accelerator.skip_first_batches(loader, done) if done else loader, initial=done, leave=False,
                   desc=f"epoch {epoch}/{plans.in_force(state.global_step).epochs}",
                   total=epoch_steps(first_step, len(loader), *limits()), disable=not accelerator.is_local_main_process)
    followed = None
    for step, (images, labels, index) in enumerate(batches, start=done):
        plan = plans.in_force(state.global_step)
        if plan is not followed:
            parts.objective.follow(plan)
            followed = plan
        lr = recipe.optim.lr * lr_factor(recipe.schedule, plans.progress(state.global_step), plan.epochs)
        result = train_step(parts, images, labels, index, epoch=epoch, lr=lr, step=step + 1)
        sums["loss"] += result.loss
        sums["adv_correct"] += result.adv_correct
        sums["grad_norm"] += result.grad_norm
        sums["examples"] += result.examples
        sums["steps"] += 1
        state.global_step += 1
        for callback in callbacks:
            callback.on_step_end(state, result)
        batches.total = epoch_steps(first_step, len(loader), *limits())  # a new plan may end the run sooner or later
        if max_steps_reached(state.global_step, *limits()):
            break
    seconds = time.perf_counter() - started + before.get("seconds", 0.0)
    total = dict(zip(sums, accelerator.reduce(torch.stack(list(sums.values())), reduction="sum").tolist(),
                     strict=True))
    position, planned_end = state.global_step - first_step, plans.in_force(state.global_step).steps
    # Stopped inside the epoch by run.max_steps (not at a plan's end): a continued run goes on from here.
    inside = position < len(loader) and not (planned_end and state.global_step >= planned_end)
    state.epoch, state.epoch_step = epoch, position if inside else 0
    state.epoch_sums = {**total, "seconds": seconds} if inside else {}
    group = parts.optimizer.param_groups[0]  # the last step's rate, without a fine-tuned backbone's scale
    return {"steps": position, "lr": group["lr"] / group.get("lr_scale", 1.0),
            "loss": total["loss"] / total["examples"],
            "train_adv_acc": 100 * total["adv_correct"] / total["examples"],
            "grad_norm": total["grad_norm"] / total["steps"], "img_per_s": total["examples"] / seconds,
            "epoch_s": seconds, **{key: value for callback in callbacks
                                   for key, value in callback.epoch_metrics(state, first_step).items()}}
