"""Fine-tuning: head reset, linear probe, partial unfreezing, per-part learning rates, user data, bad inputs."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from sglr_zoo.cards import render_card
from sglr_zoo.cli import main
from sglr_zoo.data import load_splits
from sglr_zoo.errors import UserError
from sglr_zoo.finetune import (
    backbone_id,
    build_model,
    finetune_recipe,
    freeze,
    param_groups,
    resolve,
    set_train_mode,
    stage_names,
    trainable_parts,
)
from sglr_zoo.models import Normalized, create_model, save_pretrained
from sglr_zoo.recipe import DataConfig, from_dict, save_recipe
from sglr_zoo.source import collect

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# A few steps of everything: PGD-1, batch 8, no speed levers (the machine is shared).
TINY_RUN = {
    "attack": {"steps": 1},
    "method": {"name": "sglr", "start_epoch": 2},
    "schedule": {"epochs": 2, "name": "cosine"},
    "optim": {"lr": 0.05},
    "eval": {"n": 8, "steps": 1, "batch_size": 16, "final_attacks": ["clean", "pgd2"], "final_n": 8},
    "run": {"batch_size": 8, "mixed_precision": "no", "compile": False, "channels_last": False},
}


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/conftest.py


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that a change to them shows."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A `local-dir:` export of a tiny CIFAR-10 model, as `sglr-zoo train` writes them."""
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("preactresnet_tiny_cifar", num_classes=10))
    return save_pretrained(model, tmp_path_factory.mktemp("backbone") / "prn_tiny", label_names=CLASS_NAMES)


def write_image_folder(folder: Path, classes=("cat", "dog", "fox"), per_class: int = 8, size: int = 48) -> Path:
    """An image folder (a sub-folder per class), no test split, images larger than the backbone's 32x32 input."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (k * 80 + rng.integers(0, 60, (size, size, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images") / "animals")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finetune_cfg(backbone: Path, **finetune) -> dict:
    return {"finetune": {"backbone": f"local-dir:{backbone}", **finetune}}


def test_head_reset_changes_only_the_classifier(backbone):
    recipe = from_dict(finetune_cfg(backbone))
    model = build_model(recipe, 3, ["cat", "dog", "fox"])
    original, state = load_file(str(backbone / "model.safetensors")), model.state_dict()
    assert set(state) == set(original)
    changed = {k for k in state if state[k].shape != original[k].shape or not torch.equal(state[k], original[k])}
    assert changed == {"fc.weight", "fc.bias"} and state["fc.weight"].shape == (3, 16)
    assert recipe.finetune.backbone_sha256 == sha256(backbone / "model.safetensors")
    assert (recipe.model.arch, recipe.data.image_size) == ("preactresnet_tiny_cifar", 32)

    # head: auto keeps the head when the data's classes are the backbone's, in the same order.
    kept = build_model(from_dict(finetune_cfg(backbone)), 10, CLASS_NAMES).state_dict()
    assert all(torch.equal(kept[k], original[k]) for k in original)
    reset = build_model(from_dict(finetune_cfg(backbone, head="reset")), 10, CLASS_NAMES).state_dict()
    assert not torch.equal(reset["fc.weight"], original["fc.weight"])


def test_linear_probe_keeps_backbone_weights_and_batchnorm_statistics(backbone, image_folder, tmp_path, capsys):
    """Two adversarial SGLR epochs through `sglr-zoo train RECIPE` (what `accelerate launch train.py` runs)."""
    recipe = {**TINY_RUN, **finetune_cfg(backbone, mode="linear_probe"), "data": {"dataset": str(image_folder)}}
    recipe["run"] = {**TINY_RUN["run"], "output_dir": str(tmp_path), "name": "probe"}
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    main(["train", str(path)])
    out = capsys.readouterr().out
    assert f"run directory: {tmp_path / 'probe'}\n" in out and f"done: {tmp_path / 'probe'}; " in out
    assert re.search(r"finetune: local-dir:.* \(preactresnet_tiny_cifar\), mode linear_probe, 3 classes; 51 of "
                     r"[\d,]+ parameters train", out)  # the new head: 16 x 3 + 3

    original = load_file(str(backbone / "model.safetensors"))
    tuned = load_file(str(tmp_path / "probe/last/model.safetensors"))
    backbone_keys = [k for k in original if not k.startswith("fc.")]
    assert any("running_mean" in k for k in backbone_keys)
    for key in backbone_keys:
        assert torch.equal(tuned[key], original[key]), key
    assert tuned["fc.weight"].shape == (3, 16)
    saved = yaml.safe_load((tmp_path / "probe/recipe.yaml").read_text())["finetune"]
    assert saved["mode"] == "linear_probe" and saved["backbone_sha256"] == sha256(backbone / "model.safetensors")
    # The backbone has no results.json: run.json and the card say it was never measured. No Hub id: the card's
    # metadata names it and its weights' sha256 beside the Hub's `base_model`, which takes Hub ids only.
    record = json.loads((tmp_path / "probe/run.json").read_text())["backbone"]
    assert record == {"name": f"local-dir:{backbone.name}", "hub_id": None,
                      "sha256": sha256(backbone / "model.safetensors"), "num_classes": 10, "accuracy": None}
    card = str(render_card(collect(tmp_path / "probe")))
    assert "The backbone's own accuracy: never measured" in card and "\nbase_model:" not in card
    assert f"\nbase_model_name: local-dir:{backbone.name}\n" in card
    assert f"\nbase_model_sha256: {record['sha256']}\n" in card


def test_a_fine_tuned_card_names_its_base_model_and_its_numbers(backbone, tmp_path):
    """A backbone with a Hub id and results: the card's metadata has `base_model` (the Hub's model tree) and its
    text the backbone's own accuracy beside the fine-tuned model's."""
    run = tmp_path / "run"
    save_pretrained(create_model("preactresnet_tiny_cifar", 3), run / "last", label_names=["cat", "dog", "fox"])
    save_recipe(from_dict(finetune_cfg(backbone)), run / "recipe.yaml")
    accuracy = {"n": 500, "threat": "linf", "eps": "8/255", "clean": 62.0, "pgd20": 34.4, "autoattack": 31.6}
    (run / "run.json").write_text(json.dumps({"backbone": {"name": "org/robust", "hub_id": "org/robust",
                                                           "sha256": "ab" * 32, "accuracy": accuracy}}))
    card = str(render_card(collect(run)))
    assert "\nbase_model: org/robust\n" in card and f"\nbase_model_sha256: {'ab' * 32}\n" in card
    assert "base_model_name" not in card
    assert "The backbone's own accuracy: clean 62.00%, PGD-20 34.40%, AutoAttack 31.60% on 500 test images" in card


def test_finetune_image_folder_end_to_end_from_local_dir(backbone, image_folder, tmp_path):
    """`sglr-zoo finetune local-dir:... --data FOLDER`: defaults, no recipe; larger images resized; a held-out
    test split carved from the folder; results for the exports."""
    main(["finetune", f"local-dir:{backbone}", "--data", str(image_folder), f"run.output_dir={tmp_path}",
          "run.name=tuned", "schedule.epochs=1", "attack.steps=1", "eval.n=8", "eval.steps=1", "eval.final_n=8",
          "eval.final_attacks=[clean,pgd2]", "run.batch_size=8", "run.compile=false", "run.mixed_precision=no"])
    run = tmp_path / "tuned"
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["finetune"]["backbone"] == f"local-dir:{backbone}" and saved["finetune"]["mode"] == "full"
    assert saved["data"]["image_size"] == 32 and saved["model"]["arch"] == "preactresnet_tiny_cifar"
    results = (run / "last/results.json").read_text()
    assert json.loads(results)["n_examples"] == 3 and "held out" in results  # 10% of 24 images, stratified
    assert load_file(str(run / "last/model.safetensors"))["fc.weight"].shape == (3, 16)


def test_training_loop_applies_the_backbone_learning_rate(backbone, image_folder, tmp_path):
    """With backbone_lr_scale 1e-12 the backbone's weights move by about 1e-14; at optim.lr they would move by
    about 1e-3. Clean fine-tuning (attack.eps 0) is still evaluated at the standard 8/255."""
    main(["finetune", f"local-dir:{backbone}", "--data", str(image_folder), "finetune.backbone_lr_scale=1e-12",
          f"run.output_dir={tmp_path}", "run.name=slow", "schedule.epochs=1", "run.max_steps=2", "attack.eps=0",
          "eval.n=8", "eval.steps=1", "eval.final_attacks=[clean,pgd1]", "eval.final_n=8", "run.batch_size=8",
          "run.compile=false", "run.mixed_precision=no"])
    assert json.loads((tmp_path / "slow/last/results.json").read_text())["eps"] == "8/255"  # clean, robustness at 8/255
    original = load_file(str(backbone / "model.safetensors"))
    tuned = load_file(str(tmp_path / "slow/last/model.safetensors"))
    parameters = [n for n, _ in timm.create_model("preactresnet_tiny_cifar").named_parameters()
                  if not n.startswith("fc.")]
    assert all(torch.allclose(tuned[n], original[n], rtol=0, atol=1e-9) for n in parameters)
    assert not all(torch.equal(tuned[k], original[k]) for k in original if "running_mean" in k)  # full: BN trains


@pytest.mark.parametrize("arch, unfreeze, trained", [
    ("preactresnet_tiny_cifar", 1, ("stages.3.", "bn.", "fc.")),
    ("preactresnet_tiny_cifar", 2, ("stages.2.", "stages.3.", "bn.", "fc.")),
    ("resnet_tiny_cifar", 1, ("stages.3.", "fc.")),
    ("wrn_tiny_cifar", 1, ("stages.2.", "bn.", "fc.")),
    ("test_resnet", 1, ("layer4.", "fc.")),  # a stock timm model: its feature_info names layer1..layer4
])
def test_partial_unfreezing_touches_only_the_named_stages(arch, unfreeze, trained):
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model(arch, num_classes=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze(model, "partial", unfreeze)
    recipe = from_dict({"finetune": {"backbone": "unused", "mode": "partial", "unfreeze": unfreeze}})
    optimizer = torch.optim.SGD(param_groups(model, recipe), lr=0.1, momentum=0.9, weight_decay=5e-4)
    set_train_mode(model)
    for _ in range(2):
        F.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.randint(0, 3, (8,))).backward()
        optimizer.step()
        optimizer.zero_grad()

    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(trained) for k in changed), sorted(changed)
    assert {n for n, p in model.named_parameters() if n.startswith(trained)} <= changed  # every one of them trains
    assert set(trainable_parts(model, "partial", unfreeze)) == {n for n, _ in model.named_parameters()
                                                                  if n.startswith(trained)}


def test_stage_names_are_timm_feature_info():
    assert stage_names(timm.create_model("wrn_tiny_cifar")) == ["stages.0", "stages.1", "stages.2"]
    model = timm.create_model("preactresnet_tiny_cifar")
    wrapped = Normalized(model, [0.5] * 3, [0.25] * 3)
    assert stage_names(model) == stage_names(wrapped) == [f"stages.{i}" for i in range(4)]
    with pytest.raises(UserError, match="unfreeze: 5 stages asked.*stages.0, stages.1, stages.2, stages.3"):
        freeze(model, "partial", 5)


def test_frozen_parts_stay_in_eval_mode():
    model = timm.create_model("preactresnet_tiny_cifar", num_classes=3)
    freeze(model, "linear_probe")
    set_train_mode(model)
    assert model.training and model.fc.training
    assert not any(m.training for m in model.stages.modules()) and not model.bn.training
    freeze(model, "full")
    set_train_mode(model)
    assert all(m.training for m in model.modules())


def test_param_groups_give_the_backbone_its_own_learning_rate(backbone):
    recipe = from_dict({**finetune_cfg(backbone, backbone_lr_scale=0.1), "optim": {"lr": 0.2}})
    model = build_model(recipe, 3, ["cat", "dog", "fox"])
    head, body = param_groups(model, recipe)
    assert (head["name"], head["lr"], head["lr_scale"]) == ("head", 0.2, 1.0)
    assert (body["name"], body["lr_scale"]) == ("backbone", 0.1) and body["lr"] == pytest.approx(0.02)
    assert {id(p) for p in head["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert len(head["params"]) + len(body["params"]) == len(list(model.parameters()))


def test_stock_timm_backbone_sets_input_size_and_normalisation(tmp_path):
    """A timm ImageNet-style model (normalised inputs, 160x160): the recipe follows its data config."""
    inner = timm.create_model("test_resnet", num_classes=4)
    folder = save_pretrained(Normalized(inner, list(inner.pretrained_cfg["mean"]), list(inner.pretrained_cfg["std"])),
                             tmp_path / "stock")
    recipe = from_dict(finetune_cfg(folder, mode="partial"))
    model = build_model(recipe, 3, ["a", "b", "c"])
    assert recipe.data.image_size == 160 and recipe.model.arch == "test_resnet"
    assert recipe.model.mean == pytest.approx(list(inner.pretrained_cfg["mean"]))
    assert isinstance(model, Normalized) and model.model.get_classifier().out_features == 3
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith(("model.layer4.", "model.fc."))}


def test_model_pretrained_is_the_short_form_of_finetune_backbone(backbone):
    recipe = from_dict({"model": {"pretrained": f"local-dir:{backbone}"}})
    resolve(recipe)
    assert recipe.finetune.backbone == f"local-dir:{backbone}" and recipe.model.pretrained is None
    with pytest.raises(UserError, match="give the backbone once"):
        from_dict({"model": {"pretrained": "a"}, "finetune": {"backbone": "b"}})


def test_timm_name_with_tag_goes_through_the_hub():
    assert backbone_id("test_resnet.r160_in1k") == "hf-hub:timm/test_resnet.r160_in1k"
    assert backbone_id("test_resnet.r160_in1k", "abc123") == "hf-hub:timm/test_resnet.r160_in1k@abc123"
    assert backbone_id("hf-hub:org/name", "abc123") == "hf-hub:org/name@abc123"
    with pytest.raises(UserError, match="no Hub weights"):
        backbone_id("test_resnet.no_such_tag")


def test_csv_of_paths_with_a_held_out_split(image_folder, tmp_path):
    rows = [(str(path.relative_to(image_folder)), path.parent.name) for path in sorted(image_folder.glob("*/*.png"))]
    shutil.copytree(image_folder, tmp_path / "data")
    with (tmp_path / "data" / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    splits = load_splits(DataConfig(dataset=str(tmp_path / "data" / "labels.csv"), holdout_fraction=0.25))
    assert splits.train.class_names == ["cat", "dog", "fox"] and splits.num_classes == 3
    assert (len(splits.train), len(splits.test)) == (18, 6)
    assert sorted(splits.test.labels.tolist()) == [0, 0, 1, 1, 2, 2]  # stratified
    assert splits.train.images.shape[1:] == (3, 32, 32)  # 48x48 files, resized to data.image_size
    again = load_splits(DataConfig(dataset=str(tmp_path / "data" / "labels.csv"), holdout_fraction=0.25))
    assert torch.equal(again.test.images, splits.test.images)  # the same held-out images every time


# --- Bad inputs: one clear line, exit code 2 from the CLI.

def test_backbone_that_does_not_fit_its_architecture_names_key_and_shape(backbone, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(backbone, broken)
    state = load_file(str(broken / "model.safetensors"))
    state["stages.1.0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(UserError, match=r"stages\.1\.0\.conv1\.weight.*8, 8, 1, 1.*8, 8, 3, 3"):
        build_model(from_dict(finetune_cfg(broken)), 3, ["a", "b", "c"])


def test_backbone_sha256_pin_is_checked(backbone):
    with pytest.raises(UserError, match="finetune.backbone_sha256: .*the weights changed"):
        resolve(from_dict(finetune_cfg(backbone, backbone_sha256="0" * 64)))


BACKBONE_CONFIG_EDITS = {  # (change to the backbone's config.json, what the error says)
    "NaN std": (lambda config: config["model_args"].update(mean=[0.5] * 3, std=[float("nan")] * 3),
                r"model_args: std \[nan, nan, nan\] is not in \(0, 1\]"),
    "pixel-scale mean": (lambda config: config["model_args"].update(mean=[125.0] * 3, std=[0.25] * 3),
                         r"model_args: mean \[125.0, 125.0, 125.0\] is not in \[0, 1\]"),
    "classes": (lambda config: config["model_args"].update(num_classes=11),
                r"10 outputs but .*config.json says 11 classes \(model_args.num_classes\)"),
}


@pytest.mark.parametrize("edit", BACKBONE_CONFIG_EDITS)
def test_backbone_config_is_checked_before_the_recipe_takes_it(edit, backbone, tmp_path):
    """`resolve` copies the backbone's normalisation into the recipe: a NaN or pixel-scale one is refused there,
    naming config.json, instead of training on garbled inputs."""
    broken = Path(shutil.copytree(backbone, tmp_path / "broken"))
    config = json.loads((broken / "config.json").read_text())
    change, message = BACKBONE_CONFIG_EDITS[edit]
    change(config)
    (broken / "config.json").write_text(json.dumps(config))
    recipe = from_dict(finetune_cfg(broken))
    with pytest.raises(UserError, match=f"{re.escape(str(broken))}/(config.json|model.safetensors): .*{message}"):
        resolve(recipe)
    assert recipe.model.mean is None and recipe.finetune.backbone_sha256 is None


def test_one_class_is_refused(backbone, tmp_path):
    with pytest.raises(UserError, match="at least 2"):
        build_model(from_dict(finetune_cfg(backbone)), 1, ["cat"])
    with pytest.raises(UserError, match="num_classes: must be >= 2"):
        from_dict({"data": {"num_classes": 1}})
    folder = write_image_folder(tmp_path / "one", classes=("cat",), per_class=3)
    with pytest.raises(UserError, match="needs one sub-folder per class, and at least two classes"):
        load_splits(DataConfig(dataset=str(folder)))


def test_unreadable_image_is_named(tmp_path):
    folder = write_image_folder(tmp_path / "bad", per_class=2)
    (folder / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"cannot read image .*dog/broken\.png"):
        load_splits(DataConfig(dataset=str(folder)))


class NoHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)


def test_linear_probe_needs_a_known_classifier():
    with pytest.raises(UserError, match="no known classifier"):
        freeze(NoHead(), "linear_probe")
    headless = timm.create_model("preactresnet_tiny_cifar", num_classes=0)  # timm: num_classes=0 drops the head
    with pytest.raises(UserError, match="classifier has no weights"):
        freeze(headless, "linear_probe")


def test_linear_probe_with_train_mode_attacks_is_refused(backbone):
    recipe = from_dict({**finetune_cfg(backbone, mode="linear_probe"), "attack": {"model_mode": "train"}})
    with pytest.raises(UserError, match="attack.model_mode: train would update the frozen backbone"):
        build_model(recipe, 3, ["a", "b", "c"])


@pytest.mark.parametrize("argv, message", [
    (["finetune", "some_model"], "give the data to fine-tune on with --data"),
    (["finetune", "missing.yaml"], "recipe file missing.yaml not found"),
    (["finetune", "local-dir:/nonexistent", "--data", "x", "finetune.mode=probe"], "finetune.mode: 'probe'"),
])
def test_finetune_cli_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_recipe_without_backbone_is_refused_by_finetune(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "preactresnet_tiny_cifar"}}))
    with pytest.raises(UserError, match="no finetune.backbone"):
        finetune_recipe(str(path))
    with pytest.raises(UserError, match="finetune.backbone: name the backbone"):
        from_dict({"finetune": {"mode": "linear_probe"}})


def test_a_run_locates_its_backbone_once(backbone, tmp_path, monkeypatch):
    """The trainer resolves the recipe, then builds the model (and a budget probe builds one more from a copy):
    the backbone is located (for a Hub id, one request) and hashed once, while its files are unchanged."""
    import sglr_zoo.finetune as finetune

    folder = Path(shutil.copytree(backbone, tmp_path / "backbone"))
    calls = []
    monkeypatch.setattr(finetune, "locate", lambda name: calls.append(name) or f"local-dir:{folder}")
    recipe = from_dict(finetune_cfg(folder))
    resolve(recipe)
    build_model(recipe, 3, ["cat", "dog", "fox"])
    copy = from_dict(recipe.to_dict())
    build_model(copy, 3, ["cat", "dog", "fox"])
    assert len(calls) == 1 and copy.to_dict() == recipe.to_dict()
    assert recipe.finetune.backbone_sha256 == sha256(folder / "model.safetensors")
    save_file(load_file(str(folder / "model.safetensors")), str(folder / "model.safetensors"))  # rewritten
    resolve(from_dict(finetune_cfg(folder)))
    assert len(calls) == 2
    shutil.rmtree(folder)  # gone: located again, and named
    with pytest.raises(UserError, match="is not a model folder"):
        resolve(from_dict(finetune_cfg(folder)))
    assert len(calls) == 3
