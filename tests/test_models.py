"""Our timm-registered CIFAR architectures, normalisation inside the model, and model folders."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch

import sglr_zoo  # noqa: F401  (registers our architectures)
from sglr_zoo.errors import UserError
from sglr_zoo.models import Normalized, create_model, is_sglr_arch, load_pretrained, save_pretrained, unwrap_timm

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]

# Every registered `*_cifar` arch with its parameter count at 10 classes (the published sizes for the big ones).
PARAMS = {
    "wrn34_10_cifar": 46.2e6,
    "wrn28_10_cifar": 36.5e6,
    "preactresnet18_cifar": 11.2e6,
    "resnet18_cifar": 11.2e6,
    "preactresnet10_slim_cifar": 1.23e6,
    "preactresnet10_quarter_cifar": 0.31e6,
    "wrn_tiny_cifar": None,
    "preactresnet_tiny_cifar": None,
    "resnet_tiny_cifar": None,
}
SMALL = [name for name, n in PARAMS.items() if n is None or n < 2e6]
TINY = [name for name, n in PARAMS.items() if n is None]  # one per family


def test_every_cifar_arch_is_listed():
    assert set(timm.list_models("*_cifar")) == set(PARAMS)
    assert all(is_sglr_arch(name) for name in PARAMS)
    assert not is_sglr_arch("resnet18") and not is_sglr_arch("not_a_model")


@pytest.mark.parametrize("name", PARAMS)
def test_parameter_count(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    expected = PARAMS[name]
    if expected is None:
        assert count < 200_000
    else:
        assert count == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("name", SMALL)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.logsumexp(1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.get_classifier().out_features == 7


@pytest.mark.parametrize("name", TINY)
def test_normalisation_inside_the_model(name):
    torch.manual_seed(0)
    normed = timm.create_model(name, mean=MEAN, std=STD).eval()
    plain = timm.create_model(name).eval()
    state = normed.state_dict()
    assert not any(key.endswith(("mean", "std")) and "normalize" in key for key in state)  # non-persistent buffers
    plain.load_state_dict(state)  # strict: the same keys with or without normalisation
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normed(x), plain((x - mean) / std))
    assert not torch.allclose(normed(x), plain(x))


def test_create_model_ours_normalises_inside():
    model = create_model("resnet_tiny_cifar", 5, mean=MEAN, std=STD)
    assert not isinstance(model, Normalized)
    assert model.normalize.enabled and model(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_create_model_wraps_a_stock_timm_model():
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, mean=MEAN, std=STD).eval()
    assert isinstance(model, Normalized) and model.num_classes == 10
    assert not any("normalize" in key for key in model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), unwrap_timm(model)((x - mean) / std))
    assert not isinstance(create_model("test_resnet", 10), Normalized)  # no mean/std: no wrapper


def test_a_new_stock_model_records_the_size_it_trains_at(tmp_path):
    """timm's test_resnet defaults to 160 px: a recipe training it at 64 px exports input_size 64, which loading,
    fine-tuning (`finetune.resolve`) and `sglr-zoo eval` read back."""
    from sglr_zoo.finetune import build_model
    from sglr_zoo.recipe import Recipe

    assert timm.create_model("test_resnet").pretrained_cfg["input_size"][-1] != 64
    recipe = Recipe()
    recipe.model.arch, recipe.model.mean, recipe.model.std, recipe.data.image_size = "test_resnet", MEAN, STD, 64
    model = build_model(recipe, 5)
    assert isinstance(model, Normalized) and unwrap_timm(model).pretrained_cfg["input_size"] == (3, 64, 64)
    save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    loaded = load_pretrained(f"local-dir:{tmp_path / 'm'}")
    assert timm.data.resolve_data_config({}, model=unwrap_timm(loaded))["input_size"] == (3, 64, 64)
    recipe.model.arch = "preactresnet_tiny_cifar"  # ours at their own size: the config is as before
    assert unwrap_timm(build_model(recipe, 5)).pretrained_cfg["input_size"] == (3, 64, 64)


def test_vit_at_32px():
    model = create_model("vit_tiny_patch16_224", 10, mean=MEAN, std=STD, img_size=32)
    assert isinstance(model, Normalized)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["not_a_model", "wrn34_10_cifarr"])
def test_unknown_arch(arch):
    with pytest.raises(UserError, match=arch) as info:
        create_model(arch, 10)
    assert "model.arch" in str(info.value)


@pytest.mark.parametrize("arch, stock", [("preactresnet_tiny_cifar", False), ("test_resnet", True)])
def test_save_and_load_pretrained(tmp_path, arch, stock):
    torch.manual_seed(0)
    model = create_model(arch, 7, mean=MEAN, std=STD).eval()
    x = torch.rand(2, 3, 32, 32)
    expected = model(x)
    umask = os.umask(0o022)
    try:
        folder = save_pretrained(model, tmp_path / "model", label_names=list("abcdefg"))
    finally:
        os.umask(umask)
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors"}
    assert {(folder / name).stat().st_mode & 0o777 for name in ("config.json", "model.safetensors")} == {0o644}

    loaded = load_pretrained(f"local-dir:{folder}")
    assert isinstance(loaded, Normalized) == stock
    assert not loaded.training
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)

    bare = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert not isinstance(bare, Normalized)
    if stock:  # timm's convention: the stock model expects inputs normalised with its pretrained_cfg mean/std
        mean = torch.tensor(bare.pretrained_cfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(bare.pretrained_cfg["std"]).view(1, 3, 1, 1)
        torch.testing.assert_close(bare((x - mean) / std), expected)
    else:  # ours normalise inside and record identity mean/std
        assert tuple(bare.pretrained_cfg["mean"]) == (0.0, 0.0, 0.0)
        torch.testing.assert_close(bare(x), expected, rtol=0, atol=0)

    # A new head for fine-tuning: the backbone is kept, the classifier re-initialised.
    tuned = load_pretrained(f"local-dir:{folder}", num_classes=3)
    assert tuned(x).shape == (2, 3)
    inner, original = unwrap_timm(tuned), unwrap_timm(model)
    assert inner.get_classifier().out_features == 3
    first = next(iter(original.state_dict()))
    torch.testing.assert_close(inner.state_dict()[first], original.state_dict()[first])


def test_load_pretrained_rejects_a_folder_without_weights(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_pretrained(f"local-dir:{tmp_path}")


def test_load_weights_from_a_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file

    source = create_model("resnet_tiny_cifar", 5).eval()
    weights = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(weights))
    loaded = sglr_zoo.load("resnet_tiny_cifar", weights=weights, num_classes=5)
    x = torch.rand(2, 3, 32, 32)
    assert not loaded.training and torch.equal(loaded(x), source(x))
    with pytest.raises(UserError, match=f"{weights}: the classifier fc has 5 outputs but the data has 7 classes"):
        sglr_zoo.load("resnet_tiny_cifar", weights=weights, num_classes=7)  # checked before building
    with pytest.raises(UserError, match="does not fit wrn_tiny_cifar") as refused:
        sglr_zoo.load("wrn_tiny_cifar", weights=weights, num_classes=5)
    assert re.search(r"Missing key\(s\) in state_dict: [\w.]+, [\w.]+, [\w.]+ and \d+ more$", str(refused.value))
    torch.save(source.state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match="safetensors"):
        sglr_zoo.load("resnet_tiny_cifar", weights=tmp_path / "w.pt", num_classes=5)


def _edit_config(**changes):
    """Sets top-level keys of config.json; `pretrained_cfg__mean=...` sets a key inside a section."""
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            section, _, name = key.partition("__")
            if name:
                config[section][name] = value
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))  # NaN and Infinity as Python's json writes them
    return edit


def _write(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


def _truncate_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _other_weights(folder: Path) -> None:
    """Weights of another architecture with the same classifier: only building and loading can tell."""
    save_pretrained(create_model("resnet_tiny_cifar", 10), folder.parent / "other")
    shutil.copyfile(folder.parent / "other" / "model.safetensors", folder / "model.safetensors")


# (damage to a good model folder, the file the error names, what it says)
FOLDER_ERRORS = [
    ("null config", _write("config.json", "null"), "config.json", "expected a JSON object"),
    ("invalid json", _write("config.json", '{"architecture": '), "config.json", "not valid JSON"),
    ("unknown arch", _edit_config(architecture="not_a_model"), "config.json", "unknown architecture 'not_a_model'"),
    ("no arch", _write("config.json", "{}"), "config.json", "unknown architecture None"),
    ("bad pretrained_cfg", _edit_config(pretrained_cfg=[1]), "config.json", "pretrained_cfg must be a JSON object"),
    ("bad num_classes", _edit_config(num_classes="ten"), "config.json", "num_classes must be a whole number"),
    ("num_classes vs weights", _edit_config(num_classes=7), "model.safetensors",
     "classifier fc has 10 outputs but .*config.json says 7 classes"),
    # timm builds the model from model_args and silently re-initialises a classifier that does not fit
    ("model_args num_classes", _edit_config(model_args__num_classes=11), "model.safetensors",
     r"classifier fc has 10 outputs but .*config.json says 11 classes \(model_args.num_classes\)"),
    ("pretrained_cfg num_classes", _edit_config(pretrained_cfg__num_classes=11), "model.safetensors",
     r"config.json says 11 classes \(pretrained_cfg.num_classes\)"),
    # timm would sum the first convolution's weights over the colour channels and load the rest
    ("model_args in_chans", _edit_config(model_args__in_chans=1), "config.json", "mean must be 1 numbers"),
    ("nested too deeply", _write("config.json", "[" * 100_000 + "]" * 100_000), "config.json", "nested too deeply"),
    ("not a file", lambda folder: ((folder / "config.json").unlink(), os.mkfifo(folder / "config.json")),
     "config.json", r"not a regular file \(a FIFO\)"),
    ("huge config", lambda folder: os.truncate(folder / "config.json", 17 << 20), "config.json",
     "more than a config.json can be"),
    ("weights not a file", lambda folder: ((folder / "model.safetensors").unlink(),
                                           os.mkfifo(folder / "model.safetensors")),
     "model.safetensors", r"not a regular file \(a FIFO\)"),
    ("corrupt weights", _truncate_weights, "model.safetensors", "not a readable safetensors file"),
    ("wrong model_args", _edit_config(model_args={"num_classes": 10, "wings": 2}), "config.json",
     "does not take the arguments given .*wings"),
    ("weights of another arch", _other_weights, "model.safetensors", "does not fit preactresnet_tiny_cifar"),
]


@pytest.mark.parametrize("damage, file, message", [e[1:] for e in FOLDER_ERRORS], ids=[e[0] for e in FOLDER_ERRORS])
def test_bad_model_folder_is_one_user_error_naming_the_file(tmp_path, damage, file, message):
    folder = save_pretrained(create_model("preactresnet_tiny_cifar", 10), tmp_path / "model")
    damage(folder)
    for load in (lambda: load_pretrained(f"local-dir:{folder}"), lambda: sglr_zoo.load(str(folder))):
        with pytest.raises(UserError, match=f"{re.escape(str(folder / file))}.*{message}") as info:
            load()
        assert "\n" not in str(info.value)


def test_wrong_keyword_arguments_are_user_errors(tmp_path):
    folder = save_pretrained(create_model("preactresnet_tiny_cifar", 10), tmp_path / "model")
    with pytest.raises(UserError, match="config.json: preactresnet_tiny_cifar does not take .*wings"):
        load_pretrained(f"local-dir:{folder}", wings=2)
    with pytest.raises(UserError, match=r"model.kwargs \{'wings': 2\}: resnet_tiny_cifar does not take them"):
        create_model("resnet_tiny_cifar", 10, wings=2)


def test_hub_weights_always_go_through_the_zoo_download(tmp_path, monkeypatch):
    """`load_pretrained` and `create_model(pretrained="hf-hub:...")` use the zoo's checked download (safetensors
    only, sha256 against the Hub's record), never timm's own download."""
    import huggingface_hub
    import timm.models._hub as timm_hub

    from sglr_zoo import zoo

    torch.manual_seed(0)
    source = create_model("preactresnet_tiny_cifar", 10).eval()
    folder = save_pretrained(source, tmp_path / "model")
    downloads = []

    def checked_download(repo_id, revision=None, *, sha256=None):
        downloads.append((repo_id, revision))
        return folder

    def unchecked(*args, **kwargs):
        raise AssertionError("a Hub download that skips the zoo's checks")

    monkeypatch.setattr(zoo, "download", checked_download)
    for module, name in ((timm_hub, "download_from_hf"), (timm_hub, "load_state_dict_from_hf"),
                         (timm_hub, "hf_hub_download"), (huggingface_hub, "hf_hub_download")):
        monkeypatch.setattr(module, name, unchecked)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_pretrained("hf-hub:org/robust")(x), source(x))
        tuned = create_model("preactresnet_tiny_cifar", 3, pretrained="hf-hub:org/robust@v1")
        assert tuned(x).shape == (2, 3) and not isinstance(tuned, Normalized)
    assert downloads == [("org/robust", None), ("org/robust", "v1")]


# (change to config.json, the normalisation it breaks): ours normalise inside (model_args mean/std, pretrained_cfg
# the identity), a stock timm model is wrapped with pretrained_cfg mean/std
NORMALIZATION_ERRORS = [
    ("ours: NaN mean", "preactresnet_tiny_cifar", {"model_args__mean": [float("nan")] * 3}, "model_args: mean"),
    ("ours: zero std", "preactresnet_tiny_cifar", {"model_args__std": [0.0, 0.2, 0.2]}, "model_args: std"),
    ("ours: pixel-scale mean", "preactresnet_tiny_cifar", {"model_args__mean": [125.3, 123.0, 113.9]},
     "model_args: mean"),
    ("ours: two stds", "preactresnet_tiny_cifar", {"model_args__std": [0.2, 0.2]}, "model_args: std must be 3 numbers"),
    ("ours: mean without std", "preactresnet_tiny_cifar", {"model_args__std": None}, "model_args: std must be 3"),
    ("ours: shifted pretrained_cfg", "preactresnet_tiny_cifar", {"pretrained_cfg__mean": [0.5, 0.5, 0.5]},
     "normalises inside the model"),
    ("stock: zero std", "test_resnet", {"pretrained_cfg__std": [0.0, 0.0, 0.0]}, "pretrained_cfg: std"),
    ("stock: NaN std", "test_resnet", {"pretrained_cfg__std": [float("nan")] * 3}, "pretrained_cfg: std"),
    ("stock: infinite mean", "test_resnet", {"pretrained_cfg__mean": [float("inf")] * 3}, "pretrained_cfg: mean"),
    ("stock: negative std", "test_resnet", {"pretrained_cfg__std": [-0.2, 0.2, 0.2]}, "pretrained_cfg: std"),
    ("stock: text mean", "test_resnet", {"pretrained_cfg__mean": "imagenet"}, "pretrained_cfg: mean must be 3 numbers"),
    ("stock: input size", "test_resnet", {"pretrained_cfg__input_size": [3, 0, 32]}, "input_size must be"),
]


@pytest.mark.parametrize("arch, changes, message", [e[1:] for e in NORMALIZATION_ERRORS],
                         ids=[e[0] for e in NORMALIZATION_ERRORS])
def test_config_normalisation_is_checked(tmp_path, arch, changes, message):
    """A normalisation that would garble every input (NaN, zero, pixel-scale values, the wrong length) is one
    error naming config.json, never a model that loads and scores near chance."""
    folder = save_pretrained(create_model(arch, 10, mean=MEAN, std=STD), tmp_path / "model")
    load_pretrained(f"local-dir:{folder}")
    _edit_config(**changes)(folder)
    with pytest.raises(UserError, match=f"{re.escape(str(folder / 'config.json'))}: .*{message}") as info:
        load_pretrained(f"local-dir:{folder}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("mean, std", [([float("nan")] * 3, STD), (MEAN, [0.0] * 3), ([0.5] * 3, [2.0] * 3),
                                       ([0.5] * 2, [0.5] * 2)])
def test_create_model_refuses_an_unusable_normalisation(mean, std):
    with pytest.raises(UserError, match="model.mean/model.std: (mean|std)"):
        create_model("resnet_tiny_cifar", 10, mean=mean, std=std)


def test_loading_is_strict_and_a_new_head_is_asked_for(tmp_path):
    """Every stored tensor is loaded (timm's own loading drops a classifier that does not fit); a head of another
    size comes only from the caller's num_classes, on top of the loaded backbone."""
    torch.manual_seed(0)
    source = create_model("preactresnet_tiny_cifar", 10).eval()
    folder = save_pretrained(source, tmp_path / "model")
    loaded = load_pretrained(f"local-dir:{folder}")
    for key, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    tuned = unwrap_timm(load_pretrained(f"local-dir:{folder}", num_classes=4))
    assert tuned.get_classifier().out_features == 4 and tuned.num_classes == 4
    stem = "conv1.weight"
    assert torch.equal(tuned.state_dict()[stem], source.state_dict()[stem])


def test_models_know_nothing_of_the_zoo_or_the_network():
    """models/ builds architectures and loads local folders; names are resolved by sglr_zoo.zoo, which registers
    its `locate` on import (no module of models/ imports the zoo, the hub modules or huggingface_hub)."""
    import ast

    import sglr_zoo.models
    from sglr_zoo import zoo

    modules = ("zoo", "hub", "source", "cards", "export", "push", "bundle", "finetune", "evaluate", "training")
    network_side = (*(f"sglr_zoo.{name}" for name in modules), "huggingface_hub")
    for path in Path(sglr_zoo.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert not name.startswith(network_side), (path, name)
    assert sglr_zoo.models._locators == [zoo.locate]


def test_create_model_from_a_state_dict_file_and_load_weights_deprecated(tmp_path):
    """`create_model(arch, n, pretrained=FILE.safetensors)` is the architecture with those weights (train mode);
    `load_weights`, its older name, still works and says what replaces it."""
    from safetensors.torch import save_file

    from sglr_zoo.models import load_weights

    source = create_model("resnet_tiny_cifar", 5).eval()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    tuned = create_model("resnet_tiny_cifar", 5, pretrained=str(tmp_path / "w.safetensors"))
    assert tuned.training and torch.equal(tuned.eval()(x), source(x))
    folder = save_pretrained(source, tmp_path / "model")
    assert torch.equal(create_model("resnet_tiny_cifar", 5, pretrained=folder).eval()(x), source(x))  # a Path
    with pytest.warns(DeprecationWarning, match=r"sglr_zoo.load\(arch, weights=file, num_classes=n\)"):
        loaded = load_weights("resnet_tiny_cifar", tmp_path / "w.safetensors", 5)
    assert not loaded.training and torch.equal(loaded(x), source(x))
    with pytest.raises(UserError, match="give an existing .safetensors file"), pytest.warns(DeprecationWarning):
        load_weights("resnet_tiny_cifar", tmp_path / "w.pt", 5)
