"""Sanity checks of a robustness evaluation: signs of evaluation bugs and of gradient masking.

Each check returns a `SanityCheck` (passed: True, False, or None when it could not run) that the results keep
and the model card shows. The model-facing checks run the model; the others judge numbers already measured.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from sglr_zoo.attack_names import AttackName
from sglr_zoo.attacks import Threat
from sglr_zoo.errors import UserError
from sglr_zoo.results import AttackStep, SanityCheck

LARGE_EPS = {"linf": Fraction(64, 255), "l2": Fraction(8)}  # robust accuracy must fall to near 0 here
CHECK_EXAMPLES = 100  # the gradient and large-eps checks look at the first 100 examples
NEAR_ZERO = 5.0  # percent: the large-eps bound
SQUARE_TOLERANCE = 0.2  # percentage points Square may add after the white-box attacks (AutoAttack's check_square_sr)


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output, which must be one logits tensor (a UserError names what it returned instead)."""
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise UserError(f"the model returns a {type(out).__name__}, not a logits tensor; evaluation needs a model "
                        "whose forward returns logits of shape (N, classes): wrap it to return only those")
    return out


def eval_mode(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, num_classes: int | None) -> SanityCheck:
    """The output has one logit per class (a UserError if not) and two forward passes agree (else: randomized)."""
    with torch.no_grad():
        first, second = logits_of(model, x), logits_of(model, x)
    classes = num_classes or int(labels.max()) + 1
    if first.dim() != 2 or (first.shape[1] != classes if num_classes else first.shape[1] < classes):
        got = f"{first.shape[1]} logits" if first.dim() == 2 else f"logits of shape {tuple(first.shape[1:])}"
        raise UserError(f"the model outputs {got} per image but the data has {classes} "
                        "classes; evaluate a model trained on this dataset (or pick the matching --dataset)")
    difference = (first - second).abs().max().item()
    same = torch.allclose(first, second, rtol=1e-5, atol=1e-5)
    return SanityCheck(same, f"eval mode; two forward passes differ by at most {difference:.2g}"
                       + ("" if same else ": a randomized model; use --autoattack-version rand"))


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> SanityCheck:
    """Flags gradient masking: the cross-entropy's input gradient is exactly zero for most examples."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits_of(model, x).float(), y, reduction="sum"), [x])
    zero = int((grad.flatten(1).abs().sum(1) == 0).sum())
    passed = zero <= len(x) / 2
    return SanityCheck(passed, f"{zero} of {len(x)} examples have an all-zero input gradient"
                       + ("" if passed else ": gradient masking, white-box attack numbers are unreliable"))


def autoattack_le_pgd(robust: dict[str, float]) -> SanityCheck:
    """AutoAttack, the stronger attack, must not leave more points robust than our PGD."""
    pgd_name = next((name for name in robust if AttackName.is_valid(name) and AttackName.parse(name).kind == "pgd"),
                    None)
    if "autoattack" not in robust or pgd_name is None:
        return SanityCheck(None, "not run: needs both autoattack and a pgd attack")
    return SanityCheck(robust["autoattack"] <= robust[pgd_name],
                       f"autoattack {robust['autoattack']:.2f}% vs {pgd_name} {robust[pgd_name]:.2f}%")


def large_eps(accuracy: float, threat: Threat, n: int) -> SanityCheck:
    """PGD-20 at a huge eps (`LARGE_EPS`) must break nearly everything, else the attack or the model is broken."""
    eps = LARGE_EPS[threat]
    eps_text = str(eps.numerator) if eps.denominator == 1 else f"{eps.numerator}/{eps.denominator}"
    return SanityCheck(accuracy <= NEAR_ZERO, f"pgd20 at eps {eps_text} on {n} examples: {accuracy:.2f}% "
                                              f"(must be <= {NEAR_ZERO}%)")


def square_vs_white_box(per_attack: dict[str, AttackStep]) -> SanityCheck:
    """The black-box Square attack must not break points that AutoAttack's white-box attacks left."""
    names = list(per_attack)
    if "square" not in names or names.index("square") == 0:
        return SanityCheck(None, "not run: needs AutoAttack's per-attack results with square after a white-box "
                                 "attack")
    drop = per_attack[names[names.index("square") - 1]].robust_accuracy - per_attack["square"].robust_accuracy
    passed = drop <= SQUARE_TOLERANCE
    return SanityCheck(passed, f"square lowered robust accuracy by {drop:.2f} points after the white-box "
                               f"attacks (allowed {SQUARE_TOLERANCE})"
                               + ("" if passed else ": likely gradient masking"))
