"""What a training recipe says: its typed sections and their rules, one dataclass a section. How YAML files
become such a tree (strict parsing, `base:`, overrides, types, fractions) is sglr_zoo.recipe_yaml's."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from sglr_zoo.attack_names import CHOICES as ATTACK_CHOICES
from sglr_zoo.attack_names import AttackName
from sglr_zoo.recipe_yaml import MAX_RECIPE_BYTES as MAX_RECIPE_BYTES  # re-exported: part of this module's API
from sglr_zoo.recipe_yaml import InvalidField, build, ensure, format_fraction, read_tree, to_plain, write_yaml
from sglr_zoo.recipe_yaml import parse_fraction as parse_fraction  # re-exported
from sglr_zoo.schedule import parse_budget

STANDARD_EPS = {"linf": Fraction(8, 255), "l2": Fraction(1, 2)}  # RobustBench's CIFAR radii
MAX_IMAGE_SIZE = 1024  # data.image_size: pixels per side; CIFAR models take 32, ImageNet ones 224
MAX_THREADS = 4096  # run.threads: more than any machine has; a recipe travels between machines, so no cpu_count()
MAX_WORKERS = 256  # run.num_workers: data-loading processes
MAX_LR = 10.0  # optim.lr: SGD's rates are 0.01-0.4; 10 and more only diverge


def eps_problem(threat: str, eps: Fraction, values: int | None) -> str | None:
    """Why `eps` is no radius for `threat` on [0, 1] images of `values` numbers (C x H x W; None: unknown), or None.
    A radius is >= 0 and at most what reaches every image: 1 for linf (the whole pixel range), the image cube's
    diagonal sqrt(values) for l2."""
    if eps < 0:
        return "must be >= 0"
    if threat == "linf" and eps > 1:
        return (f"{format_fraction(eps)} is more than 1, the whole [0, 1] pixel range, for a linf radius; write "
                "pixel units as k/255 (8/255 is standard)")
    if threat == "l2" and values is not None and eps * eps > values:
        return (f"{format_fraction(eps)} is more than {math.sqrt(values):.4g}, the diameter of [0, 1] images of "
                f"{values} values, for an l2 radius (1/2 is standard)")
    return None


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
    # Random crop (pad 4) and horizontal flip; auto: on when the run is planned for augment_min_epochs or more
    # (schedule.budget's first plan, else the recipe's epochs): a short run underfits with them, a long one
    # overfits without them (docs/time_to_robustness.md)
    augment: Literal["auto"] | bool = True
    augment_min_epochs: float = 10.0
    num_classes: int | None = None  # read from the dataset when None
    holdout_fraction: float = 0.1  # of train, held out (stratified, fixed seed) as the test split when there is none

    def __post_init__(self) -> None:
        ensure(0 < self.holdout_fraction < 1, "holdout_fraction", "must be in (0, 1)")
        ensure(self.n_train is None or self.n_train >= 1, "n_train", "must be >= 1 or null")
        ensure(self.n_test is None or self.n_test >= 1, "n_test", "must be >= 1 or null")
        ensure(self.val_size >= 0, "val_size", "must be >= 0")
        ensure(8 <= self.image_size <= MAX_IMAGE_SIZE, "image_size",
               f"must be in [8, {MAX_IMAGE_SIZE}] (pixels a side)")
        ensure(self.num_classes is None or self.num_classes >= 2, "num_classes", "must be >= 2 or null")
        ensure(self.augment_min_epochs > 0, "augment_min_epochs", "must be > 0 (epochs from which auto augments)")


@dataclass
class ModelConfig:
    """Any timm architecture; ours are `wrn34_10_cifar`, `preactresnet18_cifar`, `resnet18_cifar`, ...

    A list of architectures, largest first, lets `schedule.budget` pick the capacity: the run trains the first that
    the budget gives at least `arch_min_epochs` epochs on this machine, else the last (sglr_zoo.budget)."""

    arch: str | list[str] = "preactresnet18_cifar"
    arch_min_epochs: float = 3.0
    pretrained: str | None = None  # a local-dir:/hf-hub: id, zoo name or run directory to start from
    mean: list[float] | None = None  # normalisation applied inside the model; None = none (inputs in [0, 1])
    std: list[float] | None = None
    # timm's drop_rate: dropout before the classifier; in our WideResNets, inside every block instead (the
    # original WRN's dropout, as in the TRADES code's WideResNet)
    drop_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed on to timm.create_model

    def __post_init__(self) -> None:
        names = self.arch if isinstance(self.arch, list) else [self.arch]
        ensure(bool(names) and all(names) and len(set(names)) == len(names), "arch",
               "must name a timm architecture (see `timm.list_models('*cifar*')`), or list different ones, largest "
               "first, for schedule.budget to pick from")
        ensure(self.arch_min_epochs > 0, "arch_min_epochs", "must be > 0 (epochs the budget must give an arch)")
        ensure((self.mean is None) == (self.std is None), "mean", "mean and std must be given together")
        if self.std is not None:
            ensure(len(self.std) == len(self.mean or []) and all(s > 0 for s in self.std), "std",
                   "must be positive, one value per channel like mean")
        ensure(0 <= self.drop_rate < 1, "drop_rate", "must be in [0, 1)")


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
    warmup: float = 0.0  # eps warm-up: eps and step_size ramp up over this fraction of the run (sglr_zoo.warmup)
    warmup_from: float = 0.0  # ... from this fraction of their values
    warmup_shape: Literal["linear", "cosine"] = "linear"

    def __post_init__(self) -> None:
        ensure(0 <= self.warmup <= 1, "warmup", "must be in [0, 1]: the fraction of the run over which eps ramps up")
        ensure(0 <= self.warmup_from < 1, "warmup_from", "must be in [0, 1): the fraction of eps the ramp starts at")
        ensure(self.eps >= 0, "eps", "must be >= 0")
        ensure(self.step_size > 0, "step_size", "must be > 0")
        ensure(self.steps >= 1, "steps", "must be >= 1")
        ensure(0 < self.noise <= 16, "noise", "must be in (0, 16]: multiples of eps (1 = the eps-ball; N-FGSM: 2)")


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
        ensure(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        ensure(0 <= self.alpha < 1, "alpha", "must be in [0, 1)")
        ensure(self.start_epoch >= 0, "start_epoch", "must be >= 0 (an epoch, or a fraction of the run if < 1)")
        ensure(0 <= self.adv_weight <= 1, "adv_weight", "must be in [0, 1]")
        ensure(self.temperature > 0, "temperature", "must be > 0")
        ensure(0 <= self.r_hard <= 1, "r_hard", "must be in [0, 1]")
        ensure(0 <= self.teacher_decay < 1, "teacher_decay", "must be in [0, 1)")
        ensure(self.beta >= 0, "beta", "must be >= 0")


@dataclass
class OptimConfig:
    """SGD with momentum, as in the paper."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    grad_clip: float | None = None  # max gradient norm; None = no clipping

    def __post_init__(self) -> None:
        ensure(0 < self.lr <= MAX_LR, "lr", f"must be in (0, {MAX_LR:g}]")
        ensure(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        ensure(0 <= self.weight_decay <= 1, "weight_decay", "must be in [0, 1] (5e-4 is usual)")
        ensure(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null")


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
        ensure(self.epochs >= 1, "epochs", "must be >= 1")
        ensure(self.steps is None or self.steps >= 1, "steps", "must be >= 1 or null")
        ensure(not isinstance(self.plans, str) or self.plans.strip() != "", "plans", "give a run's plans.json, or null")
        if isinstance(self.plans, list):
            starts = [plan[0] for plan in self.plans if len(plan) == 2]
            ensure(len(starts) == len(self.plans) > 0 and starts[0] == 0 and self.plans[-1][1] == self.steps
                   and all(start < end for start, end in self.plans)
                   and all(before[0] < after[0] < before[1] for before, after in zip(self.plans, self.plans[1:])),
                   "plans",
                   "is written by a budgeted run: [from_step, end_step] pairs, the first from 0, each from before the "
                   "previous end, the last ending at schedule.steps; set it to null to spread the schedule evenly "
                   "over schedule.steps")
        if self.budget is not None:
            try:
                parse_budget(self.budget)
            except ValueError as error:
                raise InvalidField("budget", str(error)) from None
            ensure(self.name != "multistep", "budget", "needs a cosine, onecycle or constant schedule (multistep "
                   "milestones are epochs, which the budget decides)")
            ensure(self.warmup_epochs == 0, "warmup_epochs", "must be 0 with a budget, which decides the epochs "
                   "(onecycle warms up over its first peak_at of the run)")
        ensure(self.name != "multistep" or all(0 < m <= self.epochs for m in self.milestones), "milestones",
               "must lie in [1, epochs] for the multistep schedule")
        ensure(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        ensure(0 <= self.warmup_epochs < self.epochs, "warmup_epochs", "must be in [0, epochs)")
        ensure(0 < self.peak_at < 1, "peak_at", "must be in (0, 1)")


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
        ensure(self.eps is None or self.eps >= 0, "eps",
               "must be >= 0 (or null: attack.eps, else the threat's standard)")
        ensure(self.n >= 1, "n", "must be >= 1")
        ensure(self.final_n >= 1, "final_n", "must be >= 1")
        ensure(all(map(AttackName.is_valid, self.final_attacks)), "final_attacks",
               f"each must be one of {ATTACK_CHOICES}")
        ensure(self.steps >= 1, "steps", "must be >= 1")
        ensure(self.every >= 1, "every", "must be >= 1")
        ensure(self.batch_size >= 1, "batch_size", "must be >= 1")


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
    buffer_sync: Literal["broadcast", "average"] = "broadcast"  # epoch ends' BatchNorm statistics: rank 0's or the mean
    resume: str = "auto"  # auto | never | path to a checkpoint directory
    max_steps: int | None = None  # stop after this many steps (smoke tests); None = the full schedule
    num_workers: int = 0

    def __post_init__(self) -> None:
        ensure(self.batch_size >= 1, "batch_size", "must be >= 1")
        ensure(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        ensure(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        ensure(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or null")
        ensure(0 <= self.num_workers <= MAX_WORKERS, "num_workers", f"must be in [0, {MAX_WORKERS}]")
        ensure(self.threads == "auto" or 1 <= self.threads <= MAX_THREADS, "threads",
               f"must be auto or in [1, {MAX_THREADS}]")
        ensure(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32 - 1] (what numpy's generator takes)")


@dataclass
class FinetuneConfig:
    """Adapting a pretrained backbone to new data (sglr_zoo.finetune); off while `backbone` is null. Clean
    fine-tuning is `attack.eps: 0` with any method; otherwise the recipe's method and attack apply."""

    backbone: str | None = None  # zoo name, hf-hub:ORG/NAME[@rev], local-dir:PATH, run dir, or timm name.tag
    backbone_sha256: str | None = None  # of its model.safetensors: checked when given, recorded when null
    backbone_revision: str | None = None  # Hub commit of an hf-hub backbone: used when given, recorded when null
    mode: Literal["linear_probe", "full", "partial", "lp_ft"] = "full"  # lp_ft: a linear probe, then full fine-tuning
    probe_share: float = 0.2  # lp_ft: the share of the run's optimiser steps that only the head trains (a fifth
    # beat a half by 4.2 PGD-20 points in both seeds of docs/transfer.md's robust backbone)
    unfreeze: int = 1  # partial: the last N stages of the model's feature_info train, with all layers after them
    backbone_lr_scale: float = 1.0  # learning rate of the trainable backbone parameters, relative to optim.lr
    head: Literal["auto", "reset", "keep"] = "auto"  # auto: reset unless the label names match the backbone's

    def __post_init__(self) -> None:
        ensure(self.unfreeze >= 1, "unfreeze", "must be >= 1 (the number of last stages that train)")
        ensure(0 < self.probe_share < 1, "probe_share", "must be in (0, 1): the share of the run that probes (lp_ft)")
        ensure(self.backbone_lr_scale > 0, "backbone_lr_scale", "must be > 0 (use mode: linear_probe to freeze)")
        ensure(self.backbone is not None or (self.mode == "full" and self.head == "auto"), "backbone",
               "name the backbone to fine-tune (a zoo name, hf-hub:ORG/NAME, local-dir:PATH or a run directory)")
        ensure(self.backbone_sha256 is None or re.fullmatch(r"[0-9a-f]{64}", self.backbone_sha256) is not None,
               "backbone_sha256", "must be 64 lowercase hex digits (sha256sum of model.safetensors)")


@dataclass
class AverageConfig:
    """Weight averaging (sglr_zoo.averaging): when on, the average is monitored, picks and fills best/, fills last/."""

    decay: float = 0.0  # per optimiser step; 0 = off
    start: float = 0.0  # fraction of the run's steps before which the average copies the weights (decay 0)
    buffers: Literal["average", "copy"] = "average"  # BatchNorm running statistics: averaged like weights, or copied
    # On only when the run is planned for min_epochs or more (schedule.budget's first plan, else the recipe's
    # epochs), like data.augment_min_epochs; 0: always
    min_epochs: float = 0.0

    def __post_init__(self) -> None:
        ensure(0 <= self.decay < 1, "decay", "must be in [0, 1) (0: off; 0.999 averages about the last 1,000 steps)")
        ensure(0 <= self.start < 1, "start", "must be in [0, 1): the fraction of the run before averaging starts")
        ensure(self.min_epochs >= 0, "min_epochs", "must be >= 0 (epochs from which the average is on; 0: always)")


@dataclass
class GuardConfig:
    """The catastrophic-overfitting guard of single-step training: PGD checks on held-out images; a collapse rolls
    the run back to its last passing check and trains on with PGD-`fallback_steps` (sglr_zoo.guard)."""

    enabled: Literal["auto"] | bool = "auto"  # auto: on when the training attack takes one step
    every: int = 100  # optimiser steps between checks
    n: int = 128  # images: the first of the validation split, else of the test split (as the monitoring)
    steps: int = 10  # PGD steps of the check (the evaluator's PGD: step eps/4, random start)
    drop: float = 0.5  # a collapse: PGD accuracy below drop x the best check so far ...
    patience: int = 2  # ... in this many checks in a row
    fallback_steps: int = 2

    def __post_init__(self) -> None:
        ensure(self.every >= 1, "every", "must be >= 1 (optimiser steps between checks)")
        ensure(self.n >= 1, "n", "must be >= 1 (held-out images checked)")
        ensure(self.steps >= 2, "steps", "must be >= 2: a multi-step PGD is what single-step training overfits against")
        ensure(0 < self.drop < 1, "drop", "must be in (0, 1)")
        ensure(self.patience >= 1, "patience", "must be >= 1 (checks in a row below the threshold)")
        ensure(self.fallback_steps >= 2, "fallback_steps", "must be >= 2 (a multi-step attack)")


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
        ensure(self.model.pretrained is None or self.finetune.backbone is None, "model.pretrained",
               "give the backbone once: finetune.backbone (model.pretrained is its older, shorter form)")
        values = 3 * self.data.image_size**2  # images are decoded to RGB
        for key, eps in (("attack.eps", self.attack.eps), ("eval.eps", self.eval.eps)):
            problem = None if eps is None else eps_problem(self.attack.threat, eps, values)
            ensure(problem is None, key, problem)
        if self.method.start_epoch >= 1:
            ensure(self.method.start_epoch <= self.schedule.epochs + 1, "method.start_epoch",
                   f"must be <= epochs + 1 = {self.schedule.epochs + 1} (or a fraction < 1)")
        if isinstance(self.model.arch, list):
            ensure(self.schedule.budget is not None or isinstance(self.schedule.plans, str), "model.arch",
                   "a list of architectures needs schedule.budget, which picks one; name one architecture")
            ensure(self.finetune.backbone is None and self.model.pretrained is None, "model.arch",
                   "a fine-tuned backbone fixes the architecture; name one (or none) instead of a list")
        ensure(self.guard.enabled is not True or self.attack.eps > 0, "guard.enabled",
               "needs adversarial training (attack.eps > 0): clean training has no attack to fall back from")

    @property
    def start_epoch(self) -> int:
        """The 1-based epoch from which SGLR uses refined labels; a fraction f < 1 means epoch round(f * epochs)."""
        start = self.method.start_epoch
        return max(1, round(start * self.schedule.epochs)) if start < 1 else int(start)

    @property
    def guarded(self) -> bool:
        """Whether the overfitting guard runs: auto = single-step adversarial training (FGSM-RS, N-FGSM)."""
        auto = self.attack.steps == 1 and self.attack.eps > 0
        return auto if self.guard.enabled == "auto" else self.guard.enabled

    @property
    def eval_eps(self) -> Fraction:
        """The radius robust accuracy is measured at: eval.eps, else attack.eps, else (clean training, attack.eps
        0) the threat's standard radius (8/255 linf, 1/2 l2), so that a clean model's robustness is still reported."""
        if self.eval.eps is not None:
            return self.eval.eps
        return self.attack.eps or STANDARD_EPS[self.attack.threat]

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-safe dict (fractions written as `p/q`)."""
        return to_plain(dataclasses.asdict(self))


def from_dict(data: dict[str, Any], overrides: list[str] = (), source: str = "recipe") -> Recipe:
    """Builds a recipe from a plain dict plus `key.sub=value` overrides (which win)."""
    return build(Recipe, data, overrides, source)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Loads a YAML recipe and its `base:` chain; bad YAML, keys, types and values are errors naming file and key."""
    path = Path(path)
    tree, bases = read_tree(path)
    source = f"{path} (base {', '.join(map(str, bases))})" if bases else str(path)
    recipe = from_dict(tree, overrides, source=source)
    if recipe.run.name is None:
        recipe.run.name = path.stem
    return recipe


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Writes the resolved recipe as YAML: every key expanded, no `base:`."""
    write_yaml(recipe.to_dict(), Path(path))
