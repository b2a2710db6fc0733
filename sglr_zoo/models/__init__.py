"""Our CIFAR architectures, registered in timm's registry on import; model creation and local model folders.

models/ builds architectures and loads model folders on this machine; it never touches the network. Names that
are not a local folder (`hf-hub:` ids, zoo names, run directories) are resolved by `sglr_zoo.zoo`, which
registers its `locate` here when it is imported (`register_locator`, as our model files register in timm's
registry), so that models/ never imports the zoo.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from sglr_zoo.errors import UserError
from sglr_zoo.files import TEXT_LIMIT, GiB, open_regular, read_regular
from sglr_zoo.models import cifar_resnet, preact_resnet, wide_resnet  # noqa: F401  (registers the models)
from sglr_zoo.models.layers import InputNormalization, Normalized
from sglr_zoo.rundir import ModelFolder

__all__ = ["InputNormalization", "Normalized", "check_model_folder", "check_normalization", "check_regular",
           "check_weights_file", "create_model", "input_normalization", "is_sglr_arch", "load_pretrained", "load_weights", "read_config",
           "register_locator", "save_pretrained", "sha256_of", "taking_pixels", "unwrap_timm", "weights_fingerprint"]
IDENTITY_MEAN, IDENTITY_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
WEIGHTS_LIMIT = 8 * GiB  # a weights or checkpoint file: a WRN-70-16 with its optimiser state is about 3 GiB
_locators: list[Callable[[str], str]] = []  # sglr_zoo.zoo.locate, once the zoo is imported


def register_locator(locate: Callable[[str], str]) -> None:
    """Sets what turns a name that is not a local folder into `local-dir:FOLDER` (`sglr_zoo.zoo.locate`, which
    registers itself on import: it owns every download and the zoo's names)."""
    _locators[:] = [locate]


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

    `pretrained` names weights to start from, for fine-tuning: a `.safetensors` state dict of `arch` (loaded
    strictly, in train mode), or a model folder (`local-dir:PATH`, or anything `sglr_zoo.zoo.locate` accepts:
    `hf-hub:ORG/NAME`, a zoo name) loaded by `load_pretrained`, its head replaced when `num_classes` differs.
    """
    if pretrained and str(pretrained).endswith(".safetensors"):
        return _with_state_dict(arch, Path(pretrained), num_classes, drop_rate=drop_rate, **kwargs)
    if pretrained:
        return load_pretrained(pretrained, num_classes=num_classes, drop_rate=drop_rate, eval_mode=False, **kwargs)
    _check_arch(arch, "model.arch")
    if mean is not None or std is not None:
        check_normalization(IDENTITY_MEAN if mean is None else mean, IDENTITY_STD if std is None else std,
                            "model.mean/model.std", kwargs.get("in_chans", 3))
    ours = is_sglr_arch(arch)
    try:
        model = timm.create_model(arch, num_classes=num_classes, drop_rate=drop_rate,
                                  **(dict(kwargs, mean=mean, std=std) if ours else kwargs))
    except TypeError as error:
        raise UserError(f"model.kwargs {kwargs}: {arch} does not take them ({error})") from None
    return taking_pixels(model, arch, None if mean is None else (mean, std))


def taking_pixels(model: nn.Module, arch: str, normalization: tuple[Sequence[float], Sequence[float] | None] | None
                  ) -> nn.Module:
    """`model` as it takes [0, 1] images, given the input `normalization` (mean, std) it expects: our architectures
    apply it inside (they are built with it), a stock timm model is wrapped in `Normalized`."""
    return model if normalization is None or is_sglr_arch(arch) else Normalized(model, *normalization)


def unwrap_timm(model: nn.Module) -> nn.Module:
    """The timm model inside a `Normalized` wrapper (or the model itself)."""
    return model.model if isinstance(model, Normalized) else model


def sha256_of(path: Path, limit: int = WEIGHTS_LIMIT) -> str:
    """The hex sha256 of a file's bytes (what the zoo table and a recipe's backbone_sha256 pin), read in chunks; a
    UserError naming the file unless it is a regular file of at most `limit` bytes."""
    digest = hashlib.sha256()
    try:
        fd = open_regular(path, limit, "model file")
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, where a model file was expected") from None
    with os.fdopen(fd, "rb") as file:
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


def load_pretrained(name: str | Path, *, eval_mode: bool = True, **kwargs) -> nn.Module:
    """Loads a model folder strictly from safetensors, taking [0, 1] inputs: the one loader every other path
    (`create_model(pretrained=...)`, `sglr_zoo.load`, fine-tuning) ends in.

    `name` is `local-dir:PATH`, or anything `sglr_zoo.zoo.locate` accepts (`hf-hub:ORG/NAME[@rev]`, a zoo name, a
    run directory or model folder): the zoo turns it into a local folder first, Hub weights through its checked
    download (safetensors only, sha256 against the Hub's record). The folder is checked (`check_model_folder`)
    before the model is built, which is built as config.json describes the weights and loaded with every key and
    shape checked (timm's own loading drops a classifier that does not fit). kwargs go to `timm.create_model`;
    `num_classes` other than the weights' puts a new classifier on the loaded model (timm's `reset_classifier`),
    for fine-tuning.
    """
    from safetensors.torch import load_file

    name = str(name)
    if not name.startswith("local-dir:"):
        if not _locators:
            raise UserError(f"cannot load {name!r}: only 'local-dir:PATH' is loadable before sglr_zoo.zoo is imported")
        name = _locators[0](name)
    folder = ModelFolder(name.removeprefix("local-dir:"))
    config = check_model_folder(folder.root)
    num_classes = kwargs.pop("num_classes", None)
    stored = next(iter(_stated_classes(config, folder.config).values()), None)  # checked: they all agree
    try:  # pretrained=False: timm reads config.json for the architecture and its arguments, we load the weights
        model = timm.create_model(name, pretrained=False, **({} if stored is None else {"num_classes": stored}),
                                  **kwargs)
    except TypeError as error:  # an unexpected keyword from config.json's model_args or from the caller
        raise UserError(f"{folder.config}: {config['architecture']} does not take the arguments given (model_args "
                        f"{config.get('model_args', {})}, keywords {kwargs}): {error}") from None
    try:
        model.load_state_dict(load_file(str(folder.weights)), strict=True)
    except RuntimeError as error:
        raise UserError(f"{folder.weights} does not fit {config['architecture']} as {folder.config} describes it: "
                        f"{_first_problem(error)}") from None
    if num_classes is not None and num_classes != getattr(model, "num_classes", num_classes):
        model.reset_classifier(num_classes)
    model = taking_pixels(model, config["architecture"], input_normalization(config))
    return model.eval() if eval_mode else model


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
    _check_arch(config.get("architecture"), f"{model.config}: architecture")
    pretrained_cfg = config.get("pretrained_cfg", config)  # timm also reads a flat, older layout
    stated = _stated_classes(config, model.config)
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


def check_regular(path: Path, limit: int, what: str) -> None:
    """Raises UserError naming `path` unless it is a regular file of at most `limit` bytes (a FIFO would hang a
    reader, a device or a sparse file fill memory); FileNotFoundError when it is absent."""
    try:
        fd = open_regular(path, limit, what)
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, where a {what} was expected") from None
    os.close(fd)


def _stated_classes(config: dict[str, Any], where: Path) -> dict[str, int]:
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


def load_weights(arch: str, weights: str | Path, num_classes: int) -> nn.Module:
    """Deprecated: `sglr_zoo.load(arch, weights=FILE, num_classes=N)`, or `create_model(arch, N, pretrained=FILE)`
    for a model to train."""
    warnings.warn("sglr_zoo.models.load_weights(arch, file, n) is deprecated: use sglr_zoo.load(arch, weights=file, "
                  "num_classes=n)", DeprecationWarning, stacklevel=2)
    return create_model(arch, num_classes, pretrained=check_weights_file(weights)).eval()


def check_weights_file(weights: str | Path) -> Path:
    """`weights` as a Path when it names an existing `.safetensors` file; a UserError otherwise."""
    path = Path(weights)
    if path.suffix != ".safetensors" or not path.exists():
        raise UserError(f"--weights {path}: give an existing .safetensors file (pickled checkpoints are not loaded)")
    return path


def _with_state_dict(arch: str, path: Path, num_classes: int, **kwargs) -> nn.Module:
    """A timm architecture (as `create_model` builds it) with a state dict from a `.safetensors` file, loaded
    strictly; its classifier is checked against `num_classes` from the file's header before anything is built."""
    from safetensors.torch import load_file

    check_regular(check_weights_file(path), WEIGHTS_LIMIT, "weights file")
    _check_arch(arch, "model")
    classifier = getattr(timm.models.get_pretrained_cfg(arch), "classifier", None)
    _check_classifier(path, classifier, num_classes, "the data has")
    model = create_model(arch, num_classes, **kwargs)
    try:
        unwrap_timm(model).load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as error:
        raise UserError(f"--weights {path} does not fit {arch} with {num_classes} classes: "
                        f"{_first_problem(error)}") from None
    return model


def _check_arch(arch: Any, where: str) -> None:
    """A UserError naming `where` unless `arch` is in timm's registry (ours register on import)."""
    if isinstance(arch, str) and timm.is_model(arch):
        return
    close = timm.list_models(f"*{arch.split('_')[0]}*")[:5] if isinstance(arch, str) and arch else []
    hint = f"; similar names: {', '.join(close)}" if close else ""
    raise UserError(f"{where}: unknown architecture {arch!r}{hint}. See `timm.list_models()` "
                    "(ours: `timm.list_models('*_cifar')`)")


def _check_classifier(weights: Path, classifier: Any, num_classes: int | None, claim: str) -> None:
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


def _first_problem(error: Exception) -> str:
    """The first detail line of torch's load_state_dict error (its first line only names the model class), with
    at most three of the keys it lists."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[1] if len(lines) > 1 else str(error)
    what, _, listed = line.partition(": ")
    keys = re.findall(r'"([^"]+)"', listed)
    return f"{what}: {', '.join(keys[:3])} and {len(keys) - 3} more" if len(keys) > 3 else line
