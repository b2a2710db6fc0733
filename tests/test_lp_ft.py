"""finetune.mode lp_ft (a linear probe, then full fine-tuning, in one run) and the defaults for a backbone without
robust accuracy on record."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

import sglr_zoo.finetune as finetune
import sglr_zoo.loop as loop
from sglr_zoo.cards import render_card
from sglr_zoo.cli import build_parser
from sglr_zoo.errors import UserError
from sglr_zoo.finetune import finetune_recipe, freeze, param_groups, set_train_mode, trainable_parts
from sglr_zoo.models import save_pretrained
from sglr_zoo.recipe import from_dict, load_recipe
from sglr_zoo.source import collect
from sglr_zoo.zoo import ZOO
from tests.test_finetune import CLASS_NAMES, TINY_RUN, finetune_cfg, randomize_batchnorm, write_image_folder
from tests.test_hub import TEST_RESULTS
from tests.test_training import run_train

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/conftest.py


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A tiny CIFAR-10 export without results.json: no robust accuracy on record."""
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("preactresnet_tiny_cifar", num_classes=10))
    return save_pretrained(model, tmp_path_factory.mktemp("backbone") / "prn_tiny", label_names=CLASS_NAMES)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """24 images of 3 classes: 21 train (3 steps of 8 an epoch), 3 held out."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "animals")


def lp_ft_recipe(backbone: Path, image_folder: Path, folder: Path, mode: str = "lp_ft") -> Path:
    """Two epochs of 3 steps; the probe is the steps that start before 30% of the run: the first 2. The gradient
    clipping is tight enough to act."""
    recipe = {**TINY_RUN, **finetune_cfg(backbone, mode=mode, probe_share=0.3, backbone_lr_scale=0.1),
              "data": {"dataset": str(image_folder)}, "optim": {"lr": 0.05, "grad_clip": 0.05}}
    recipe["run"] = {**TINY_RUN["run"], "output_dir": str(folder), "name": mode}
    path = folder / f"{mode}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_lp_ft_groups_and_modes():
    """All parameters train (DDP syncs what requires grad at prepare), in two groups even at backbone_lr_scale 1;
    the held group's modules stay in eval mode."""
    model = timm.create_model("preactresnet_tiny_cifar", num_classes=3)
    freeze(model, "lp_ft")
    assert all(p.requires_grad for p in model.parameters())
    assert set(trainable_parts(model, "lp_ft")) == {n for n, _ in model.named_parameters()}
    recipe = from_dict({"finetune": {"backbone": "unused", "mode": "lp_ft", "backbone_lr_scale": 1.0}})
    head, body = param_groups(model, recipe)
    assert (head["name"], body["name"], body["lr_scale"]) == ("head", "backbone", 1.0)
    assert {id(p) for p in head["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    set_train_mode(model, body["params"])
    assert model.training and model.fc.training
    assert not any(m.training for m in model.stages.modules()) and not model.bn.training
    set_train_mode(model)
    assert all(m.training for m in model.modules())


def test_lp_ft_probes_then_tunes_and_resumes_across_the_switch(backbone, image_folder, tmp_path, monkeypatch,
                                                               capsys):
    """Steps 1-2 (the probe): the backbone's weights and BatchNorm statistics stay bit for bit, its modules in eval
    mode, its gradients dropped, no momentum kept; the head trains. Steps 3-6: everything trains, the backbone at 0.1 x
    the head's rate, with fresh momentum, from the same head parameters. The probe's head is a linear probe's, bit
    for bit, gradient clipping included. A run stopped after step 1 (inside the probe) and after step 4 (inside full
    fine-tuning) and resumed ends bit for bit as the uninterrupted one."""
    seen = []
    train_step = loop.train_step

    def recorded(parts, *args, **kwargs):
        model, held = parts.unwrapped, parts.held_parameters()
        backbone_params = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
        seen.append({"head": id(model.fc.weight), "state": {k: v.clone() for k, v in model.state_dict().items()},
                     "held": len(held), "momentum": any("momentum_buffer" in parts.optimizer.state.get(p, {})
                                                        for p in backbone_params),
                     "modes": {m.training for n, m in model.named_modules()
                               if n and not n.startswith("fc") and any(True for _ in m.parameters())}})
        result = train_step(parts, *args, **kwargs)
        seen[-1]["lr"] = [group["lr"] for group in parts.optimizer.param_groups]
        return result

    monkeypatch.setattr(loop, "train_step", recorded)
    recipe_file = lp_ft_recipe(backbone, image_folder, tmp_path / "a")
    run = run_train(load_recipe(recipe_file))
    out = capsys.readouterr().out
    assert ("mode lp_ft, 3 classes; 51 of" in out and "parameters train for the first 30% of the run's steps (a "
            "linear probe), then all of them, the backbone at 0.1 x the learning rate" in out)

    original = load_file(str(backbone / "model.safetensors"))
    body = [k for k in original if not k.startswith("fc.")]
    assert any("running_mean" in k for k in body)
    assert len(seen) == 6 and len({step["head"] for step in seen}) == 1  # one head module throughout
    probe, tune = seen[:2], seen[2:]
    for step in [*probe, tune[0]]:  # before steps 1, 2 and 3: untouched by the probe
        assert all(torch.equal(step["state"][k], original[k]) for k in body)
    assert not torch.equal(tune[0]["state"]["fc.weight"], probe[0]["state"]["fc.weight"])  # the probe trained it
    assert [step["held"] > 0 for step in seen] == [True, True, False, False, False, False]
    assert [step["modes"] for step in seen] == [{False}] * 2 + [{True}] * 4
    assert not any(step["momentum"] for step in [*probe, tune[0]]) and all(step["momentum"] for step in tune[1:])
    # The backbone's group has its rate from the schedule throughout: the probe's steps drop its gradients instead
    assert all(backbone_lr == pytest.approx(0.1 * head) for head, backbone_lr in (step["lr"] for step in seen))
    tuned = load_file(str(run / "last/model.safetensors"))
    for kind in ("weight", "running_mean"):  # full fine-tuning moved the backbone and its BatchNorm statistics
        assert not all(torch.equal(tuned[k], original[k]) for k in body if k.endswith(kind)), kind

    saved = yaml.safe_load((run / "recipe.yaml").read_text())["finetune"]
    assert (saved["mode"], saved["probe_share"], saved["backbone_lr_scale"]) == ("lp_ft", 0.3, 0.1)
    assert ("It was fine-tuned (a linear probe for the first 30% of its optimiser steps, then full fine-tuning "
            "with the backbone at 0.1 x the learning rate) from the backbone") in str(render_card(collect(run)))

    monkeypatch.setattr(loop, "train_step", train_step)
    probe_run = run_train(load_recipe(lp_ft_recipe(backbone, image_folder, tmp_path / "p", "linear_probe"),
                                      ["run.max_steps=2"]))
    probed = load_file(str(probe_run / "last/model.safetensors"))
    assert all(torch.equal(probed[k], tune[0]["state"][k]) for k in ("fc.weight", "fc.bias"))
    assert float(next(csv.DictReader((probe_run / "metrics.csv").open()))["grad_norm"]) > 0.05  # clipped
    resumed = lp_ft_recipe(backbone, image_folder, tmp_path / "b")
    for max_steps in ("1", "4", "null"):
        part = run_train(load_recipe(resumed, [f"run.max_steps={max_steps}"]))
    out = capsys.readouterr().out
    assert "(epoch 1, step 1, inside the epoch)" in out and "(epoch 2, step 4, inside the epoch)" in out  # resumed
    again = load_file(str(part / "last/model.safetensors"))
    assert again.keys() == tuned.keys() and all(torch.equal(again[k], tuned[k]) for k in tuned)


def robust_copy(backbone: Path, folder: Path) -> Path:
    """The backbone with a results.json that holds robust accuracy (made-up test values)."""
    shutil.copytree(backbone, folder)
    TEST_RESULTS.save(folder / "results.json")
    return folder


NOTE = "finetune: {name} has no robust accuracy on record: "


SAID = ("learning rate 0.1 (training from scratch's) and the backbone at 1 x the head's learning rate (override with "
        "optim.lr=0.01 finetune.backbone_lr_scale=0.1)")
LR_SAID = "learning rate 0.1 (training from scratch's) (override with optim.lr=0.01)"
SCALE_SAID = "the backbone at 1 x the head's learning rate (override with finetune.backbone_lr_scale=0.1)"


@pytest.mark.parametrize("overrides, lr, scale, said", [
    ([], 0.1, 1.0, SAID),
    (["finetune.backbone_lr_scale=0.5"], 0.1, 0.5, LR_SAID),  # the command line wins
    (["optim.lr=0.02"], 0.02, 1.0, SCALE_SAID),
    (["optim.lr=0.02", "finetune.backbone_lr_scale=0.5"], 0.02, 0.5, None),
    (["finetune.mode=linear_probe"], 0.01, 0.1, None),  # a frozen backbone: measured on fine-tuning it
    (["attack.eps=0"], 0.1, 1.0, SAID),  # clean fine-tuning too
])
def test_a_backbone_without_robust_accuracy_gets_its_own_defaults(backbone, image_folder, overrides, lr, scale, said,
                                                                  capsys):
    recipe = finetune_recipe(f"local-dir:{backbone}", data=str(image_folder), overrides=overrides)
    assert (recipe.attack.warmup, recipe.optim.lr, recipe.finetune.backbone_lr_scale) == (0.0, lr, scale)
    out = capsys.readouterr().out  # no eps warm-up (measured)
    assert out == ("" if said is None else NOTE.format(name=f"local-dir:{backbone}") + said + "\n")


def test_a_clean_timm_backbone_gets_them_and_a_robust_one_does_not(backbone, image_folder, tmp_path, monkeypatch,
                                                                   capsys):
    """A timm name.tag (its Hub copy: no results) gets them; a folder with robust results, and a zoo entry whose
    Hub copy has no results.json but whose committed results are robust, do not."""
    robust = robust_copy(backbone, tmp_path / "robust")
    recipe = finetune_recipe(str(robust), data=str(image_folder))
    assert (recipe.optim.lr, recipe.finetune.backbone_lr_scale) == (0.01, 0.1) and capsys.readouterr().out == ""

    clean = Path(shutil.copytree(backbone, tmp_path / "clean"))
    located = []
    monkeypatch.setattr(finetune, "locate", lambda name: located.append(name) or f"local-dir:{clean}")
    recipe = finetune_recipe("test_resnet.r160_in1k", data=str(image_folder))
    assert located == ["hf-hub:timm/test_resnet.r160_in1k"]
    assert (recipe.optim.lr, recipe.finetune.backbone_lr_scale) == (0.1, 1.0)
    assert capsys.readouterr().out.startswith(NOTE.format(name="test_resnet.r160_in1k"))

    entry = next(entry for entry in ZOO.values() if entry.results is not None and entry.results.robust_accuracy)
    monkeypatch.setattr(finetune, "locate", lambda name: f"local-dir:{clean}")
    recipe = finetune_recipe(entry.name, data=str(image_folder))
    assert (recipe.attack.warmup, recipe.finetune.backbone_lr_scale) == (0.0, 0.1) and capsys.readouterr().out == ""


@pytest.mark.parametrize("changes", [
    {"robust_accuracy": {"pgd20": 0.0}, "worst_case_accuracy": 0.0},  # a clean model evaluated under attack
    {"robust_accuracy": {"pgd20": 10.0}, "worst_case_accuracy": 10.0},  # chance for its 10 classes
    {"eps": "0"},  # "under attack" at no radius
])
def test_robust_accuracy_at_chance_or_at_eps_0_is_no_robustness(backbone, image_folder, tmp_path, changes, capsys):
    folder = Path(shutil.copytree(backbone, tmp_path / "attacked_clean"))
    replace(TEST_RESULTS, **changes).save(folder / "results.json")
    recipe = finetune_recipe(str(folder), data=str(image_folder))
    assert (recipe.optim.lr, recipe.finetune.backbone_lr_scale) == (0.1, 1.0)
    assert capsys.readouterr().out.startswith(NOTE.format(name=str(folder)))


def test_a_hub_backbones_results_of_another_tool_say_nothing(backbone, image_folder, tmp_path, monkeypatch, capsys):
    """A Hub repo's results.json may be another tool's: read as none; beside a local folder's weights it is ours."""
    folder = Path(shutil.copytree(backbone, tmp_path / "hub"))
    (folder / "results.json").write_text('{"accuracy": 0.9}')
    monkeypatch.setattr(finetune, "locate", lambda name: f"local-dir:{folder}")
    recipe = finetune_recipe("hf-hub:someorg/other-tool", data=str(image_folder))
    assert (recipe.optim.lr, recipe.finetune.backbone_lr_scale) == (0.1, 1.0)
    assert capsys.readouterr().out.startswith(NOTE.format(name="hf-hub:someorg/other-tool"))
    with pytest.raises(UserError, match="results.json"):
        finetune_recipe(str(folder), data=str(image_folder))


@pytest.mark.parametrize("share", ["0", "1", "1.5", "-0.1"])
def test_probe_share_is_checked(share):
    with pytest.raises(UserError, match=r"finetune.probe_share: must be in \(0, 1\)"):
        from_dict(finetune_cfg(Path("unused"), mode="lp_ft"), [f"finetune.probe_share={share}"])


def test_the_cli_offers_lp_ft():
    args = build_parser().parse_args(["finetune", "model", "--data", "folder", "--mode", "lp_ft"])
    assert args.mode == "lp_ft"


def test_the_transfer_experiment_measures_the_not_robust_defaults():
    """experiments/transfer/clean_scratch_lr.yaml is clean_full.yaml (the robust backbone's settings) with what
    `sglr-zoo finetune` adds for a clean backbone: its numbers in docs/transfer.md are the defaults' numbers."""
    from sglr_zoo.finetune import NOT_ROBUST_DEFAULTS
    from sglr_zoo.recipe import load_recipe

    experiments = Path(__file__).resolve().parents[1] / "experiments" / "transfer"
    base, defaults = load_recipe(experiments / "clean_full.yaml"), load_recipe(experiments / "clean_scratch_lr.yaml")
    changed = {f"{section}.{field}" for section in ("attack", "finetune", "optim", "schedule", "method")
               for field, value in vars(getattr(defaults, section)).items()
               if getattr(getattr(base, section), field) != value}
    assert changed == set(NOT_ROBUST_DEFAULTS)
    for key, value in NOT_ROBUST_DEFAULTS.items():
        section, field = key.split(".")
        assert getattr(getattr(defaults, section), field) == value, key


def test_the_transfer_ablations_each_keep_one_of_the_not_robust_defaults():
    """clean_warmup_only.yaml and clean_lr_only.yaml are clean_full.yaml with one of the two levers each."""
    from sglr_zoo.recipe import load_recipe

    experiments = Path(__file__).resolve().parents[1] / "experiments" / "transfer"
    base = load_recipe(experiments / "clean_full.yaml")
    warmup_only = load_recipe(experiments / "clean_warmup_only.yaml")
    lr_only = load_recipe(experiments / "clean_lr_only.yaml")
    assert (base.attack.warmup, base.finetune.backbone_lr_scale) == (0.0, 0.1)
    assert (warmup_only.attack.warmup, warmup_only.finetune.backbone_lr_scale) == (0.3, 0.1)
    assert (lr_only.attack.warmup, lr_only.finetune.backbone_lr_scale) == (0.0, 1.0)


def test_the_timm_row_fine_tunes_the_timm_backbone_as_the_clean_one():
    """timm_scratch_lr.yaml is clean_scratch_lr.yaml (the not-robust defaults) with the timm backbone."""
    experiments = Path(__file__).resolve().parents[1] / "experiments" / "transfer"
    ours, timm_row = load_recipe(experiments / "clean_scratch_lr.yaml"), load_recipe(experiments / "timm_scratch_lr.yaml")
    assert timm_row.finetune.backbone.endswith("backbone_timm")
    as_ours = replace(timm_row, finetune=replace(timm_row.finetune, backbone=ours.finetune.backbone),
                      run=replace(timm_row.run, name=ours.run.name))
    assert as_ours == ours
