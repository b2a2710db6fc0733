"""Our CIFAR architectures, registered in timm's registry on import, and model creation from a recipe."""

from __future__ import annotations

import copy
from pathlib import Path

import timm
import torch
from torch import nn

from sglr_zoo.errors import UserError
from sglr_zoo.models import cifar_resnet, preact_resnet, wide_resnet  # noqa: F401  (registers the models)
from sglr_zoo.models.layers import InputNormalization, Normalized

__all__ = ["InputNormalization", "Normalized", "create_model", "is_sglr_arch", "load_pretrained", "load_weights",
           "save_pretrained", "unwrap_timm"]
IDENTITY_MEAN, IDENTITY_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def is_sglr_arch(arch: str) -> bool:
    """True for the architectures registered by sglr_zoo (these normalise inside the model)."""
    return timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__.startswith("sglr_zoo.")


def create_model(
    arch: str,
    num_classes: int,
    *,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    drop_rate: float = 0.0,
    pretrained: str | None = None,
    **kwargs,
) -> nn.Module:
    """Builds any timm architecture that takes [0, 1] images: ours normalise inside, stock ones get a wrapper.

    `pretrained` is a timm `local-dir:`/`hf-hub:` id to start from (see `load_pretrained`), for fine-tuning.
    """
    if pretrained:
        return load_pretrained(pretrained, num_classes=num_classes, drop_rate=drop_rate, eval_mode=False, **kwargs)
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise UserError(f"model.arch: unknown architecture {arch!r}{hint}. See `timm.list_models()` "
                        "(ours: `timm.list_models('*_cifar')`)")
    ours = is_sglr_arch(arch)
    if ours:
        kwargs.update(mean=mean, std=std)
    model = timm.create_model(arch, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
    if not ours and mean is not None:
        model = Normalized(model, mean, std)
    return model


def unwrap_timm(model: nn.Module) -> nn.Module:
    """The timm model inside a `Normalized` wrapper (or the model itself)."""
    return model.model if isinstance(model, Normalized) else model


def save_pretrained(model: nn.Module, folder: str | Path, *, label_names: list[str] | None = None) -> Path:
    """Writes `model.safetensors` + `config.json` in timm's layout, loadable with `timm.create_model("local-dir:...")`.

    A stock timm model inside a `Normalized` wrapper is saved bare, its normalisation recorded as the
    pretrained_cfg mean/std (as timm does); our architectures normalise inside and record mean 0 / std 1.
    """
    # A contiguous copy: safetensors refuses channels_last weights.
    inner = copy.deepcopy(unwrap_timm(model)).to(memory_format=torch.contiguous_format)
    if isinstance(model, Normalized):
        mean, std = model.normalize.mean.flatten().tolist(), model.normalize.std.flatten().tolist()
    else:
        mean, std = list(IDENTITY_MEAN), list(IDENTITY_STD)
    config = {"label_names": list(label_names)} if label_names else None
    timm.models.save_for_hf(inner, str(folder), model_config=config, safe_serialization=True,
                            data_config={"mean": tuple(mean), "std": tuple(std)})
    return Path(folder)


def load_pretrained(name: str, *, eval_mode: bool = True, **kwargs) -> nn.Module:
    """Loads a `local-dir:PATH` or `hf-hub:ORG/NAME[@rev]` model strictly from safetensors, taking [0, 1] inputs.

    kwargs go to `timm.create_model` (e.g. `num_classes` re-initialises the classifier for fine-tuning).
    """
    if name.startswith("local-dir:"):
        folder = Path(name.removeprefix("local-dir:"))
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise UserError(f"{folder} is not a model folder: it needs config.json and model.safetensors "
                            "(written by `sglr_zoo.models.save_pretrained` or timm's `save_for_hf`)")
    model = timm.create_model(name, pretrained=True, **kwargs)
    mean = tuple(float(v) for v in model.pretrained_cfg.get("mean", IDENTITY_MEAN))
    std = tuple(float(v) for v in model.pretrained_cfg.get("std", IDENTITY_STD))
    if not is_sglr_arch(model.pretrained_cfg.get("architecture", "")) and (mean, std) != (IDENTITY_MEAN, IDENTITY_STD):
        model = Normalized(model, mean, std)
    return model.eval() if eval_mode else model


def load_weights(arch: str, weights: str | Path, num_classes: int) -> nn.Module:
    """A timm architecture with a state dict from a `.safetensors` file, loaded strictly, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(weights)
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(f"--weights {path}: give an existing .safetensors file (pickled checkpoints are not loaded)")
    model = create_model(arch, num_classes)
    try:
        state = load_file(str(path))
    except SafetensorError as error:
        raise UserError(f"--weights {path}: not a readable safetensors file ({error})") from None
    try:
        unwrap_timm(model).load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(f"--weights {path} does not fit {arch} with {num_classes} classes: "
                        f"{str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else error}") from None
    return model.eval()
