"""What the evaluator accepts: its options (threat, eps, attacks, seed, an eps sweep) and its inputs (a model in fp32
whose outputs match the classes, images in [0, 1], integer labels), each refusal one line naming the argument."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import nn

from sglr_zoo.attack_names import AttackName
from sglr_zoo.attacks import Threat
from sglr_zoo.errors import UserError
from sglr_zoo.recipe import STANDARD_EPS, eps_problem, parse_fraction


def check_options(threat: str, eps: Fraction | str | float | None, attacks: Sequence[str], batch_size: int,
                  seed: int | None = 0, values: int | None = None) -> tuple[Fraction, dict[str, tuple[str, int]]]:
    """Checks the options every evaluation takes (eps against images of `values` numbers, C x H x W, when known);
    returns eps and our quick attacks as {name: (loss, steps)}."""
    if threat not in STANDARD_EPS:
        raise UserError(f"threat {threat!r}: choose linf or l2")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size {batch_size!r} (--batch-size): give a whole number of examples, at least 1")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise UserError(f"seed {seed!r} (--seed): give a whole number in [0, 2**32 - 1]")
    try:
        value = parse_fraction(eps if eps is not None else STANDARD_EPS[threat])
    except ValueError as error:
        raise UserError(f"eps (--eps): {error}") from None
    problem = eps_problem(threat, value, values)
    if problem:
        raise UserError(f"eps (--eps): {problem}")
    quick = {}
    for name in attacks:
        try:
            spec = AttackName.parse(name)
        except ValueError as error:
            raise UserError(str(error)) from None
        if spec.steps:
            quick[name] = ("ce" if spec.kind == "pgd" else "cw", spec.steps)
    return value, quick


def sweep_radii(threat: Threat, radii: Sequence[Fraction | str], attack: str, dims: int) -> list[Fraction]:
    """The sweep's radii, ascending with 0 first; UserError naming --eps-sweep for a bad one."""
    if not radii:
        return []
    try:
        spec = AttackName.parse(attack)
        values = sorted({Fraction(0), *(parse_fraction(r) for r in radii)})
    except ValueError as error:
        raise UserError(f"--eps-sweep: {error}") from None
    if spec.kind == "clean":
        raise UserError("--eps-sweep: clean accuracy does not depend on eps; sweep pgd<steps>, cw<steps> or autoattack")
    for value in values:
        if problem := eps_problem(threat, value, dims):
            raise UserError(f"--eps-sweep: {str(value)}: {problem}")
    return values


def check_inputs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None
                  ) -> torch.Tensor:
    """Images are finite floats in [0, 1], labels integer classes that match them, and the model takes [0, 1]
    images in fp32; returns the labels as int64 (what the losses index with)."""
    from sglr_zoo.models import Normalized, is_sglr_arch

    if not images.is_floating_point() or images.dim() != 4:
        raise UserError(f"images must be float (N, C, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}; "
                        "convert uint8 images with sglr_zoo.data.to_float")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype == torch.bool \
            or labels.is_floating_point() or labels.is_complex():
        got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise UserError(f"labels must be integer class indices of shape (N,), got {got}")
    if len(images) == 0 or len(images) != len(labels):
        raise UserError(f"got {len(images)} images and {len(labels)} labels; need the same, non-zero number")
    labels = labels.long()
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"in [0, {num_classes})" if num_classes is not None else ">= 0"
        raise UserError(f"labels range over [{low}, {high}]; class indices are {bound}")
    if not torch.isfinite(images).all():
        raise UserError("images hold NaN or infinite values; pass finite images in [0, 1]")
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise UserError(f"images range over [{low:.3g}, {high:.3g}]; models here take [0, 1] images and normalise "
                        "inside, so pass unnormalised images")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", (0.0,) * 3)), tuple(cfg.get("std", (1.0,) * 3))
    if not isinstance(model, Normalized) and not is_sglr_arch(cfg.get("architecture", "")) \
            and (any(mean) or any(s != 1 for s in std)):
        raise UserError(f"the model expects normalised inputs (pretrained_cfg mean={mean}, std={std}); wrap it as "
                        "sglr_zoo.models.Normalized(model, mean, std) so that it takes [0, 1] images")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise UserError(f"the model's weights are {sorted(map(str, dtypes))}; evaluation runs in fp32: "
                        "call model.float()")
    return labels
