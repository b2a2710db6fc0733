"""The catastrophic-overfitting guard of single-step adversarial training: a loop callback (`OverfittingGuard`).

Single-step training (FGSM with a random start, N-FGSM) can collapse within a few hundred steps: its own
single-step accuracy climbs while multi-step PGD accuracy falls to near zero (Wong et al., 2020, "Fast is better
than free"). Every guard.every steps the guard measures PGD accuracy on the same held-out images; a check that
passes is kept in memory (the weights, the optimizer, the objective and whatever else it protects); a collapse
restores the last passing check and trains on with a multi-step PGD. The data position, the step count and the
learning-rate schedule go on: the compute spent stays spent.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from sglr_zoo import finetune
from sglr_zoo.data import ImageSet, to_float
from sglr_zoo.evaluate import attack_correct
from sglr_zoo.loop import Callback, StepParts, StepResult
from sglr_zoo.recipe import AttackConfig
from sglr_zoo.runstate import RunState


class Stateful(Protocol):
    """What the guard protects: a module, an optimizer, an objective, a weight average."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def fallback_attack(attack: AttackConfig, steps: int) -> AttackConfig:
    """`attack` made PGD-`steps` at the same radius, threat and model mode: step 2.5 eps / steps (Madry et al.'s
    heuristic), random start in the eps-ball, projected."""
    return dataclasses.replace(attack, steps=steps, step_size=Fraction(5, 2) * attack.eps / steps, random_start=True,
                               noise=1.0, project=True)


class OverfittingGuard(Callback):
    """Watches PGD-guard.steps accuracy on the first guard.n images of `held_out` (fp32, eval mode, at the recipe's
    eval_eps: the evaluator's PGD) every guard.every steps, on every process its share. guard.patience checks in a
    row below guard.drop times the best so far are a collapse (one alone may be the noise of a few hundred images
    at a high learning rate): `protect` goes back to the last check that passed and `parts.attack` becomes
    PGD-guard.fallback_steps. A run whose `state` holds a rollback trains on with that attack."""

    def __init__(self, parts: StepParts, held_out: ImageSet, protect: Sequence[Stateful], state: RunState) -> None:
        self.parts, self.cfg, self.protect = parts, parts.recipe.guard, list(protect)
        accelerator = parts.accelerator
        self.n = min(self.cfg.n, len(held_out))
        mine = torch.arange(accelerator.process_index, self.n, accelerator.num_processes)
        self.images = to_float(held_out.images[mine], parts.recipe.data.image_size)
        self.labels = held_out.labels[mine]
        self.snapshot: list[dict[str, Any]] | None = None  # the protected states at the last check that passed
        self.snapshot_step: int | None = None
        self.below = 0  # checks in a row under the threshold (a resumed run counts afresh)
        accelerator.print(f"catastrophic-overfitting guard: PGD-{self.cfg.steps} on {self.n} held-out images every "
                          f"{self.cfg.every} steps; {self.cfg.patience} in a row below {self.cfg.drop:g} x its best: "
                          f"back to the last check passed and on with PGD-{self.cfg.fallback_steps}")
        if state.guard_events:
            event = state.guard_events[-1]
            self.parts.attack = fallback_attack(parts.recipe.attack, event["fallback_steps"])
            accelerator.print(f"guard: training with PGD-{event['fallback_steps']} since its rollback at step "
                              f"{event['step']}")

    def check(self) -> float:
        """PGD accuracy (%) on the held-out images, over all processes. It draws no random number that training
        would, and leaves the model in training mode."""
        parts, recipe, device = self.parts, self.parts.recipe, self.parts.accelerator.device
        correct = 0
        if len(self.labels):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                correct = int(attack_correct(parts.unwrapped, self.images, self.labels, attack=f"pgd{self.cfg.steps}",
                                             threat=recipe.attack.threat, eps=recipe.eval_eps,
                                             batch_size=recipe.eval.batch_size, device=device).sum())
        finetune.set_train_mode(parts.model, parts.held_parameters())
        total = parts.accelerator.reduce(torch.tensor(correct, device=device), reduction="sum")
        return 100 * total.item() / self.n

    def on_step_end(self, state: RunState, result: StepResult) -> None:
        if state.global_step % self.cfg.every:
            return
        accuracy = self.check()
        state.guard_check = {"step": state.global_step, "accuracy": accuracy}
        if state.guard_best > 0 and accuracy < self.cfg.drop * state.guard_best:
            self.below += 1  # not a passing check: neither kept nor the best
            if self.below >= self.cfg.patience:
                self.below = 0
                self.roll_back(state, accuracy)
            return
        self.below = 0
        self.snapshot = [copy.deepcopy(item.state_dict()) for item in self.protect]
        self.snapshot_step = state.global_step
        state.guard_best = max(state.guard_best, accuracy)

    def roll_back(self, state: RunState, accuracy: float) -> None:
        """Restores the last check that passed (none since the start or the resume: nothing to restore), switches
        to the fallback attack and records the event in `state`."""
        if self.snapshot is not None:
            for item, saved in zip(self.protect, self.snapshot, strict=True):
                item.load_state_dict(copy.deepcopy(saved))  # an optimizer keeps the tensors it is given: copies
        epoch = state.epoch + (state.epoch_step == 0)  # state.epoch is the last epoch finished, or this one's part
        state.guard_events.append({"step": state.global_step, "epoch": epoch, "accuracy": accuracy,
                                   "best": state.guard_best, "restored_step": self.snapshot_step,
                                   "fallback_steps": self.cfg.fallback_steps})
        self.parts.attack = fallback_attack(self.parts.recipe.attack, self.cfg.fallback_steps)
        if self.parts.accelerator.is_main_process:
            restored = f"back to step {self.snapshot_step}" if self.snapshot is not None else "nothing to restore"
            tqdm.write(f"guard: PGD-{self.cfg.steps} accuracy {accuracy:.1f}% < {self.cfg.drop:g} x best "
                       f"{state.guard_best:.1f}% at step {state.global_step}: catastrophic overfitting; {restored}, "
                       f"training on with PGD-{self.cfg.fallback_steps}")

    def epoch_metrics(self, state: RunState, first_step: int) -> dict[str, float]:
        check = state.guard_check
        accuracy = {f"guard_pgd{self.cfg.steps}_acc": check["accuracy"]} if check.get("step", 0) > first_step else {}
        return {**accuracy, "guard_rollbacks": len(state.guard_events)}

    def record(self, state: RunState) -> dict[str, Any]:
        """run.json's `guard`: the settings, the images checked, the best check and the rollbacks."""
        return {"enabled": True, **{k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "enabled"},
                "n": self.n, "best": state.guard_best if state.guard_best >= 0 else None,
                "events": state.guard_events}
