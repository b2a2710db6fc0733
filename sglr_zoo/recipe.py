"""Typed training recipes: YAML files mapped onto dataclasses, with `key.sub=value` overrides."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml

from sglr_zoo.errors import UserError


def parse_fraction(value: Any) -> Fraction:
    """Reads `8/255`, `0.5`, `2` (str, int or float) into an exact fraction."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number or a fraction like 8/255, got {value!r}")
    if isinstance(value, (int, Fraction)):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(str(value))
    if isinstance(value, str):
        try:
            return Fraction(value.replace(" ", ""))
        except ValueError:
            pass
    raise ValueError(f"expected a number or a fraction like 8/255, got {value!r}")


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

    dataset: str = "uoft-cs/cifar10"  # Hub id, local parquet folder or image folder
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

    def __post_init__(self) -> None:
        _check(self.n_train is None or self.n_train >= 1, "n_train", "must be >= 1 or null")
        _check(self.n_test is None or self.n_test >= 1, "n_test", "must be >= 1 or null")
        _check(self.val_size >= 0, "val_size", "must be >= 0")
        _check(self.image_size >= 8, "image_size", "must be >= 8")
        _check(self.num_classes is None or self.num_classes >= 2, "num_classes", "must be >= 2 or null")


@dataclass
class ModelConfig:
    """Any timm architecture; ours are `wrn34_10_cifar`, `preactresnet18_cifar`, `resnet18_cifar`, ..."""

    arch: str = "preactresnet18_cifar"
    pretrained: str | None = None  # a local-dir:/hf-hub: id, zoo name or run directory to start from
    mean: list[float] | None = None  # normalisation applied inside the model; None = none (inputs in [0, 1])
    std: list[float] | None = None
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
    model_mode: Literal["eval", "train"] = "eval"  # BatchNorm mode while attacking

    def __post_init__(self) -> None:
        _check(self.eps >= 0, "eps", "must be >= 0")
        _check(self.step_size > 0, "step_size", "must be > 0")
        _check(self.steps >= 1, "steps", "must be >= 1")


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

    def __post_init__(self) -> None:
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
        _check(self.lr > 0, "lr", "must be > 0")
        _check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
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

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", "must be >= 1")
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

    def __post_init__(self) -> None:
        _check(self.n >= 1, "n", "must be >= 1")
        _check(self.final_n >= 1, "final_n", "must be >= 1")
        _check(all(re.fullmatch(r"clean|autoattack|(pgd|cw)[1-9][0-9]*", a) for a in self.final_attacks),
               "final_attacks", "each must be clean, autoattack, pgd<steps> or cw<steps> (e.g. pgd20)")
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
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None  # None = take the accelerate config's
    channels_last: bool = False
    compile: bool = False
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 2
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch when several processes train
    resume: str = "auto"  # auto | never | path to a checkpoint directory
    max_steps: int | None = None  # stop after this many steps (smoke tests); None = the full schedule
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or null")
        _check(self.num_workers >= 0, "num_workers", "must be >= 0")


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

    def __post_init__(self) -> None:
        if self.method.start_epoch >= 1:
            _check(self.method.start_epoch <= self.schedule.epochs + 1, "method.start_epoch",
                   f"must be <= epochs + 1 = {self.schedule.epochs + 1} (or a fraction < 1)")

    @property
    def start_epoch(self) -> int:
        """The 1-based epoch from which SGLR uses refined labels; a fraction f < 1 means epoch round(f * epochs)."""
        start = self.method.start_epoch
        return max(1, round(start * self.schedule.epochs)) if start < 1 else int(start)

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
        return dict(value)
    if hint is Fraction:
        try:
            return parse_fraction(value)
        except ValueError as error:
            raise UserError(f"{where}: {error}") from None
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(parse_fraction(value))
        except ValueError:
            pass
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise UserError(f"{where}: expected {name}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
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


def _set_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise UserError(f"override {override!r}: write it as key.sub=value, e.g. schedule.epochs=10")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
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
    for override in overrides:
        _set_override(tree, override)
    try:
        return _build(Recipe, tree, "")
    except UserError as error:
        raise UserError(f"{source}: {error}") from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Loads a YAML recipe; unknown keys, wrong types and bad values are errors naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file {path} not found; see recipes/ for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{path}: malformed YAML{line}: {getattr(error, 'problem', error)}") from None
    recipe = from_dict(data, overrides, source=str(path))
    if recipe.run.name is None:
        recipe.run.name = path.stem
    return recipe


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Writes the resolved recipe as YAML."""
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
