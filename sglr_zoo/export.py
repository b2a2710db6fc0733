"""Exports: a Hub-ready model folder (weights, timm config.json, model card, recipe, results, curves) and a
RobustBench model_info entry, from a run directory or model folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from sglr_zoo.cards import (
    ARCH_LABELS,
    DATASETS,
    METHODS,
    SGLR_PAPER,
    THREAT_LABELS,
    attack_version,
    render_card,
    run_name,
)
from sglr_zoo.errors import UserError
from sglr_zoo.files import TEXT_LIMIT, MiB, WriteFailed, read_regular
from sglr_zoo.hub_results import write_eval_results
from sglr_zoo.models import IDENTITY_MEAN, IDENTITY_STD, WEIGHTS_LIMIT, is_sglr_arch
from sglr_zoo.outcomes import Outcomes
from sglr_zoo.plots import eps_sweep_png
from sglr_zoo.recipe import from_dict, save_recipe
from sglr_zoo.results import Results, public_paths
from sglr_zoo.rundir import ModelFolder, RunDir
from sglr_zoo.source import ModelSource, collect

__all__ = ["export_folder", "export_robustbench", "listing", "robustbench_entry", "weights_bytes", "write_folder"]

RECORD_LIMITS = {"metrics": TEXT_LIMIT, "curves": 64 * MiB}  # run records an export copies: a CSV, a PNG


def export_folder(run_or_folder: str | Path, out_dir: str | Path, *, which: str | None = None,
                  results: str | Path | dict[str, Any] | Results | None = None, repo_id: str | None = None,
                  name: str | None = None, half: bool = False) -> Path:
    """Writes a Hub-ready folder: weights + timm config.json, README.md model card, recipe, results (also as
    `.eval_results/<dataset>.yaml` for a Hub dataset; with a plot when they hold an eps sweep), curves.

    The folder loads with `timm.create_model("local-dir:OUT", pretrained=True)` and `sglr_zoo.load(OUT)`.
    `repo_id` and `name` (a zoo name) only change what the card says; `half` stores the floating-point weights as
    float16 (the model still computes in float32). Local paths in the copied recipe and run record are made
    relative or cut to their last component.
    """
    source = collect(run_or_folder, which=which, results=results)
    return write_folder(source, out_dir, weights_bytes(source.folder.weights, half), repo_id=repo_id, name=name)


def write_folder(source: ModelSource, out_dir: str | Path, weights: bytes, *, repo_id: str | None,
                  name: str | None) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose a new output folder")
    target, records = ModelFolder(out), RunDir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        target.weights.write_bytes(weights)
        target.config.write_text(json.dumps(_export_config(source), indent=2) + "\n")
        if source.recipe is not None:
            save_recipe(from_dict(public_paths(source.recipe.to_dict())), records.recipe)
        if source.run_info is not None:
            records.run_info.write_text(json.dumps(public_paths(source.run_info), indent=2) + "\n")
        for record, limit in RECORD_LIMITS.items():
            if (found := source.record(record)) is not None:
                getattr(records, record).write_bytes(read_regular(found, limit, found.name))
        if source.results is not None:
            source.results.save(target.results)
            if source.outcomes is not None:
                source.outcomes.save(Outcomes.beside(target.results))
            if dataset_id := DATASETS.get(source.dataset, (None, None))[1]:  # a Hub dataset: the Hub's own format
                write_eval_results(out, source.results, dataset_id)
            if source.results.eps_sweep is not None:
                target.eps_sweep_plot.write_bytes(eps_sweep_png(source.results.eps_sweep))
        # The card describes the weights as written (their dtype), so it is rendered from the new folder.
        render_card(replace(source, folder=target), repo_id=repo_id, name=name).save(out / "README.md")
    except OSError as error:  # a full disk: one line naming the file
        raise WriteFailed(Path(error.filename or out), error) from error
    return out


def weights_bytes(weights: Path, half: bool) -> bytes:
    """The safetensors file as exported: unchanged, or with its float32 tensors stored as float16."""
    if not half:
        return read_regular(weights, WEIGHTS_LIMIT, "weights file")
    import torch
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return save({key: t.half() if t.dtype == torch.float32 else t for key, t in tensors.items()}, metadata=metadata)


def _export_config(source: ModelSource) -> dict[str, Any]:
    config = json.loads(json.dumps(source.config))
    if is_sglr_arch(source.arch):  # normalisation is inside the model: the data pipeline must not normalise
        size = source.recipe.data.image_size if source.recipe else 32
        config.setdefault("pretrained_cfg", {}).update(input_size=[3, size, size], mean=list(IDENTITY_MEAN),
                                                       std=list(IDENTITY_STD))
    class_names = (source.run_info or {}).get("class_names")
    if class_names and "label_names" not in config:
        config["label_names"] = list(class_names)
    if source.which:
        config["sglr_zoo_export"] = {"checkpoint": source.which, "epoch": source.epoch}
    return config


def listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def robustbench_entry(run_or_folder: str | Path, *, which: str | None = None,
                      results: str | Path | dict[str, Any] | Results | None = None) -> dict[str, Any]:
    """A RobustBench model_info entry; accuracies are the results', as strings with 2 decimals."""
    source = collect(run_or_folder, which=which, results=results)
    results = source.results
    if results is None:
        raise UserError(f"{run_or_folder} has no results JSON: evaluate it first (with AutoAttack)")
    robust = results.robust_accuracy
    if "autoattack" not in robust:
        raise UserError(f"the results for {run_or_folder} have no AutoAttack accuracy (only "
                        f"{', '.join(robust) or 'clean'}); RobustBench needs AutoAttack: re-run the evaluator with it")
    if source.dataset not in ("cifar10", "cifar100"):
        raise UserError(f"RobustBench lists CIFAR-10/100 models here; this model is on {source.dataset!r}")
    description, paper = METHODS.get(source.method or "", ("unknown training method", SGLR_PAPER))
    return {
        "link": paper["link"],
        "name": paper["title"],
        "authors": paper["authors"],
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": source.dataset,
        "venue": paper["venue"],
        "architecture": ARCH_LABELS.get(source.arch, source.arch),
        "threat_model": THREAT_LABELS[results.threat],
        "eps": results.eps,
        "clean_acc": f"{results.clean_accuracy:.2f}",
        "reported": f"{robust['autoattack']:.2f}",
        "autoattack_acc": f"{robust['autoattack']:.2f}",
        "footnote": (f"{description}, trained with sglr_zoo ({run_name(source) or source.arch}). AutoAttack "
                     f"({attack_version(results, 'autoattack')}) on {results.n_examples} "
                     f"{results.provenance.split or 'test'} "
                     f"examples; 'reported' is this evaluation, not a number from the paper."),
        "unreliable": False,
    }


def export_robustbench(run_or_folder: str | Path, out: str | Path | None = None, *, which: str | None = None,
                       results: str | Path | dict[str, Any] | Results | None = None) -> dict[str, Any]:
    """Builds the RobustBench entry and writes it to `out` when given."""
    entry = robustbench_entry(run_or_folder, which=which, results=results)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(entry, indent=2) + "\n")
    return entry
