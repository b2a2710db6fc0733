"""Typed training recipes: YAML files mapped onto dataclasses, with `key.sub=value` overrides."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml

from sglr_zoo.attack_names import CHOICES as ATTACK_CHOICES
from sglr_zoo.attack_names import AttackName
from sglr_zoo.errors import UserError
from sglr_zoo.files import read_regular, write_atomic
from sglr_zoo.schedule import parse_budget

STANDARD_EPS = {"linf": Fraction(8, 255), "l2": Fraction(1, 2)}  # RobustBench's CIFAR radii
MAX_RECIPE_BYTES = 1 << 20  # recipes are a few kB; a bigger file is a mistake, refused before it is parsed
_MAX_DEPTH = 32  # nesting levels (recipes use 3); PyYAML's composer recurses once per level
MAX_IMAGE_SIZE = 1024  # data.image_size: pixels per side; CIFAR models take 32, ImageNet ones 224
MAX_THREADS = 4096  # run.threads: more than any machine has; a recipe travels between machines, so no cpu_count()
MAX_WORKERS = 256  # run.num_workers: data-loading processes
MAX_LR = 10.0  # optim.lr: SGD's rates are 0.01-0.4; 10 and more only diverge
_HUGE_EXPONENT = re.compile(r"[eE][-+]?0*[0-9]{4,}")  # Fraction("1e99999") would build a 10**99999 integer


def parse_fraction(value: Any) -> Fraction:
    """Reads `8/255`, `0.5`, `2` (str, int or float) into an exact fraction that is finite as a float too."""
    huge_exponent = isinstance(value, str) and _HUGE_EXPONENT.search(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Fraction)) or huge_exponent:
        raise ValueError(f"expected a finite number or a fraction like 8/255, got {value!r}")
    try:
        # str(float) is the shortest decimal that reads back as the float: 0.1 becomes 1/10.
        result = Fraction(value.replace(" ", "") if isinstance(value, str) else str(value) if isinstance(value, float)
                          else value)
        float(result)  # 1e400 has no float
    except (ValueError, ZeroDivisionError, OverflowError):  # nan, inf, 1/0, text
        raise ValueError(f"expected a finite number or a fraction like 8/255, got {value!r}") from None
    return result


def eps_problem(threat: str, eps: Fraction, values: int | None) -> str | None:
    """Why `eps` is no radius for `threat` on [0, 1] images of `values` numbers (C x H x W; None: unknown), or None.

    A radius is >= 0 and at most what reaches every image: 1 for linf (the whole pixel range), the image cube's
    diagonal sqrt(values) for l2.
    """
    if eps < 0:
        return "must be >= 0"
    if threat == "linf" and eps > 1:
        return (f"{format_fraction(eps)} is more than 1, the whole [0, 1] pixel range, for a linf radius; write "
                "pixel units as k/255 (8/255 is standard)")
    if threat == "l2" and values is not None and eps * eps > values:
        return (f"{format_fraction(eps)} is more than {math.sqrt(values):.4g}, the diameter of [0, 1] images of "
                f"{values} values, for an l2 radius (1/2 is standard)")
    return None


def format_fraction(value: Fraction) -> str | int | float:
    """The YAML form of a fraction: an int, a short decimal, `k/255` (pixel units) or `p/q`."""
    if value.denominator == 1:
        return value.numerator
    if Fraction(str(float(value))) == value and len(str(float(value))) <= 8:
        return float(value)
    if 255 % value.denominator == 0 and value.denominator % 17 == 0:  # pixel units: 3/255, not 1/85
        return f"{value * 255}/255"
    return f"{value.numerator}/{value.denominator}"


@dataclass
class DataConfig:
    """Where the images come from and how they are fed."""

    dataset: str = "uoft-cs/cifar10"  # Hub id, local parquet folder, image folder or CSV of image paths
    image_column: str | None = None  # found automatically when None
    label_column: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    n_train: int | None = None  # first n examples only (quick runs)
    n_test: int | None = None
    val_size: int = 0  # held out from the end of train for model selection
    image_size: int = 32
    augment: bool = True  # random crop (pad 4) and horizontal flip
    num_classes: int | None = None  # read from the dataset when None
    holdout_fraction: float = 0.1  # of train, held out (stratified, fixed seed) as the test split when there is none

    def __post_init__(self) -> None:
        _check(0 < self.holdout_fraction < 1, "holdout_fraction", "must be in (0, 1)")
        _check(self.n_train is None or self.n_train >= 1, "n_train", "must be >= 1 or null")
        _check(self.n_test is None or self.n_test >= 1, "n_test", "must be >= 1 or null")
        _check(self.val_size >= 0, "val_size", "must be >= 0")
        _check(8 <= self.image_size <= MAX_IMAGE_SIZE, "image_size", f"must be in [8, {MAX_IMAGE_SIZE}] (pixels a side)")
        _check(self.num_classes is None or self.num_classes >= 2, "num_classes", "must be >= 2 or null")


@dataclass
class ModelConfig:
    """Any timm architecture; ours are `wrn34_10_cifar`, `preactresnet18_cifar`, `resnet18_cifar`, ..."""

    arch: str = "preactresnet18_cifar"
    pretrained: str | None = None  # a local-dir:/hf-hub: id, zoo name or run directory to start from
    mean: list[float] | None = None  # normalisation applied inside the model; None = none (inputs in [0, 1])
    std: list[float] | None = None
    # timm's drop_rate: dropout before the classifier; in our WideResNets, inside every block instead (the
    # original WRN's dropout, as in the TRADES code's WideResNet)
    drop_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed on to timm.create_model

    def __post_init__(self) -> None:
        _check(bool(self.arch), "arch", "must name a timm architecture (see `timm.list_models('*cifar*')`)")
        _check((self.mean is None) == (self.std is None), "mean", "mean and std must be given together")
        if self.std is not None:
            _check(len(self.std) == len(self.mean or []) and all(s > 0 for s in self.std), "std",
                   "must be positive, one value per channel like mean")
        _check(0 <= self.drop_rate < 1, "drop_rate", "must be in [0, 1)")


@dataclass
class AttackConfig:
    """The PGD attack used to make training examples (and the per-epoch robust accuracy)."""

    threat: Literal["linf", "l2"] = "linf"
    eps: Fraction = Fraction(8, 255)
    step_size: Fraction = Fraction(2, 255)
    steps: int = 10
    random_start: bool = True
    noise: float = 1.0  # the random start's radius in multiples of eps (N-FGSM: 2)
    project: bool = True  # keep each step inside the eps-ball (false: N-FGSM, whose step may leave it)
    model_mode: Literal["eval", "train"] = "eval"  # BatchNorm mode while attacking
    # eps warm-up: eps and step_size ramp from warmup_from x their values up to them over the first `warmup` of the
    # run's steps (0: none); monitoring and evaluation always attack at the full eps
    warmup: float = 0.0
    warmup_from: float = 0.0
    warmup_shape: Literal["linear", "cosine"] = "linear"

    def __post_init__(self) -> None:
        _check(0 <= self.warmup <= 1, "warmup", "must be in [0, 1]: the fraction of the run over which eps ramps up")
        _check(0 <= self.warmup_from < 1, "warmup_from", "must be in [0, 1): the fraction of eps the ramp starts at")
        _check(self.eps >= 0, "eps", "must be >= 0")
        _check(self.step_size > 0, "step_size", "must be > 0")
        _check(self.steps >= 1, "steps", "must be >= 1")
        _check(0 < self.noise <= 16, "noise", "must be in (0, 16]: multiples of eps (1 = the eps-ball; N-FGSM: 2)")


@dataclass
class MethodConfig:
    """The training objective; see shared/SGLR.md for the meaning of each knob."""

    name: Literal["sglr", "pgd_at", "trades", "sglr_trades"] = "sglr"
    alpha: float = 0.9  # EMA momentum of the soft-label bank
    start_epoch: float = 90  # epoch (1-based) from which refined labels are used; < 1 = fraction of the run
    adv_weight: float = 0.8  # weight of the adversarial prediction in the bank update (clean gets the rest)
    temperature: float = 1.0
    r_hard: float = 0.0  # weight kept on the one-hot label at every step (paper's formula); 0 = authors' code
    teacher: Literal["predictions", "weights"] = "predictions"
    teacher_decay: float = 0.999  # EMA decay of the weight teacher
    beta: float = 6.0  # TRADES KL weight
    bank_dtype: Literal["auto", "float32", "float16"] = "auto"  # soft-label storage; auto = float16 above 256 MiB
    # Smooths hard labels only: PGD-AT's and TRADES' cross-entropy, SGLR's before start_epoch and its r_hard
    # one-hot share; SGLR's refined labels are already soft and are not smoothed again.
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        _check(0 <= self.alpha < 1, "alpha", "must be in [0, 1)")
        _check(self.start_epoch >= 0, "start_epoch", "must be >= 0 (an epoch, or a fraction of the run if < 1)")
        _check(0 <= self.adv_weight <= 1, "adv_weight", "must be in [0, 1]")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(0 <= self.r_hard <= 1, "r_hard", "must be in [0, 1]")
        _check(0 <= self.teacher_decay < 1, "teacher_decay", "must be in [0, 1)")
        _check(self.beta >= 0, "beta", "must be >= 0")


@dataclass
class OptimConfig:
    """SGD with momentum, as in the paper."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    grad_clip: float | None = None  # max gradient norm; None = no clipping

    def __post_init__(self) -> None:
        _check(0 < self.lr <= MAX_LR, "lr", f"must be in (0, {MAX_LR:g}]")
        _check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        _check(0 <= self.weight_decay <= 1, "weight_decay", "must be in [0, 1] (5e-4 is usual)")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null")


@dataclass
class ScheduleConfig:
    """Epochs and the learning-rate schedule (stepped every batch)."""

    epochs: int = 200
    name: Literal["multistep", "cosine", "onecycle", "constant"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [100, 150])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    peak_at: float = 0.25  # onecycle: fraction of the run spent rising to lr
    steps: int | None = None  # total optimiser steps, the schedule stretched over them; None = epochs x the data
    budget: str | float | None = None  # e.g. 8m or 480 (s): the trainer sizes epochs and steps to fit (see schedule.py)
    # The plans to repeat instead of planning: a run's plans.json (what a budgeted run records), or, as budgeted runs
    # of sglr_zoo 0.x recorded them, [from_step, end_step] per plan, the first from step 0, the last ending at `steps`
    # (see schedule.schedule_fraction). Null: the budget plans, else the schedule spans `steps` evenly.
    plans: list[list[int]] | str | None = None

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.steps is None or self.steps >= 1, "steps", "must be >= 1 or null")
        _check(not isinstance(self.plans, str) or self.plans.strip() != "", "plans",
               "give a run's plans.json, or null")
        if isinstance(self.plans, list):
            starts = [plan[0] for plan in self.plans if len(plan) == 2]
            _check(len(starts) == len(self.plans) > 0 and starts[0] == 0 and self.plans[-1][1] == self.steps
                   and all(start < end for start, end in self.plans)
                   and all(before[0] < after[0] < before[1] for before, after in zip(self.plans, self.plans[1:])), "plans",
                   "is written by a budgeted run: [from_step, end_step] pairs, the first from 0, each from before the "
                   "previous end, the last ending at schedule.steps; set it to null to spread the schedule evenly "
                   "over schedule.steps")
        if self.budget is not None:
            try:
                parse_budget(self.budget)
            except ValueError as error:
                raise _CheckFailed("budget", str(error)) from None
            _check(self.name != "multistep", "budget", "needs a cosine, onecycle or constant schedule (multistep "
                   "milestones are epochs, which the budget decides)")
            _check(self.warmup_epochs == 0, "warmup_epochs", "must be 0 with a budget, which decides the epochs "
                   "(onecycle warms up over its first peak_at of the run)")
        _check(self.name != "multistep" or all(0 < m <= self.epochs for m in self.milestones), "milestones",
               "must lie in [1, epochs] for the multistep schedule")
        _check(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        _check(0 <= self.warmup_epochs < self.epochs, "warmup_epochs", "must be in [0, epochs)")
        _check(0 < self.peak_at < 1, "peak_at", "must be in (0, 1)")


@dataclass
class EvalConfig:
    """Per-epoch monitoring: clean and PGD accuracy on the first n examples of each split."""

    n: int = 1000
    steps: int = 10
    every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    batch_size: int = 256
    final_attacks: list[str] = field(default_factory=lambda: ["clean", "pgd20"])  # run on the exports at the end
    final_n: int = 1000  # first n test examples for the final evaluation
    eps: Fraction | None = None  # attack radius of monitoring and final evaluation; None: Recipe.eval_eps

    def __post_init__(self) -> None:
        _check(self.eps is None or self.eps >= 0, "eps", "must be >= 0 (or null: attack.eps, else the threat's standard)")
        _check(self.n >= 1, "n", "must be >= 1")
        _check(self.final_n >= 1, "final_n", "must be >= 1")
        _check(all(map(AttackName.is_valid, self.final_attacks)), "final_attacks",
               f"each must be one of {ATTACK_CHOICES}")
        _check(self.steps >= 1, "steps", "must be >= 1")
        _check(self.every >= 1, "every", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass
class RunConfig:
    """Where the run goes and how it is executed."""

    output_dir: str = "runs"
    name: str | None = None  # run directory name; the recipe file's stem when None
    seed: int = 0
    batch_size: int = 128  # global batch size, split over processes
    # The speed levers: `auto` = what sglr_zoo.hardware measured fastest on this kind of device (bf16 only where
    # the device computes it natively); explicit values win.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto"] | bool = "auto"
    compile: Literal["auto"] | bool = "auto"  # torch.compile
    threads: Literal["auto"] | int = "auto"  # CPU threads per process
    keep_freed_memory: Literal["auto"] | bool = "auto"  # glibc malloc keeps freed memory (fewer page faults on CPU)
    cudnn_benchmark: Literal["auto"] | bool = "auto"  # cuDNN times its convolution algorithms per shape (GPUs)
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 2
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch when several processes train
    buffer_sync: Literal["broadcast", "average"] = "broadcast"  # BatchNorm statistics at epoch ends: rank 0's or the mean
    resume: str = "auto"  # auto | never | path to a checkpoint directory
    max_steps: int | None = None  # stop after this many steps (smoke tests); None = the full schedule
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or null")
        _check(0 <= self.num_workers <= MAX_WORKERS, "num_workers", f"must be in [0, {MAX_WORKERS}]")
        _check(self.threads == "auto" or 1 <= self.threads <= MAX_THREADS, "threads",
               f"must be auto or in [1, {MAX_THREADS}]")
        _check(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32 - 1] (what numpy's generator takes)")


@dataclass
class FinetuneConfig:
    """Adapting a pretrained backbone to new data (sglr_zoo.finetune); off while `backbone` is null.

    Clean fine-tuning is `attack.eps: 0` with any method; otherwise the recipe's method and attack apply.
    """

    backbone: str | None = None  # zoo name, hf-hub:ORG/NAME[@rev], local-dir:PATH, run dir, or timm name.tag
    backbone_sha256: str | None = None  # of its model.safetensors: checked when given, recorded when null
    backbone_revision: str | None = None  # Hub commit of an hf-hub backbone: used when given, recorded when null
    mode: Literal["linear_probe", "full", "partial"] = "full"
    unfreeze: int = 1  # partial: the last N stages of the model's feature_info train, with all layers after them
    backbone_lr_scale: float = 1.0  # learning rate of the trainable backbone parameters, relative to optim.lr
    head: Literal["auto", "reset", "keep"] = "auto"  # auto: reset unless the label names match the backbone's

    def __post_init__(self) -> None:
        _check(self.unfreeze >= 1, "unfreeze", "must be >= 1 (the number of last stages that train)")
        _check(self.backbone_lr_scale > 0, "backbone_lr_scale", "must be > 0 (use mode: linear_probe to freeze)")
        _check(self.backbone is not None or (self.mode == "full" and self.head == "auto"), "backbone",
               "name the backbone to fine-tune (a zoo name, hf-hub:ORG/NAME, local-dir:PATH or a run directory)")
        _check(self.backbone_sha256 is None or re.fullmatch(r"[0-9a-f]{64}", self.backbone_sha256) is not None,
               "backbone_sha256", "must be 64 lowercase hex digits (sha256sum of model.safetensors)")


@dataclass
class AverageConfig:
    """An exponential moving average of the weights (sglr_zoo.averaging, timm's ModelEmaV3): when on, it is what
    the per-epoch monitoring measures, what picks and fills `best/`, and what `last/` holds."""

    decay: float = 0.0  # per optimiser step; 0 = off
    start: float = 0.0  # fraction of the run's steps before which the average copies the weights (decay 0)
    buffers: Literal["average", "copy"] = "average"  # BatchNorm running statistics: averaged like the weights, or copied

    def __post_init__(self) -> None:
        _check(0 <= self.decay < 1, "decay", "must be in [0, 1) (0: off; 0.999 averages about the last 1,000 steps)")
        _check(0 <= self.start < 1, "start", "must be in [0, 1): the fraction of the run before averaging starts")


@dataclass
class GuardConfig:
    """The catastrophic-overfitting guard of single-step training (sglr_zoo.guard): every `every` steps it measures
    PGD accuracy on the first `n` held-out images; after `patience` checks in a row below `drop` times its best so
    far, the run goes back to the last check that passed and trains on with PGD-`fallback_steps` (step 2.5 eps /
    steps, random start)."""

    enabled: Literal["auto"] | bool = "auto"  # auto: on when the training attack takes one step
    every: int = 100  # optimiser steps between checks
    n: int = 128  # images: the first of the validation split, else of the test split (as the monitoring)
    steps: int = 10  # PGD steps of the check (the evaluator's PGD: step eps/4, random start)
    drop: float = 0.5  # a collapse: PGD accuracy below drop x the best check so far ...
    patience: int = 2  # ... in this many checks in a row
    fallback_steps: int = 2

    def __post_init__(self) -> None:
        _check(self.every >= 1, "every", "must be >= 1 (optimiser steps between checks)")
        _check(self.n >= 1, "n", "must be >= 1 (held-out images checked)")
        _check(self.steps >= 2, "steps", "must be >= 2: a multi-step PGD is what single-step training overfits against")
        _check(0 < self.drop < 1, "drop", "must be in (0, 1)")
        _check(self.patience >= 1, "patience", "must be >= 1 (checks in a row below the threshold)")
        _check(self.fallback_steps >= 2, "fallback_steps", "must be >= 2 (a multi-step attack)")


@dataclass
class Recipe:
    """A whole training recipe."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    average: AverageConfig = field(default_factory=AverageConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        _check(self.model.pretrained is None or self.finetune.backbone is None, "model.pretrained",
               "give the backbone once: finetune.backbone (model.pretrained is its older, shorter form)")
        values = 3 * self.data.image_size**2  # images are decoded to RGB
        for key, eps in (("attack.eps", self.attack.eps), ("eval.eps", self.eval.eps)):
            problem = None if eps is None else eps_problem(self.attack.threat, eps, values)
            _check(problem is None, key, problem)
        if self.method.start_epoch >= 1:
            _check(self.method.start_epoch <= self.schedule.epochs + 1, "method.start_epoch",
                   f"must be <= epochs + 1 = {self.schedule.epochs + 1} (or a fraction < 1)")
        _check(self.guard.enabled is not True or self.attack.eps > 0, "guard.enabled",
               "needs adversarial training (attack.eps > 0): clean training has no attack to fall back from")

    @property
    def start_epoch(self) -> int:
        """The 1-based epoch from which SGLR uses refined labels; a fraction f < 1 means epoch round(f * epochs)."""
        start = self.method.start_epoch
        return max(1, round(start * self.schedule.epochs)) if start < 1 else int(start)

    @property
    def guarded(self) -> bool:
        """Whether the catastrophic-overfitting guard runs: guard.enabled, where auto means single-step adversarial
        training (attack.steps 1, attack.eps > 0: FGSM with a random start, N-FGSM)."""
        if self.guard.enabled == "auto":
            return self.attack.steps == 1 and self.attack.eps > 0
        return self.guard.enabled

    @property
    def eval_eps(self) -> Fraction:
        """The radius robust accuracy is measured at: eval.eps, else attack.eps, else (clean training, attack.eps
        0) the threat's standard radius (8/255 linf, 1/2 l2), so that a clean model's robustness is still reported."""
        if self.eval.eps is not None:
            return self.eval.eps
        return self.attack.eps or STANDARD_EPS[self.attack.threat]

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-safe dict (fractions written as `p/q`)."""
        return _to_plain(dataclasses.asdict(self))


class _CheckFailed(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise _CheckFailed(key, message)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, Fraction):
        return format_fraction(value)
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Checks `value` against a type hint, converting fractions; raises UserError naming `where`."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UserError as error:
                errors.append(error)
        if len(errors) > 1:  # name every accepted form, not only the first one tried
            accepted = " or ".join(_describe(option) for option in options if option is not type(None))
            raise UserError(f"{where}: expected {accepted}, got {value!r}")
        raise errors[0]
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise UserError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        _check_finite(value, where)
        return dict(value)
    if hint in (Fraction, float):
        try:
            number = parse_fraction(value)
        except ValueError as error:
            raise UserError(f"{where}: {error}") from None
        return number if hint is Fraction else float(number)
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise UserError(f"{where}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    return "true or false" if hint is bool else getattr(hint, "__name__", str(hint))


def _check_finite(value: Any, where: str) -> None:
    """Refuses inf and nan anywhere in a free-form value (such as model.kwargs), and keys that are not names."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UserError(f"{where}: key {key!r} must be a name (a string)")
            _check_finite(item, f"{where}.{key}")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates the annotations' text (`from __future__ import annotations`): once


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = _type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(f"unknown key {prefix}{unknown[0]!s}; allowed keys{' in ' + where if where else ''}: "
                        f"{', '.join(sorted(known))}")
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        values[name] = _build(hint, value, key) if dataclasses.is_dataclass(hint) else _coerce(value, hint, key)
    try:
        return cls(**values)
    except _CheckFailed as error:
        key = error.key if "." in error.key or not where else f"{where}.{error.key}"
        raise UserError(f"{key}: {error}") from None


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a recipe may not use (anchors, tags, duplicate keys, deep nesting)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars, no anchors, aliases or tags, and duplicate keys refused.

    Only `true`/`false` are booleans (`no` stays a string), `010` is ten, and aliases are refused while parsing, so
    a "billion laughs" file fails before anything is expanded.
    """

    yaml_implicit_resolvers: dict = {}  # filled below with the 1.2 core schema only (no 1.1 yes/no, octal, dates)

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        event = self.peek_event()
        if event.anchor is not None:  # both &anchor and *alias
            raise _Refused(problem="anchors and aliases (&name, *name) are not allowed in recipes; write the value out",
                           problem_mark=event.start_mark)
        if getattr(event, "tag", None) is not None:
            raise _Refused(problem=f"tags ({event.tag}) are not allowed in recipes", problem_mark=event.start_mark)
        if self.depth >= _MAX_DEPTH:
            raise _Refused(problem=f"nested more than {_MAX_DEPTH} levels deep", problem_mark=event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[str, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag != "tag:yaml.org,2002:str":
                raise _Refused(problem=f"key {key_node.value!r} must be a name; quote it if it is one",
                               problem_mark=key_node.start_mark)
            if key_node.value in lines:
                raise _Refused(problem=f"duplicate key {key_node.value!r} (first on line {lines[key_node.value]})",
                               problem_mark=key_node.start_mark)
            lines[key_node.value] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        base = {"0o": 8, "0x": 16}.get(text[:2], 10)
        try:
            return int(text[2:] if base != 10 else text, base)  # int("010") is 10: no 1.1 octal
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise _Refused(problem=f"the number {text[:20]}... is too long", problem_mark=node.start_mark) from None


# https://yaml.org/spec/1.2.2/#1032-tag-resolution
for _tag, _pattern, _first in [
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    ("float", r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
     list("-+.0123456789")),
]:
    _StrictLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(rf"(?:{_pattern})\Z"), _first)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


class _Dumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 readers or our 1.2 loader would read as something else (`no`, `1e3`)."""


for _first, _resolvers in _StrictLoader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        _Dumper.add_implicit_resolver(_tag, _regexp, [_first])


def _parse_yaml(text: str) -> Any:
    """Parses one YAML document with `_StrictLoader`; raises yaml.YAMLError."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: what is wrong and where."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(", ".join(filter(None, (error.context, error.problem))).split())
        return f"{where}: {problem}" if isinstance(error, _Refused) else f"malformed YAML ({where}): {problem}"
    if isinstance(error, yaml.reader.ReaderError):
        return f"malformed YAML: character {error.character:#x} at position {error.position} is not allowed"
    return f"malformed YAML: {' '.join(str(error).split())}"


def _set_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise UserError(f"override {override!r}: write it as key.sub=value, e.g. schedule.epochs=10")
    key, raw = override.split("=", 1)
    try:
        value = _parse_yaml(raw) if raw else None
    except _Refused as error:
        raise UserError(f"override {override!r}: {error.problem}") from None
    except yaml.YAMLError:
        value = raw  # not YAML (`run.name=a: b: c`): the text as written
    node = tree
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {override!r}: {part} is not a section")
    node[leaf] = value


def from_dict(data: dict[str, Any], overrides: list[str] = (), source: str = "recipe") -> Recipe:
    """Builds a recipe from a plain dict plus `key.sub=value` overrides (which win)."""
    tree = _deep_copy(data)
    try:
        for override in overrides:
            _set_override(tree, override)
        return _build(Recipe, tree, "")
    except UserError as error:
        raise UserError(f"{source}: {error}") from None


def _read_yaml(path: Path, base_of: Path | None = None) -> dict[str, Any]:
    """One recipe file (the base named in `base_of`), strictly parsed: a non-empty UTF-8 mapping of limited size."""
    name = f"{base_of}: base file {path}" if base_of else f"recipe file {path}"
    try:
        raw = read_regular(path, MAX_RECIPE_BYTES, "recipe")  # a FIFO or a device is refused, never waited on
    except (FileNotFoundError, NotADirectoryError):
        fix = f"`base:` is relative to {base_of.parent}" if base_of else "see recipes/ for examples"
        raise UserError(f"{name} not found; {fix}") from None
    except UserError as error:
        raise UserError(f"{base_of}: base file {error}" if base_of else str(error)) from None
    except (OSError, ValueError) as error:  # ValueError: a NUL in the name
        raise UserError(f"{name} cannot be read: {getattr(error, 'strerror', None) or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}); save the recipe as UTF-8") from None
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as error:
        raise UserError(f"{path}: {_yaml_problem(error)}") from None
    if data is None or data == {}:
        raise UserError(f"{path}: the file states no recipe; write sections such as `model:` and `schedule:` "
                        "(see recipes/ for examples)")
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (data:, model:, ...), "
                        f"got a {type(data).__name__}")
    return data


def _resolve(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """The file's tree on top of its `base:` chain (mappings merge deeply, lists and scalars replace) and the bases."""
    tree = _read_yaml(path, base_of=chain[-1] if chain else None)
    if "base" not in tree:
        return tree, []
    base = tree.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise UserError(f"{path}: base: expected a recipe file relative to {path.parent}, got {base!r}")
    base_path = path.parent / base
    chain = (*chain, path)
    try:
        cycle = any(base_path.resolve() == p.resolve() for p in chain)
    except (OSError, ValueError, RuntimeError):  # a bad name or a symlink loop: reading it below says so
        cycle = False
    if cycle:
        raise UserError(f"{path}: base {base} leads back to {base_path} "
                        f"({' -> '.join(str(p) for p in (*chain, base_path))}); remove the cycle")
    base_tree, bases = _resolve(base_path, chain)
    return _merge(base_tree, tree), [base_path, *bases]


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_mappings else value
    return merged


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Loads a YAML recipe and its `base:` chain; bad YAML, keys, types and values are errors naming file and key."""
    path = Path(path)
    tree, bases = _resolve(path)
    source = f"{path} (base {', '.join(map(str, bases))})" if bases else str(path)
    recipe = from_dict(tree, overrides, source=source)
    if recipe.run.name is None:
        recipe.run.name = path.stem
    return recipe


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Writes the resolved recipe as YAML: every key expanded, no `base:`."""
    write_atomic(Path(path), yaml.dump(recipe.to_dict(), Dumper=_Dumper, sort_keys=False).encode())


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
