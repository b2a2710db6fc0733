"""A model folder on disk, checked before anything is built: config.json read and checked against the weights'
header, a plausible input normalisation, regular files under a size cap; the sha256 of files and the fingerprint of
weights; the names of known architectures."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch

from sglr_zoo.errors import UserError
from sglr_zoo.files import TEXT_LIMIT, GiB, check_regular, open_regular, read_regular
from sglr_zoo.rundir import ModelFolder

__all__ = ["IDENTITY_MEAN", "IDENTITY_STD", "WEIGHTS_LIMIT", "check_arch", "check_classifier", "check_model_folder",
           "check_normalization", "check_regular", "check_weights_file", "input_normalization", "is_sglr_arch",
           "read_config", "sha256_of", "stated_classes", "weights_fingerprint"]
IDENTITY_MEAN, IDENTITY_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
WEIGHTS_LIMIT = 8 * GiB  # a weights or checkpoint file: a WRN-70-16 with its optimiser state is about 3 GiB


def is_sglr_arch(arch: str) -> bool:
    """True for the architectures registered by sglr_zoo (these normalise inside the model)."""
    return timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__.startswith("sglr_zoo.")


def sha256_of(path: Path, limit: int = WEIGHTS_LIMIT) -> str:
    """The hex sha256 of a file's bytes (what the zoo table and a recipe's backbone_sha256 pin), read in chunks; a
    UserError naming the file unless it is a regular file of at most `limit` bytes."""
    digest = hashlib.sha256()
    with os.fdopen(open_regular(path, limit, "model file"), "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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


def input_normalization(config: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) a model folder's model applies to [0, 1] images, from its checked config.json: our
    architectures' model_args mean/std (inside the model), else pretrained_cfg's (a stock model, which `Normalized`
    wraps); None when it applies none (mean 0, std 1)."""
    args, pretrained_cfg = config.get("model_args", {}), config.get("pretrained_cfg", config)
    mean, std = (args.get("mean"), args.get("std")) if args.get("mean") is not None else (
        pretrained_cfg.get("mean"), pretrained_cfg.get("std"))
    if mean is None:
        return None
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return None if all(m == 0 for m in mean) and all(s == 1 for s in std) else (mean, std)


def read_config(path: str | Path) -> dict[str, Any]:
    """A model folder's config.json as a JSON object: a regular file of at most 16 MiB, valid UTF-8 JSON; a
    UserError naming the file otherwise (FileNotFoundError when it is absent)."""
    path = Path(path)
    try:
        config = json.loads(read_regular(path, TEXT_LIMIT, "config.json").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        detail = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise UserError(f"{path}: not valid JSON ({detail}); export the model again") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object with an \"architecture\" (timm's config.json), "
                        f"got {json.dumps(config)[:40]}")
    return config


def check_model_folder(folder: str | Path) -> dict[str, Any]:
    """Checks a model folder before anything is built and returns its config.json: a JSON object naming a known
    architecture, readable safetensors weights whose classifier has the number of classes every num_classes in
    config.json states, and a finite, plausible input normalisation (`check_normalization`)."""
    model = ModelFolder(folder)
    files = ((model.config, TEXT_LIMIT, "config.json"), (model.weights, WEIGHTS_LIMIT, "weights file"))
    for path, limit, what in files:
        if path.exists():  # a FIFO would hang its reader, a device or sparse file fill memory: named, refused
            check_regular(path, limit, what)
    if not model.is_model():
        raise UserError(f"{model.root} is not a model folder: it needs config.json and model.safetensors "
                        "(written by `sglr_zoo.models.save_pretrained` or timm's `save_for_hf`)")
    config = read_config(model.config)
    for key in ("pretrained_cfg", "model_args"):
        if not isinstance(config.get(key, {}), dict):
            raise UserError(f"{model.config}: {key} must be a JSON object, got {json.dumps(config[key])[:40]}")
    check_arch(config.get("architecture"), f"{model.config}: architecture")
    pretrained_cfg = config.get("pretrained_cfg", config)  # timm also reads a flat, older layout
    stated = stated_classes(config, model.config)
    for head, outputs in _classifier_outputs(model.weights, pretrained_cfg.get("classifier")).items():
        for name, num_classes in stated.items():
            if num_classes != outputs:
                raise UserError(f"{model.weights}: the classifier {head} has {outputs} outputs but {model.config} "
                                f"says {num_classes} classes ({name}); export the model again, or restore the "
                                "config.json that belongs to these weights")
    if len(set(stated.values())) > 1:  # only when the weights have no classifier to compare with
        raise UserError(f"{model.config}: the number of classes differs: "
                        f"{', '.join(f'{name} {value}' for name, value in stated.items())}; export the model again")
    _check_config_normalization(config, model.config)
    return config


def check_normalization(mean: Any, std: Any, where: str, channels: int = 3) -> tuple[tuple[float, ...],
                                                                                   tuple[float, ...]]:
    """`mean` and `std` as tuples of floats when they can normalise [0, 1] images: one finite value per input
    channel, means in [0, 1], standard deviations in (0, 1]; a UserError naming `where` otherwise."""
    values = {}
    for label, given, low_open in (("mean", mean, False), ("std", std, True)):
        if not isinstance(given, Sequence) or isinstance(given, str) or len(given) != channels or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in given):
            raise UserError(f"{where}: {label} must be {channels} numbers, one per input channel, got "
                            f"{json.dumps(given, default=str)[:60]}")
        floats = tuple(float(v) for v in given)
        if not all(math.isfinite(v) and (0 < v if low_open else 0 <= v) and v <= 1 for v in floats):
            interval = "(0, 1]" if low_open else "[0, 1]"
            raise UserError(f"{where}: {label} {list(floats)} is not in {interval} for every channel: the model "
                            "takes images in [0, 1], and a normalisation outside that range (NaN, zero, pixel "
                            "values 0..255) would garble every input")
        values[label] = floats
    return values["mean"], values["std"]


def check_weights_file(weights: str | Path) -> Path:
    """`weights` as a Path when it names an existing `.safetensors` file; a UserError otherwise."""
    path = Path(weights)
    if path.suffix != ".safetensors" or not path.exists():
        raise UserError(f"--weights {path}: give an existing .safetensors file (pickled checkpoints are not loaded)")
    return path


def stated_classes(config: dict[str, Any], where: Path) -> dict[str, int]:
    """Where config.json states a number of classes (top level, pretrained_cfg, model_args), and what it says."""
    pretrained_cfg, model_args = config.get("pretrained_cfg", config), config.get("model_args", {})
    stated = {name: value for name, value in (("num_classes", config.get("num_classes")),
                                              ("pretrained_cfg.num_classes", pretrained_cfg.get("num_classes")),
                                              ("model_args.num_classes", model_args.get("num_classes")))
              if value is not None}
    for name, value in stated.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{where}: {name} must be a whole number >= 0, got {value!r}")
    return stated


def _check_config_normalization(config: dict[str, Any], where: Path) -> None:
    """config.json's normalisation: pretrained_cfg mean/std (what a stock model's wrapper applies; identity for
    ours, which normalise inside) and our architectures' model_args mean/std, checked by `check_normalization`."""
    pretrained_cfg, model_args = config.get("pretrained_cfg", config), config.get("model_args", {})
    input_size = pretrained_cfg.get("input_size", [3, 32, 32])
    if not (isinstance(input_size, list) and len(input_size) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 8192 for v in input_size)):
        raise UserError(f"{where}: pretrained_cfg.input_size must be [channels, height, width], whole numbers from "
                        f"1 to 8192, got {json.dumps(input_size)[:60]}")
    channels = model_args.get("in_chans", input_size[0])
    if "mean" in pretrained_cfg or "std" in pretrained_cfg:
        mean, std = check_normalization(pretrained_cfg.get("mean"), pretrained_cfg.get("std"),
                                        f"{where}: pretrained_cfg", channels)
        if is_sglr_arch(config["architecture"]) and (mean, std) != (IDENTITY_MEAN, IDENTITY_STD):
            raise UserError(f"{where}: pretrained_cfg mean {list(mean)} / std {list(std)}, but "
                            f"{config['architecture']} normalises inside the model (model_args mean/std): its "
                            "pretrained_cfg must say mean 0 / std 1, or timm users would normalise twice")
    if model_args.get("mean") is not None or model_args.get("std") is not None:
        check_normalization(model_args.get("mean"), model_args.get("std"), f"{where}: model_args", channels)


def check_arch(arch: Any, where: str) -> None:
    """A UserError naming `where` unless `arch` is in timm's registry (ours register on import)."""
    if isinstance(arch, str) and timm.is_model(arch):
        return
    close = timm.list_models(f"*{arch.split('_')[0]}*")[:5] if isinstance(arch, str) and arch else []
    hint = f"; similar names: {', '.join(close)}" if close else ""
    raise UserError(f"{where}: unknown architecture {arch!r}{hint}. See `timm.list_models()` "
                    "(ours: `timm.list_models('*_cifar')`)")


def check_classifier(weights: Path, classifier: Any, num_classes: int | None, claim: str) -> None:
    """A UserError naming the file if the classifier's weight has another number of outputs than num_classes
    (read from the safetensors header, before the model is built)."""
    for name, outputs in _classifier_outputs(weights, classifier).items():
        if num_classes is not None and outputs != num_classes:
            raise UserError(f"{weights}: the classifier {name} has {outputs} outputs but {claim} {num_classes} "
                            "classes; pass the weights and num_classes that belong together")


def _classifier_outputs(weights: Path, classifier: Any) -> dict[str, int]:
    """The number of outputs of each named classifier found in a safetensors file, read from its header only; a
    UserError naming the file if it is unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except SafetensorError as error:
        raise UserError(f"{weights}: not a readable safetensors file ({error}); download or export it again") \
            from None
    names = [classifier] if isinstance(classifier, str) else classifier if isinstance(classifier, list) else []
    return {name: shapes[f"{name}.weight"][0] for name in names
            if isinstance(name, str) and shapes.get(f"{name}.weight")}
