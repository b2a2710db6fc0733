"""Fine-tuning a pretrained backbone on new data: where it comes from, which parts train, at which learning rate.

The recipe's `finetune:` section names the backbone and how it is adapted:
- `linear_probe`: the backbone is frozen and kept in eval mode (its BatchNorm statistics too); only the head trains;
- `full`: everything trains, the backbone at `backbone_lr_scale` times the learning rate;
- `partial`: the last `unfreeze` stages of the model's `feature_info` (timm's stage names, e.g. `stages.3` or
  `layer4`), every layer after them (final norm) and the head train; the rest is frozen as in a linear probe;
- `lp_ft`: a linear probe for the first `probe_share` of the run's steps, then `full` (sglr_zoo.lp_ft).
Fine-tuning is adversarial with the recipe's `method` and `attack` sections, or clean with `attack.eps: 0`.
The backbone fixes the architecture, the input normalisation and the input size (timm's `resolve_data_config`):
images of another size are resized to it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import timm
from torch import nn

from sglr_zoo.errors import UserError
from sglr_zoo.models import (
    check_model_folder,
    create_model,
    input_normalization,
    load_pretrained,
    record_input_size,
    sha256_of,
    unwrap_timm,
)
from sglr_zoo.recipe import Recipe, from_dict, load_recipe
from sglr_zoo.recipe_yaml import parse_fraction
from sglr_zoo.results import Results, public_text
from sglr_zoo.rundir import ModelFolder
from sglr_zoo.zoo import locate, lookup

__all__ = ["DEFAULT_RECIPE", "NOT_ROBUST_DEFAULTS", "Backbone", "backbone_id", "backbone_record", "build_model",
           "finetune_recipe", "freeze", "has_robust_accuracy", "locate_backbone", "param_groups", "resolve",
           "set_train_mode", "stage_names", "trainable_parts"]

# `sglr-zoo finetune MODEL --data FOLDER` without a recipe: a short adversarial fine-tune, SGLR's refined labels
# from half-way, the backbone at a tenth of the head's learning rate.
DEFAULT_RECIPE: dict[str, Any] = {
    "finetune": {"mode": "full", "backbone_lr_scale": 0.1},
    "method": {"name": "sglr", "start_epoch": 0.5},
    "optim": {"lr": 0.01},
    "schedule": {"name": "cosine", "epochs": 10},
    "eval": {"n": 500, "final_attacks": ["clean", "pgd20"], "final_n": 1000},
}
# ... and for a backbone with no robust accuracy on record (a clean timm model, a Hub repo without our results):
# everything at the learning rate of training from scratch. On docs/transfer.md's experiment (3 seeds) that is what a
# clean backbone needs: the backbone at the head's rate gained 26 points of PGD-20 over a tenth of it, and that rate at
# scratch's 0.1 instead of fine-tuning's 0.05 another 1.8 (+2.3 clean; every seed above every seed at 0.05). An eps
# warm-up (`attack.warmup`) cost 2.5 points of PGD-20 for 3.3 of clean accuracy in every seed: an option, not a default.
NOT_ROBUST_DEFAULTS: dict[str, float] = {"optim.lr": 0.1, "finetune.backbone_lr_scale": 1.0}


def backbone_id(name: str, revision: str | None = None) -> str:
    """What `sglr_zoo.zoo.locate` accepts: a timm name with its pretrained tag becomes its `hf-hub:` repo."""
    if revision and name.startswith("hf-hub:") and "@" not in name:
        return f"{name}@{revision}"
    if "." in name and not Path(name).exists() and timm.is_model(name.split(".")[0]):
        try:
            cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
        except RuntimeError:  # timm: "Invalid pretrained tag"
            cfg = None
        if cfg is None or not cfg.hf_hub_id:
            tags = [n for n in timm.list_pretrained(f"{name.split('.')[0]}.*")][:5]
            hint = f"; tags with weights: {', '.join(tags)}" if tags else "; this architecture has no published weights"
            raise UserError(f"finetune.backbone {name!r}: timm has no Hub weights for this tag{hint}")
        return f"hf-hub:{cfg.hf_hub_id}" + (f"@{revision}" if revision else "")
    return name


class Backbone(NamedTuple):
    """A located backbone: its local folder, checked config.json and the sha256 of its weights."""

    folder: Path
    config: dict[str, Any]
    sha256: str
    stamp: tuple[tuple[int, int, int], ...] | None  # the files' (inode, size, mtime) when they were read


_located: dict[str, Backbone] = {}  # by `backbone_id`: a run locates (one Hub request) and hashes its backbone once


def locate_backbone(name: str) -> Backbone:
    """The backbone `name` (what `backbone_id` returns) located, checked (`check_model_folder`) and hashed; kept
    for the process while its files are unchanged, so that resolving a recipe again asks the Hub nothing."""
    known = _located.get(name)
    if known is not None and known.stamp is not None and known.stamp == _stamp(known.folder):
        return known
    folder = Path(locate(name).removeprefix("local-dir:"))
    stamp = _stamp(folder)
    config = check_model_folder(folder)  # config.json checked against the weights before anything reads it
    _located[name] = Backbone(folder, config, sha256_of(ModelFolder(folder).weights), stamp)
    return _located[name]


def _stamp(folder: Path) -> tuple[tuple[int, int, int], ...] | None:
    """The config's and weights' (inode, size, mtime): what tells a changed file; None when one is gone."""
    try:
        stats = [os.stat(path) for path in (ModelFolder(folder).config, ModelFolder(folder).weights)]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def resolve(recipe: Recipe) -> Path | None:
    """Locates the backbone (Hub weights are downloaded and checked) and writes what it fixes into the recipe.

    Moves `model.pretrained` (the older form) to `finetune.backbone`; records or checks `finetune.backbone_sha256`,
    records the Hub commit in `finetune.backbone_revision`; sets `model.arch`, `model.mean`/`std` and
    `data.image_size` from the backbone's config. The trainer calls it before loading data; calling it again
    changes nothing and locates nothing again (`locate_backbone`). Returns the backbone's local folder (None
    without a backbone).
    """
    cfg = recipe.finetune
    if recipe.model.pretrained is not None:
        cfg.backbone, recipe.model.pretrained = recipe.model.pretrained, None
    if cfg.backbone is None:
        return None
    folder, config, digest, _ = located = locate_backbone(backbone_id(cfg.backbone, cfg.backbone_revision))
    if cfg.backbone_sha256 is not None and cfg.backbone_sha256 != digest:
        raise UserError(f"finetune.backbone_sha256: {cfg.backbone} has sha256 {digest}, the recipe pins "
                        f"{cfg.backbone_sha256}; the weights changed. Pin the new hash or restore the old weights")
    cfg.backbone_sha256 = digest
    if cfg.backbone_revision is None and folder.parent.name == "snapshots":  # the Hub cache: snapshots/<commit>/
        cfg.backbone_revision = folder.name
        _located[backbone_id(cfg.backbone, cfg.backbone_revision)] = located  # what the recipe now names
    pretrained_cfg = config.get("pretrained_cfg", {})
    input_size = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg)["input_size"]
    if input_size[-1] != input_size[-2]:
        raise UserError(f"finetune.backbone {cfg.backbone}: input size {tuple(input_size)} is not square; "
                        "sglr_zoo feeds square images")
    recipe.data.image_size = int(input_size[-1])
    recipe.model.arch = config["architecture"]
    normalization = input_normalization(config)
    recipe.model.mean, recipe.model.std = map(list, normalization) if normalization else (None, None)
    return folder


def backbone_record(recipe: Recipe) -> dict[str, Any] | None:
    """What run.json keeps of a fine-tuned model's backbone, for its card: the name as given, its Hub id (the card's
    `base_model`: an `hf-hub:` or timm backbone, or a published zoo entry; None otherwise), the sha256 of its
    weights, and its own accuracy from the results.json beside them, else a zoo entry's committed results (None:
    never measured, as for a clean model)."""
    cfg = recipe.finetune
    if cfg.backbone is None:
        return None
    located, name = locate_backbone(backbone_id(cfg.backbone, cfg.backbone_revision)), backbone_id(cfg.backbone)
    entry = lookup(cfg.backbone)
    hub_id = name.removeprefix("hf-hub:").partition("@")[0] if name.startswith("hf-hub:") else (
        entry.repo_id if entry is not None and entry.published else None)
    results_file, results = ModelFolder(located.folder).results, entry.results if entry is not None else None
    if results_file.is_file():
        try:
            results = Results.load(results_file)
        except UserError:
            if not name.startswith("hf-hub:"):  # a Hub repo's results.json may be another tool's: it says nothing
                raise
    accuracy = None if results is None else {"n": results.n_examples, "threat": results.threat, "eps": results.eps,
                                             "clean": results.clean_accuracy, **results.robust_accuracy}
    return {"name": public_text(cfg.backbone), "hub_id": hub_id, "sha256": located.sha256,
            "num_classes": located.config.get("num_classes"), "accuracy": accuracy}


def has_robust_accuracy(record: dict[str, Any] | None) -> bool:
    """Whether a `backbone_record` holds an accuracy under attack at a positive eps above chance (100 % / its
    classes): a clean model evaluated under attack (about 0 %) has robust accuracy on record, but no robustness."""
    accuracy = (record or {}).get("accuracy") or {}
    if not accuracy or parse_fraction(accuracy["eps"]) <= 0:
        return False
    chance = 100 / record["num_classes"] if record.get("num_classes") else 0.0
    return any(value > chance for key, value in accuracy.items() if key not in ("n", "threat", "eps", "clean"))


def build_model(recipe: Recipe, num_classes: int, class_names: list[str] | None = None) -> nn.Module:
    """The model a recipe trains: a new one, or the backbone with its head reset and its parts frozen.

    Loads the backbone strictly (`load_pretrained`: a mismatch names the wrong key and shapes); resets the head
    with timm's `reset_classifier` (see `finetune.head`); freezes as `finetune.mode` says. `class_names` are the
    new data's.
    """
    model_cfg, cfg = recipe.model, recipe.finetune
    if cfg.backbone is None and model_cfg.pretrained is None:
        return record_input_size(create_model(model_cfg.arch, num_classes, mean=model_cfg.mean, std=model_cfg.std,
                                              drop_rate=model_cfg.drop_rate, **model_cfg.kwargs), recipe.data.image_size)
    if num_classes < 2:
        raise UserError(f"data: {num_classes} class(es) found; fine-tuning a classifier needs at least 2")
    if cfg.mode != "full" and recipe.attack.model_mode == "train":
        raise UserError(f"attack.model_mode: train would update the frozen backbone's BatchNorm statistics during "
                        f"the attack; use eval with finetune.mode {cfg.mode}")
    folder = resolve(recipe)
    model = load_pretrained(f"local-dir:{folder}", eval_mode=False, drop_rate=model_cfg.drop_rate,
                            **model_cfg.kwargs)
    inner = unwrap_timm(model)
    backbone_labels = locate_backbone(backbone_id(cfg.backbone, cfg.backbone_revision)).config.get("label_names")
    same_labels = bool(class_names) and backbone_labels == list(class_names) and inner.num_classes == num_classes
    if cfg.head == "keep" and inner.num_classes != num_classes:
        raise UserError(f"finetune.head: keep needs the backbone's {inner.num_classes} classes, the data has "
                        f"{num_classes}; use reset")
    if cfg.head == "reset" or (cfg.head == "auto" and not same_labels):
        _classifier(inner, cfg.backbone)
        inner.reset_classifier(num_classes)
    freeze(model, cfg.mode, cfg.unfreeze)
    return model


def describe(model: nn.Module, recipe: Recipe, num_classes: int) -> str:
    """One line on what fine-tuning starts from and what trains."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = recipe.finetune
    start = f"finetune: {cfg.backbone} ({recipe.model.arch}), mode {cfg.mode}, {num_classes} classes; "
    if cfg.mode == "lp_ft":
        head = sum(p.numel() for p in _classifier(unwrap_timm(model), cfg.backbone).parameters())
        return start + (f"{head:,} of {total:,} parameters train for the first {cfg.probe_share:.0%} of the run's "
                        f"steps (a linear probe), then all of them, the backbone at {cfg.backbone_lr_scale:g} x the "
                        "learning rate")
    return start + f"{trainable:,} of {total:,} parameters train"


def _classifier(model: nn.Module, name: str) -> nn.Module:
    """The head timm knows the model by (`get_classifier`), which must hold weights."""
    if not (hasattr(model, "get_classifier") and hasattr(model, "reset_classifier")):
        raise UserError(f"finetune.backbone {name}: {type(model).__name__} has no known classifier "
                        "(timm's get_classifier/reset_classifier); a linear probe or a head reset needs one")
    head = model.get_classifier()
    if not isinstance(head, nn.Module) or not any(p.numel() for p in head.parameters()):
        raise UserError(f"finetune.backbone {name}: {type(model).__name__}'s classifier has no weights "
                        f"(num_classes={getattr(model, 'num_classes', '?')}); set finetune.head: reset")
    return head


def stage_names(model: nn.Module) -> list[str]:
    """The model's stages, named the timm way (`feature_info` modules), first to last."""
    inner = unwrap_timm(model)
    info = getattr(inner, "feature_info", None)
    if not info:
        raise UserError(f"{type(inner).__name__} has no feature_info (timm's stage names): partial unfreezing "
                        "cannot tell its stages; use finetune.mode full or linear_probe")
    return [entry["module"] for entry in info]


def trainable_parts(model: nn.Module, mode: str, unfreeze: int = 1) -> list[str]:
    """Names (in `model`'s own naming) of the parameters that train in `mode`."""
    inner = unwrap_timm(model)
    names = {id(p): n for n, p in model.named_parameters()}
    if mode in ("full", "lp_ft"):  # lp_ft's probe holds the backbone without freezing it (sglr_zoo.lp_ft)
        return list(names.values())
    head = {id(p) for p in _classifier(inner, type(inner).__name__).parameters()}
    keep = set(head)
    if mode == "partial":
        stages = stage_names(inner)
        if unfreeze > len(stages):
            raise UserError(f"finetune.unfreeze: {unfreeze} stages asked, {type(inner).__name__} has {len(stages)} "
                            f"({', '.join(stages)}); use mode full to train everything")
        order = [id(p) for p in inner.parameters()]
        for stage in stages[-unfreeze:]:
            keep |= {id(p) for p in inner.get_submodule(stage).parameters()}
        in_last = {id(p) for p in inner.get_submodule(stages[-1]).parameters()}
        last = max((i for i, p in enumerate(order) if p in in_last), default=-1)
        keep |= set(order[last + 1:])  # layers after the last stage (final norm): they see only trained features
    elif mode != "linear_probe":
        raise UserError(f"finetune.mode {mode!r}: choose linear_probe, full, partial or lp_ft")
    return [n for i, n in names.items() if i in keep]


def freeze(model: nn.Module, mode: str, unfreeze: int = 1) -> None:
    """Sets `requires_grad` so that exactly `trainable_parts(model, mode, unfreeze)` train."""
    keep = set(trainable_parts(model, mode, unfreeze))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in keep)


def set_train_mode(model: nn.Module, held: Iterable[nn.Parameter] = ()) -> None:
    """`model.train()`, except modules whose parameters are all frozen or `held` (trainable, but not updated for
    now: lp_ft's backbone while the head probes): they stay in eval mode, so that a frozen backbone keeps its
    BatchNorm statistics and runs without dropout. Call it where a loop calls `model.train()`."""
    still = {id(p) for p in held}
    model.train()
    for module in model.modules():
        parameters = list(module.parameters())
        if parameters and not any(p.requires_grad and id(p) not in still for p in parameters):
            module.eval()


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: trainable parameters only; the head at `optim.lr`, the backbone at
    `finetune.backbone_lr_scale` times it (two groups named `head` and `backbone`, always for lp_ft, whose probe
    holds the backbone's). Each group carries timm's `lr_scale` for the schedule to apply."""
    lr, scale = recipe.optim.lr, recipe.finetune.backbone_lr_scale
    trainable = [p for p in model.parameters() if p.requires_grad]
    if recipe.finetune.backbone is None or (scale == 1 and recipe.finetune.mode != "lp_ft"):
        return [{"params": trainable, "lr": lr, "lr_scale": 1.0}]
    head = {id(p) for p in _classifier(unwrap_timm(model), recipe.finetune.backbone).parameters()}
    groups = [{"name": "head", "params": [p for p in trainable if id(p) in head], "lr": lr, "lr_scale": 1.0},
              {"name": "backbone", "params": [p for p in trainable if id(p) not in head], "lr": lr * scale,
               "lr_scale": scale}]
    return [group for group in groups if group["params"]]


def finetune_recipe(target: str, *, data: str | None = None, mode: str | None = None,
                    overrides: list[str] = ()) -> Recipe:
    """The recipe `sglr-zoo finetune` runs: a YAML recipe with a `finetune:` section, or MODEL + `--data` on
    `DEFAULT_RECIPE`, with `NOT_ROBUST_DEFAULTS` for a backbone without robust accuracy on record (said in one
    printed line; `overrides` win). `data` and `mode` are shorthands for `data.dataset=...` and `finetune.mode=...`."""
    extra = ([f"data.dataset={data}"] if data else []) + ([f"finetune.mode={mode}"] if mode else [])
    if target.endswith((".yaml", ".yml")):
        recipe = load_recipe(target, [*extra, *overrides])
        if recipe.finetune.backbone is None and recipe.model.pretrained is None:
            raise UserError(f"{target}: no finetune.backbone; name the model to fine-tune there, or run "
                            f"`sglr-zoo finetune MODEL --data FOLDER` (or `sglr-zoo train {target}` to train anew)")
        return recipe
    if not data:
        raise UserError(f"{target} is not a recipe (.yaml): give the data to fine-tune on with --data FOLDER "
                        "(an image folder, parquet folder, CSV file or Hub dataset id)")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"finetune_{Path(target.split(':')[-1]).name}_{Path(data).name}")
    tree = json.loads(json.dumps(DEFAULT_RECIPE))
    tree["finetune"]["backbone"] = target
    tree["run"] = {"name": name}
    recipe = from_dict(tree, [*extra, *overrides], source="sglr-zoo finetune defaults")
    # The defaults were measured fine-tuning the backbone: a linear probe (frozen backbone) keeps the usual ones.
    if recipe.finetune.mode == "linear_probe" or has_robust_accuracy(backbone_record(recipe)):
        return recipe
    for key, value in NOT_ROBUST_DEFAULTS.items():
        section, leaf = key.split(".")
        tree.setdefault(section, {})[leaf] = value
    tuned = from_dict(tree, [*extra, *overrides], source="sglr-zoo finetune defaults")
    undo = {key: _value(recipe, key) for key in NOT_ROBUST_DEFAULTS if _value(tuned, key) != _value(recipe, key)}
    if undo:
        said = {"optim.lr": f"learning rate {tuned.optim.lr:g} (training from scratch's)",
                "finetune.backbone_lr_scale": f"the backbone at {tuned.finetune.backbone_lr_scale:g} x the head's "
                                              "learning rate"}
        print(f"finetune: {target} has no robust accuracy on record: {' and '.join(said[key] for key in undo)} "
              f"(override with {' '.join(f'{key}={value:g}' for key, value in undo.items())})")
    return tuned


def _value(recipe: Recipe, key: str) -> Any:
    """The recipe's value at a `section.field` key."""
    section, leaf = key.split(".")
    return getattr(getattr(recipe, section), leaf)
