"""PGD in pixel space: one loop over a threat model's random start, step and projection (plain torch)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Threat = Literal["linf", "l2"]
AttackLoss = Literal["ce", "cw", "kl"]


# Random starts are drawn in the logical (contiguous) order: the same seed gives the same start whether x is stored
# channels_last or not (`*_like` would follow x's memory layout).
LOGICAL_ORDER = torch.contiguous_format


def _per_example_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))


class LinfThreat:
    """L-inf ball: uniform random start, signed-gradient step, clipping projection."""

    def __init__(self, eps: float):
        self.eps = eps

    def random_start(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.empty_like(x, memory_format=LOGICAL_ORDER).uniform_(-self.eps, self.eps)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        return x_adv + step_size * grad.sign()

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.min(torch.max(x_adv, x - self.eps), x + self.eps)


class L2Threat:
    """L2 ball: random start on the sphere, normalised-gradient step, radial projection (as in MadryLab's
    robustness)."""

    def __init__(self, eps: float):
        self.eps = eps

    def random_start(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x, memory_format=LOGICAL_ORDER)
        return x + self.eps * noise / _per_example_norm(noise)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        return x_adv + step_size * grad / _per_example_norm(grad)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        delta = x_adv - x
        return x + delta * (self.eps / _per_example_norm(delta)).clamp(max=1.0)


THREATS = {"linf": LinfThreat, "l2": L2Threat}


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: Literal["eval", "train"]) -> Iterator[None]:
    """Sets the model's train/eval mode for the block and restores every submodule's mode afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.train(mode == "train")
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients for the block (and are restored after): an attack needs gradients with
    respect to its input only, and a graph without weight gradients is smaller; torch.compile pays only then."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: max wrong logit minus true logit (maximised by the attack), summed."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (wrong - true).sum()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: Threat = "linf",
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    loss: AttackLoss = "ce",
    mode: Literal["eval", "train"] = "eval",
    freeze: bool = True,
    noise: float = 1.0,
    project: bool = True,
) -> torch.Tensor:
    """Projected gradient ascent on `loss` within the eps-ball around x, clipped to [0, 1].

    loss: "ce" (cross-entropy on y), "cw" (CW margin on y) or "kl" (TRADES: KL to the clean prediction;
    starts from x + 0.001 N(0, 1) as in TRADES' code). The random start lies in the ball of `noise` x eps;
    without `project` nothing is projected back into the eps-ball: with noise 2 and one step of eps, that is
    N-FGSM (de Jorge et al. 2022). Gradients are taken with respect to the input
    only (with `freeze`, the parameters do not require gradients meanwhile: same result, less work), the loss is
    computed in fp32 even under autocast, and the model's mode is restored afterwards.
    """
    if eps == 0:
        return x.detach().clone()
    ball = THREATS[threat](eps)
    x = x.detach()
    with model_mode(model, mode), frozen_parameters(model) if freeze else contextlib.nullcontext():
        if loss == "kl":
            with torch.no_grad():
                clean_probs = model(x).float().softmax(1)
            x_adv = x + 0.001 * torch.randn_like(x, memory_format=LOGICAL_ORDER)
        else:
            x_adv = THREATS[threat](eps * noise).random_start(x) if random_start else x.clone()
        x_adv = (ball.project(x_adv, x) if project else x_adv).clamp_(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv).float()
            if loss == "ce":
                objective = F.cross_entropy(logits, y, reduction="sum")
            elif loss == "cw":
                objective = cw_margin_loss(logits, y)
            else:
                objective = F.kl_div(logits.log_softmax(1), clean_probs, reduction="sum")
            (grad,) = torch.autograd.grad(objective, [x_adv])
            x_adv = ball.step(x_adv.detach(), grad, step_size)
            x_adv = (ball.project(x_adv, x) if project else x_adv).clamp_(0, 1)
    return x_adv.detach()
