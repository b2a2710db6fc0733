"""Our CIFAR architectures, registered in timm's registry on import, and model creation from a recipe."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from sglr_zoo.errors import UserError
from sglr_zoo.models import cifar_resnet, preact_resnet, wide_resnet  # noqa: F401  (registers the models)
from sglr_zoo.models.layers import InputNormalization, Normalized
from sglr_zoo.rundir import ModelFolder

__all__ = ["InputNormalization", "Normalized", "check_model_folder", "create_model", "is_sglr_arch",
           "load_pretrained", "load_weights", "save_pretrained", "unwrap_timm", "weights_fingerprint"]
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
    _check_arch(arch, "model.arch")
    ours = is_sglr_arch(arch)
    try:
        model = timm.create_model(arch, num_classes=num_classes, drop_rate=drop_rate,
                                  **(dict(kwargs, mean=mean, std=std) if ours else kwargs))
    except TypeError as error:
        raise UserError(f"model.kwargs {kwargs}: {arch} does not take them ({error})") from None
    if not ours and mean is not None:
        model = Normalized(model, mean, std)
    return model


def unwrap_timm(model: nn.Module) -> nn.Module:
    """The timm model inside a `Normalized` wrapper (or the model itself)."""
    return model.model if isinstance(model, Normalized) else model


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict in name order, floating tensors as float32: the same for a model, its safetensors
    file and that file loaded into a float32 model, whatever the memory format."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu()
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    folder = ModelFolder(folder)
    shutil.copymode(folder.config, folder.weights)  # safetensors 0.8 writes 0600, whatever the umask says
    return folder.root


def load_pretrained(name: str, *, eval_mode: bool = True, **kwargs) -> nn.Module:
    """Loads a model strictly from safetensors, taking [0, 1] inputs: a `local-dir:PATH`, or anything
    `sglr_zoo.zoo.locate` accepts (`hf-hub:ORG/NAME[@rev]`, a zoo name, a run directory or model folder).

    Hub weights go through the zoo's checked download (safetensors only, sha256 against the Hub's record); a
    folder is checked (`check_model_folder`) before the model is built. kwargs go to `timm.create_model` (e.g.
    `num_classes` re-initialises the classifier for fine-tuning).
    """
    if not name.startswith("local-dir:"):
        from sglr_zoo.zoo import locate  # the zoo owns every download: models/ never touches the network

        name = locate(name)
    folder = ModelFolder(name.removeprefix("local-dir:"))
    config = check_model_folder(folder.root)
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except TypeError as error:  # an unexpected keyword from config.json's model_args or from the caller
        raise UserError(f"{folder.config}: {config['architecture']} does not take the arguments given (model_args "
                        f"{config.get('model_args', {})}, keywords {kwargs}): {error}") from None
    except RuntimeError as error:
        if "state_dict" not in str(error):
            raise
        raise UserError(f"{folder.weights} does not fit {config['architecture']} as {folder.config} describes it: "
                        f"{_first_problem(error)}") from None
    mean = tuple(float(v) for v in model.pretrained_cfg.get("mean", IDENTITY_MEAN))
    std = tuple(float(v) for v in model.pretrained_cfg.get("std", IDENTITY_STD))
    if not is_sglr_arch(model.pretrained_cfg.get("architecture", "")) and (mean, std) != (IDENTITY_MEAN, IDENTITY_STD):
        model = Normalized(model, mean, std)
    return model.eval() if eval_mode else model


def check_model_folder(folder: str | Path) -> dict[str, Any]:
    """Checks a model folder before anything is built and returns its config.json: a JSON object naming a known
    architecture, readable safetensors weights, and a classifier with the stated number of classes."""
    model = ModelFolder(folder)
    if not model.is_model():
        raise UserError(f"{model.root} is not a model folder: it needs config.json and model.safetensors "
                        "(written by `sglr_zoo.models.save_pretrained` or timm's `save_for_hf`)")
    try:
        config = json.loads(model.config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{model.config}: not valid JSON ({error}); export the model again") from None
    if not isinstance(config, dict):
        raise UserError(f"{model.config}: expected a JSON object with an \"architecture\" (timm's config.json), "
                        f"got {json.dumps(config)[:40]}")
    for key in ("pretrained_cfg", "model_args"):
        if not isinstance(config.get(key, {}), dict):
            raise UserError(f"{model.config}: {key} must be a JSON object, got {json.dumps(config[key])[:40]}")
    _check_arch(config.get("architecture"), f"{model.config}: architecture")
    pretrained_cfg = config.get("pretrained_cfg", config)  # timm also reads a flat, older layout
    num_classes = config.get("num_classes", pretrained_cfg.get("num_classes"))
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 0):
        raise UserError(f"{model.config}: num_classes must be a whole number >= 0, got {num_classes!r}")
    _check_classifier(model.weights, pretrained_cfg.get("classifier"), num_classes, f"{model.config} says")
    return config


def load_weights(arch: str, weights: str | Path, num_classes: int) -> nn.Module:
    """A timm architecture with a state dict from a `.safetensors` file, loaded strictly, in eval mode."""
    from safetensors.torch import load_file

    path = Path(weights)
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(f"--weights {path}: give an existing .safetensors file (pickled checkpoints are not loaded)")
    _check_arch(arch, "model")
    classifier = getattr(timm.models.get_pretrained_cfg(arch), "classifier", None)
    _check_classifier(path, classifier, num_classes, "the data has")
    model = create_model(arch, num_classes)
    try:
        unwrap_timm(model).load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as error:
        raise UserError(f"--weights {path} does not fit {arch} with {num_classes} classes: "
                        f"{_first_problem(error)}") from None
    return model.eval()


def _check_arch(arch: Any, where: str) -> None:
    """A UserError naming `where` unless `arch` is in timm's registry (ours register on import)."""
    if isinstance(arch, str) and timm.is_model(arch):
        return
    close = timm.list_models(f"*{arch.split('_')[0]}*")[:5] if isinstance(arch, str) and arch else []
    hint = f"; similar names: {', '.join(close)}" if close else ""
    raise UserError(f"{where}: unknown architecture {arch!r}{hint}. See `timm.list_models()` "
                    "(ours: `timm.list_models('*_cifar')`)")


def _check_classifier(weights: Path, classifier: Any, num_classes: int | None, claim: str) -> None:
    """Reads only the safetensors header: a UserError naming the file if it is unreadable, or if the classifier's
    weight has another number of outputs than num_classes (checked before building the model)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except SafetensorError as error:
        raise UserError(f"{weights}: not a readable safetensors file ({error}); download or export it again") \
            from None
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    for name in names:
        shape = shapes.get(f"{name}.weight")
        if num_classes is not None and shape and shape[0] != num_classes:
            raise UserError(f"{weights}: the classifier {name} has {shape[0]} outputs but {claim} {num_classes} "
                            "classes; pass the weights and num_classes that belong together")


def _first_problem(error: Exception) -> str:
    """The first detail line of torch's load_state_dict error (its first line only names the model class), with
    at most three of the keys it lists."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[1] if len(lines) > 1 else str(error)
    what, _, listed = line.partition(": ")
    keys = re.findall(r'"([^"]+)"', listed)
    return f"{what}: {', '.join(keys[:3])} and {len(keys) - 3} more" if len(keys) > 3 else line
