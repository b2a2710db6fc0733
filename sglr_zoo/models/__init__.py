"""Our CIFAR architectures, registered in timm's registry on import; model creation and loading a model folder
(its checks: `sglr_zoo.models.folder`).

models/ builds architectures and loads model folders on this machine; it never touches the network. Names that
are not a local folder (`hf-hub:` ids, zoo names, run directories) are resolved by `sglr_zoo.zoo`, which
registers its `locate` here when it is imported (`register_locator`, as our model files register in timm's
registry), so that models/ never imports the zoo.
"""

from __future__ import annotations

import copy
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from sglr_zoo.errors import UserError
from sglr_zoo.models import cifar_resnet, preact_resnet, wide_resnet  # noqa: F401  (registers the models)
from sglr_zoo.models.folder import (
    IDENTITY_MEAN,
    IDENTITY_STD,
    WEIGHTS_LIMIT,
    check_arch,
    check_classifier,
    check_model_folder,
    check_normalization,
    check_regular,
    check_weights_file,
    input_normalization,
    is_sglr_arch,
    read_config,
    sha256_of,
    stated_classes,
    weights_fingerprint,
)
from sglr_zoo.models.layers import InputNormalization, Normalized
from sglr_zoo.rundir import ModelFolder

__all__ = ["IDENTITY_MEAN", "IDENTITY_STD", "WEIGHTS_LIMIT", "InputNormalization", "Normalized", "check_model_folder",
           "check_normalization", "check_regular", "check_weights_file", "create_model", "input_normalization",
           "is_sglr_arch", "load_pretrained", "load_weights", "read_config", "record_input_size", "register_locator",
           "save_pretrained", "sha256_of", "taking_pixels", "unwrap_timm", "weights_fingerprint"]
_locators: list[Callable[[str], str]] = []  # sglr_zoo.zoo.locate, once the zoo is imported


def register_locator(locate: Callable[[str], str]) -> None:
    """Sets what turns a name that is not a local folder into `local-dir:FOLDER` (`sglr_zoo.zoo.locate`, which
    registers itself on import: it owns every download and the zoo's names)."""
    _locators[:] = [locate]


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
    check_arch(arch, "model.arch")
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


def record_input_size(model: nn.Module, image_size: int) -> nn.Module:
    """Writes the square size a new model trains at into its timm pretrained_cfg (config.json's `input_size`), so
    that loading, fine-tuning and evaluating it use that size, not the architecture's default (timm's resnet18:
    224)."""
    inner = unwrap_timm(model)
    cfg = dict(getattr(inner, "pretrained_cfg", None) or {})
    channels = tuple(cfg.get("input_size", (3,)))[0]
    inner.pretrained_cfg = {**cfg, "input_size": (channels, image_size, image_size)}
    return model


def taking_pixels(model: nn.Module, arch: str, normalization: tuple[Sequence[float], Sequence[float] | None] | None
                  ) -> nn.Module:
    """`model` as it takes [0, 1] images, given the input `normalization` (mean, std) it expects: our architectures
    apply it inside (they are built with it), a stock timm model is wrapped in `Normalized`."""
    return model if normalization is None or is_sglr_arch(arch) else Normalized(model, *normalization)


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
    stored = next(iter(stated_classes(config, folder.config).values()), None)  # checked: they all agree
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


def load_weights(arch: str, weights: str | Path, num_classes: int) -> nn.Module:
    """Deprecated: `sglr_zoo.load(arch, weights=FILE, num_classes=N)`, or `create_model(arch, N, pretrained=FILE)`
    for a model to train."""
    warnings.warn("sglr_zoo.models.load_weights(arch, file, n) is deprecated: use sglr_zoo.load(arch, weights=file, "
                  "num_classes=n)", DeprecationWarning, stacklevel=2)
    return create_model(arch, num_classes, pretrained=check_weights_file(weights)).eval()


def _with_state_dict(arch: str, path: Path, num_classes: int, **kwargs) -> nn.Module:
    """A timm architecture (as `create_model` builds it) with a state dict from a `.safetensors` file, loaded
    strictly; its classifier is checked against `num_classes` from the file's header before anything is built."""
    from safetensors.torch import load_file

    check_regular(check_weights_file(path), WEIGHTS_LIMIT, "weights file")
    check_arch(arch, "model")
    classifier = getattr(timm.models.get_pretrained_cfg(arch), "classifier", None)
    check_classifier(path, classifier, num_classes, "the data has")
    model = create_model(arch, num_classes, **kwargs)
    try:
        unwrap_timm(model).load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as error:
        raise UserError(f"--weights {path} does not fit {arch} with {num_classes} classes: "
                        f"{_first_problem(error)}") from None
    return model


def _first_problem(error: Exception) -> str:
    """The first detail line of torch's load_state_dict error (its first line only names the model class), with
    at most three of the keys it lists."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[1] if len(lines) > 1 else str(error)
    what, _, listed = line.partition(": ")
    keys = re.findall(r'"([^"]+)"', listed)
    return f"{what}: {', '.join(keys[:3])} and {len(keys) - 3} more" if len(keys) > 3 else line
