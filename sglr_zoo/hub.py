"""Sharing trained models: Hub-ready folders with a model card, zoo bundles, `sglr-zoo push`, RobustBench entries.

Every number a card or a RobustBench entry shows comes from the evaluator's results (`sglr_zoo.results.Results`);
without them the card says "not evaluated". The card's text is the Jinja template `templates/model_card.md`,
rendered with huggingface_hub's `ModelCard.from_template`; this module gathers the facts it shows. Nothing
published holds a local path (`sglr_zoo.results.public_paths`). A zoo bundle (`bundle`) is an export folder
committed under sglr_zoo/bundled/ (its layout: sglr_zoo/zoo.py); `push_zoo` uploads the bundles as they are.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from safetensors.torch import load_file

from sglr_zoo.errors import UserError
from sglr_zoo.files import TEXT_LIMIT, MiB, WriteFailed, read_regular
from sglr_zoo.models import (
    IDENTITY_MEAN,
    IDENTITY_STD,
    WEIGHTS_LIMIT,
    check_model_folder,
    is_sglr_arch,
    weights_fingerprint,
)
from sglr_zoo.recipe import Recipe, format_fraction, from_dict, load_recipe, save_recipe
from sglr_zoo.results import Results, public_paths, public_text
from sglr_zoo.rundir import EXPORTS, ModelFolder, RunDir
from sglr_zoo.zoo import CHECK_RESULTS, MODEL_CARDS, ZOO, bundle_folder, sha256_of

__all__ = ["Bundle", "ModelSource", "Upload", "bundle", "collect", "export_folder", "export_robustbench", "push",
           "push_zoo", "render_card", "robustbench_entry", "write_card", "write_zoo_cards"]

CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
ATTACK_LABELS = {"pgd20": "PGD-20", "cw20": "CW-20", "autoattack": "AutoAttack"}
THREAT_LABELS = {"linf": "Linf", "l2": "L2"}
PAPER_EPOCHS = 200  # the schedule of the SGLR paper and the authors' code (shared/SGLR.md)
LICENSE = "mit"
SGLR_PAPER = {
    "title": "Soften to Defend: Towards Adversarial Robustness via Self-Guided Label Refinement",
    "authors": "Zhuorong Li, Daiwei Yu, Lina Wei, Canghong Jin, Yun Zhang, Sixian Chan",
    "venue": "CVPR 2024",
    "link": "https://arxiv.org/abs/2403.09101",
}
CITATION = """\
@InProceedings{Li_2024_CVPR,
    author    = {Li, Zhuorong and Yu, Daiwei and Wei, Lina and Jin, Canghong and Zhang, Yun and Chan, Sixian},
    title     = {Soften to Defend: Towards Adversarial Robustness via Self-Guided Label Refinement},
    booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
    month     = {June},
    year      = {2024},
    pages     = {24776-24785},
    eprint    = {2403.09101},
    archivePrefix = {arXiv}
}"""
METHODS = {  # recipe method.name -> how a card and RobustBench describe it
    "sglr": ("SGLR (Self-Guided Label Refinement) on PGD adversarial training", SGLR_PAPER),
    "sglr_trades": ("SGLR (Self-Guided Label Refinement) on TRADES", SGLR_PAPER),
    "pgd_at": ("PGD adversarial training (Madry et al.), the SGLR paper's baseline", {
        "title": "Towards Deep Learning Models Resistant to Adversarial Attacks",
        "authors": "Aleksander Madry, Aleksandar Makelov, Ludwig Schmidt, Dimitris Tsipras, Adrian Vladu",
        "venue": "ICLR 2018", "link": "https://arxiv.org/abs/1706.06083"}),
    "trades": ("TRADES (Zhang et al.), the SGLR paper's baseline", {
        "title": "Theoretically Principled Trade-off between Robustness and Accuracy",
        "authors": "Hongyang Zhang, Yaodong Yu, Jiantao Jiao, Eric P. Xing, Laurent El Ghaoui, Michael I. Jordan",
        "venue": "ICML 2019", "link": "https://arxiv.org/abs/1901.08573"}),
}
ARCH_LABELS = {"wrn34_10_cifar": "WideResNet-34-10", "wrn28_10_cifar": "WideResNet-28-10",
               "preactresnet18_cifar": "PreActResNet-18", "resnet18_cifar": "ResNet-18",
               "preactresnet10_slim_cifar": "PreActResNet-10 (half width)"}
DATASETS = {"cifar10": ("CIFAR-10", "uoft-cs/cifar10"), "cifar100": ("CIFAR-100", "uoft-cs/cifar100")}
MAX_BUNDLE_MB = 24  # weights committed to the repository: the CPU-scale entries take about 1 MiB, the
# PreActResNet-18 trained on an H100 21.3 MiB in float16; larger models (WRN-34-10) go to the Hub only
CHECK_ATTACKS = ("clean", "pgd20")  # what a bundle's check_results.json must hold (tests/test_zoo.py re-measures it)
RECORD_LIMITS = {"metrics": TEXT_LIMIT, "curves": 64 * MiB}  # run records an export copies: a CSV, a PNG


@dataclass
class ModelSource:
    """Everything a card or an export needs about one checkpoint, gathered from a run or model folder."""

    folder: ModelFolder  # config.json + model.safetensors
    config: dict[str, Any]
    run: RunDir | None = None  # the run the weights were exported from, when known
    which: str | None = None  # "best" or "last" when known
    recipe: Recipe | None = None
    run_info: dict[str, Any] | None = None
    results: Results | None = None

    @property
    def arch(self) -> str:
        return self.config["architecture"]

    @property
    def epoch(self) -> int | None:
        exported = self.config.get("sglr_zoo_export", {})
        if "epoch" in exported:
            return exported["epoch"]
        return (self.run_info or {}).get(f"{self.which}_epoch") if self.which else None

    @cached_property
    def weights_sha256(self) -> str:
        """`weights_fingerprint` of the weights, computed once."""
        return weights_fingerprint(load_file(self.folder.weights))

    @property
    def method(self) -> str | None:
        return self.recipe.method.name if self.recipe else None

    @property
    def dataset(self) -> str:
        """The dataset's short name (`cifar10`), from the results, else the recipe."""
        name = (self.results.provenance.dataset if self.results else None) or (
            self.recipe.data.dataset if self.recipe else "")
        return re.sub(r"[^a-z0-9]", "", Path(str(name).rstrip("/")).name.lower()) or "unknown"

    @property
    def threat(self) -> str | None:
        return self.results.threat if self.results else (self.recipe.attack.threat if self.recipe else None)

    @property
    def eps(self) -> str | None:
        if self.results:
            return self.results.eps
        return str(format_fraction(self.recipe.eval_eps)) if self.recipe else None

    def record(self, name: str) -> Path | None:
        """A file describing the run, by its RunDir attribute ("recipe", "run_info", "metrics", "curves"): the copy
        an export carries beside its weights, else the run directory's own."""
        for run in (RunDir(self.folder.root), self.run):
            if run is not None and getattr(run, name).is_file():
                return getattr(run, name)
        return None


def collect(run_or_folder: str | Path, *, which: str | None = None,
            results: str | Path | dict[str, Any] | Results | None = None) -> ModelSource:
    """Finds the weights, recipe, run record and results of a run directory or a model folder.

    `which` picks a run's export: by default `best/` where the run has one, else `last/`. `results` defaults to the
    `results.json` the trainer's final evaluation wrote next to the weights.
    """
    path = Path(run_or_folder)
    if which not in (None, *EXPORTS):
        raise UserError(f"which must be 'best' or 'last', not {which!r}")
    run = RunDir(path)
    which = which or (run.exports() or ["best"])[0]
    if ModelFolder(path).config.is_file():
        folder = ModelFolder(path)
        run, which = RunDir.of_export(path) or (None, None)
    elif ModelFolder(run.export(which)).config.is_file():
        folder = ModelFolder(run.export(which))
    elif run.exports():
        raise UserError(f"{path} has no {which}/ export; it has {', '.join(e + '/' for e in run.exports())}: "
                        f"pass --which {run.exports()[0]}")
    elif path.is_dir():
        raise UserError(f"{path} has no best/ or last/ export with config.json + model.safetensors: "
                        "pass a run directory written by `sglr-zoo train` or a model folder")
    else:
        raise UserError(f"{path} not found: pass a run directory or a model folder")
    source = ModelSource(folder=folder, config=check_model_folder(folder.root), run=run, which=which)
    source.which = source.config.get("sglr_zoo_export", {}).get("checkpoint", source.which)
    if (recipe := source.record("recipe")) is not None:
        source.recipe = load_recipe(recipe)
    if (run_info := source.record("run_info")) is not None:
        source.run_info = _read_json(run_info)
    if isinstance(results, Results):
        source.results = results
    elif isinstance(results, dict):
        source.results = Results.from_dict(results)
    elif results is not None:
        source.results = Results.load(results)
    elif folder.results.is_file():
        source.results = Results.load(folder.results)
    if source.results and source.results.arch not in (None, source.arch):
        raise UserError(f"results are for {source.results.arch!r} but the weights in {folder.root} are "
                        f"{source.arch!r}: pass the matching results file with --results")
    if source.results:
        _check_same_weights(source.results, source, "the results")
    return source


def export_folder(run_or_folder: str | Path, out_dir: str | Path, *, which: str | None = None,
                  results: str | Path | dict[str, Any] | Results | None = None, repo_id: str | None = None,
                  name: str | None = None, half: bool = False) -> Path:
    """Writes a Hub-ready folder: weights + timm config.json, README.md model card, recipe, results, curves.

    The folder loads with `timm.create_model("local-dir:OUT", pretrained=True)` and `sglr_zoo.load(OUT)`.
    `repo_id` and `name` (a zoo name) only change what the card says; `half` stores the floating-point weights as
    float16 (the model still computes in float32). Local paths in the copied recipe and run record are made
    relative or cut to their last component.
    """
    source = collect(run_or_folder, which=which, results=results)
    return _write_folder(source, out_dir, _weights_bytes(source.folder.weights, half), repo_id=repo_id, name=name)


def _write_folder(source: ModelSource, out_dir: str | Path, weights: bytes, *, repo_id: str | None,
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
        # The card describes the weights as written (their dtype), so it is rendered from the new folder.
        render_card(replace(source, folder=target), repo_id=repo_id, name=name).save(out / "README.md")
    except OSError as error:  # a full disk: one line naming the file
        raise WriteFailed(Path(error.filename or out), error) from error
    return out


def _weights_bytes(weights: Path, half: bool) -> bytes:
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


def render_card(source: ModelSource, *, repo_id: str | None = None, name: str | None = None):
    """The model card (a huggingface_hub `ModelCard`) with eval results in its model-index metadata."""
    from huggingface_hub import ModelCard, ModelCardData

    model_name = name or (repo_id.split("/")[-1] if repo_id else None) or _run_name(source) or source.arch
    dataset_label, dataset_id = DATASETS.get(source.dataset, (source.dataset, None))
    card_data = ModelCardData(
        library_name="timm", license=LICENSE, pipeline_tag="image-classification", model_name=model_name,
        tags=["image-classification", "timm", "adversarial-robustness", "sglr",
              *([source.method] if source.method else [])],
        datasets=[dataset_id] if dataset_id else None, metrics=["accuracy"] if source.results else None,
        eval_results=_eval_results(source, dataset_label, dataset_id) or None,
    )
    facts = _card_facts(source, model_name=model_name, dataset_label=dataset_label, repo_id=repo_id, name=name)
    return ModelCard.from_template(card_data, template_path=str(CARD_TEMPLATE), card=facts, results=source.results)


def write_card(run_or_folder: str | Path, path: str | Path, *, which: str | None = None,
               results: str | Path | dict[str, Any] | Results | None = None, repo_id: str | None = None,
               name: str | None = None) -> Path:
    """Writes the model card of a run or model folder to `path` (a README.md or `model_cards/<name>.md`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_card(collect(run_or_folder, which=which, results=results), repo_id=repo_id, name=name).save(path)
    return path


def write_zoo_cards(runs_dir: str | Path = "runs", out_dir: str | Path = MODEL_CARDS) -> list[Path]:
    """Writes `<name>.md` (and `<name>.results.json` when evaluated) for each zoo entry whose run exists.

    A zoo entry's run is `runs_dir/<recipe file stem>` (the default run name of its recipe); its `best/` export
    is used when the run kept a validation split, else `last/`. Bundled entries are skipped: their card and
    results are in their bundle.
    """
    written = []
    for entry in ZOO.values():
        if entry.bundle is not None:
            continue
        run = RunDir(Path(runs_dir) / Path(entry.recipe).stem)
        if not run.exports():
            continue
        source = collect(run.root)
        card = Path(out_dir) / f"{entry.name}.md"
        card.parent.mkdir(parents=True, exist_ok=True)
        render_card(source, repo_id=entry.repo_id, name=entry.name).save(card)
        written.append(card)
        if source.results is not None:
            source.results.save(Path(out_dir) / f"{entry.name}.results.json")
    return written


class Bundle(NamedTuple):
    """What `bundle` wrote: a zoo entry's folder and the sha256s its table entry must pin."""

    name: str
    folder: Path
    files: list[tuple[str, int]]  # path in the folder, size in bytes
    sha256: str  # of model.safetensors
    config_sha256: str  # of config.json


def bundle(run_or_folder: str | Path, name: str, *, check_results: str | Path | None, which: str | None = None,
           results: str | Path | dict[str, Any] | Results | None = None, half: bool = False,
           out: str | Path | None = None) -> Bundle:
    """Bundles an evaluated run as the zoo entry `name`: its export folder (default sglr_zoo/bundled/<bundle>)
    with the evaluator's results and `check_results`. Evaluates nothing itself.

    Refuses without the evaluator's results (AutoAttack included) or check results (clean and PGD-20 on the first
    n test images, which tests/test_zoo.py re-measures), when the run is not what the table entry says
    (architecture, method, dataset, threat), or when the weights exceed MAX_BUNDLE_MB (`half` halves them).
    """
    entry = ZOO.get(name)
    if entry is None:
        raise UserError(f"--zoo-entry {name!r} is not in the zoo table: add it to ZOO in sglr_zoo/zoo.py first, e.g. "
                        f"_entry({name!r}, ARCH, METHOD, 'recipes/RECIPE.yaml', scale='cpu', bundle={name!r}) "
                        "(a name says architecture, dataset, method and scale, e.g. prn10s-c10-sglr-cpu)")
    source = collect(run_or_folder, which=which, results=results)
    evaluated = source.folder.root
    if source.results is None:
        raise UserError(f"{evaluated} has no results.json from the evaluator: run `sglr-zoo eval {evaluated} --n 500 "
                        f"--out {source.folder.results}` (AutoAttack included), or pass --results FILE")
    if "autoattack" not in source.results.robust_accuracy:
        raise UserError(f"the results for {evaluated} have no AutoAttack accuracy (only "
                        f"{', '.join(source.results.robust_accuracy) or 'clean'}); a zoo entry lists it: re-run "
                        "`sglr-zoo eval` with --attacks clean,pgd20,cw20,autoattack")
    if source.recipe is None:
        raise UserError(f"{evaluated}: no recipe.yaml beside the weights or in their run; bundle a run directory "
                        "written by `sglr-zoo train`")
    table = {"arch": entry.arch, "method": entry.method, "dataset": entry.dataset, "threat": entry.threat,
             "eps": entry.eps}
    found = {"arch": source.arch, "method": source.method, "dataset": source.dataset, "threat": source.threat,
             "eps": source.eps}
    for key in table:
        if table[key] != found[key]:
            raise UserError(f"--zoo-entry {name}: the zoo table says {key} {table[key]!r}, but {run_or_folder} has "
                            f"{found[key]!r}; bundle the matching run or fix the entry in sglr_zoo/zoo.py")
    check = _check_results(check_results, source.results)
    _check_same_weights(check, source, str(check_results))
    weights = _weights_bytes(source.folder.weights, half)
    if len(weights) > MAX_BUNDLE_MB * 2**20:
        raise UserError(f"{source.folder.weights}: {len(weights) / 2**20:.1f} MiB of weights is over the "
                        f"{MAX_BUNDLE_MB} MiB a bundled entry may commit" + ("; pass --fp16 to halve it" if not half
                                                                             else "; publish it on the Hub only"))
    target = out or replace(entry, bundle=entry.bundle or name).folder
    folder = _write_folder(source, target, weights, repo_id=entry.repo_id, name=name)
    check.save(folder / CHECK_RESULTS)
    return Bundle(name, folder, _files(folder), hashlib.sha256(weights).hexdigest(),
                  sha256_of(ModelFolder(folder).config))


def _check_results(path: str | Path | None, results: Results) -> Results:
    """The bundle's check results, refused unless they can be re-measured: the evaluator's clean and PGD-20 on the
    first n examples of the split, threat model and architecture of `results`."""
    command = "sglr-zoo eval RUN/best --n 200 --attacks clean,pgd20 --out check_results.json"
    if path is None:
        raise UserError(f"--check-results FILE is needed: the evaluator's clean and PGD-20 accuracy on the first 200 "
                        f"test images, which tests/test_zoo.py re-measures on the bundled weights. Write it with "
                        f"`{command}`")
    check = Results.load(path)
    if not set(CHECK_ATTACKS[1:]) <= set(check.robust_accuracy):
        raise UserError(f"{path}: no {', '.join(CHECK_ATTACKS[1:])} accuracy; write it with `{command}`")
    if not re.fullmatch(r"first \d+ of the split in order", check.provenance.which):
        raise UserError(f"{path} was measured on {check.provenance.which!r}, not the first n examples of a split: "
                        f"write it with `{command}`")
    for key in ("arch", "threat", "eps"):
        if getattr(check, key) != getattr(results, key):
            raise UserError(f"{path}: {key} {getattr(check, key)!r} differs from the results' "
                            f"{getattr(results, key)!r}; evaluate the same weights with `{command}`")
    if check.provenance.split != results.provenance.split:
        raise UserError(f"{path}: split {check.provenance.split!r} differs from the results' "
                        f"{results.provenance.split!r}; evaluate the same split")
    return check


def _check_same_weights(results: Results, source: ModelSource, what: str) -> None:
    """Refuses results that record a weights fingerprint other than that of the source's weights."""
    if results.weights_sha256 not in (None, source.weights_sha256):
        raise UserError(f"{what} are for other weights than {source.folder.weights} (weights_sha256 differs): pass "
                        f"the results of these weights, or evaluate them: `sglr-zoo eval {source.folder.root}`")


def _files(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


class Upload(NamedTuple):
    """What `push` sent (or, for a dry run, would send)."""

    files: list[tuple[str, int]]  # path in the repo, size in bytes
    sha256: str  # of model.safetensors
    url: str | None  # commit or pull-request URL; None for a dry run
    private: bool  # the repo's visibility (for a dry run: the visibility a new repo would get)
    commit: str | None = None  # the commit's id, to pin as a zoo entry's revision; None for a dry run
    config_sha256: str | None = None  # of config.json, which a zoo entry pins beside the weights' sha256


def push(run_or_folder: str | Path, repo_id: str, *, which: str | None = None,
         results: str | Path | dict[str, Any] | Results | None = None, private: bool = False,
         revision: str | None = None, create_pr: bool = False, dry_run: bool = False,
         commit_message: str | None = None, announce: Callable[[str], None] = print) -> Upload:
    """Exports the checkpoint with its card and uploads the folder to the Hub repo `repo_id`.

    The token comes from HF_TOKEN or `hf auth login`. `dry_run` lists the files and uploads nothing. Before any
    upload, `announce` is told whether the repo is public (the default for a new repo) or private; `private`
    refuses an existing public repo rather than publish into it.
    """
    _check_target(repo_id, revision, create_pr)
    with tempfile.TemporaryDirectory(prefix="sglr_zoo_push_") as tmp:
        folder = export_folder(run_or_folder, Path(tmp) / "export", which=which, results=results, repo_id=repo_id)
        return _upload(folder, repo_id, private=private, revision=revision, create_pr=create_pr, dry_run=dry_run,
                       commit_message=commit_message or f"Upload {_folder_name(run_or_folder)}"
                       + (f" ({which})" if which else ""),
                       announce=announce)


def push_zoo(org: str, *, names: list[str] | None = None, private: bool = False, revision: str | None = None,
             create_pr: bool = False, dry_run: bool = False,
             announce: Callable[[str], None] = print) -> list[tuple[str, str, Upload]]:
    """Uploads every bundled zoo entry (or those in `names`) to ORG/<arch>.<tag>, returning (name, repo, upload).

    The bundled folder goes up as committed, its weights first checked against the table's sha256; only its card
    is rendered again when ORG is not the table's, so that it names the repo it is in.
    """
    entries = [entry for entry in ZOO.values() if entry.bundle is not None]
    if names:
        unknown = sorted(set(names) - {entry.name for entry in entries})
        if unknown:
            raise UserError(f"--only {', '.join(unknown)}: not bundled zoo entries (bundled: "
                            f"{', '.join(entry.name for entry in entries) or 'none'})")
        entries = [entry for entry in entries if entry.name in names]
    if not entries:
        raise UserError("no zoo entry is bundled yet: bundle one with `sglr-zoo export RUN --zoo-entry NAME`")
    uploads = []
    for entry in entries:
        folder = bundle_folder(entry)
        repo_id = f"{org}/{entry.repo_id.split('/', 1)[1]}"
        _check_target(repo_id, revision, create_pr)
        with tempfile.TemporaryDirectory(prefix="sglr_zoo_push_") as tmp:
            if repo_id != entry.repo_id:
                folder = Path(shutil.copytree(folder, Path(tmp) / entry.name))
                render_card(collect(folder), repo_id=repo_id, name=entry.name).save(folder / "README.md")
            upload = _upload(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                             dry_run=dry_run, commit_message=f"Upload zoo entry {entry.name}", announce=announce)
        uploads.append((entry.name, repo_id, upload))
    return uploads


def _check_target(repo_id: str, revision: str | None, create_pr: bool) -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise UserError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    if create_pr and revision not in (None, "main"):
        raise UserError("--create-pr opens a pull request against main; drop --revision or --create-pr")


def _upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, create_pr: bool, dry_run: bool,
            commit_message: str, announce: Callable[[str], None]) -> Upload:
    """Uploads a model folder to `repo_id` (creating the repo), or for a dry run only lists it."""
    files = _files(folder)
    sha256, config_sha256 = sha256_of(ModelFolder(folder).weights), sha256_of(ModelFolder(folder).config)
    if dry_run:
        announce(f"dry run: {repo_id} would be {_visibility(private)} if this push created it "
                 + ("(--private)" if private else "(pass --private for a private repo)"))
        return Upload(files, sha256, None, private, config_sha256=config_sha256)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from sglr_zoo.zoo import _network_errors

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        is_private = bool(api.repo_info(repo_id).private)  # an existing repo keeps its own visibility
        if private and not is_private:
            raise UserError(f"--private: {repo_id} already exists and is public; nothing was uploaded. Make it "
                            "private on the Hub first, or push to a new repo")
        announce(f"uploading to {repo_id}: {_visibility(is_private)}")
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message)
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        hint = (" Log in with `hf auth login` or set HF_TOKEN to a token with write access."
                if status in (401, 403) else "")
        raise UserError(f"push to {repo_id} failed: {str(error).splitlines()[0]}.{hint}") from None
    except _network_errors() as error:
        raise UserError(f"push to {repo_id} failed: cannot reach the Hub ({error})") from None
    return Upload(files, sha256, info.pr_url or info.commit_url, is_private, info.oid, config_sha256)


def _visibility(private: bool) -> str:
    return "a private repo" if private else "a PUBLIC repo: anyone can download these weights and files"


def _folder_name(path: str | Path) -> str:
    """`run/best` for a run's export, else the folder's name (no local path goes into a commit message)."""
    path = Path(path).resolve()
    return f"{path.parent.name}/{path.name}" if RunDir.of_export(path) else path.name


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
        "footnote": (f"{description}, trained with sglr_zoo ({_run_name(source) or source.arch}). AutoAttack "
                     f"({_attack_version(results, 'autoattack')}) on {results.n_examples} "
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


# ---- what the model card shows (its text is templates/model_card.md) ---------------------------------------------

def _card_facts(source: ModelSource, *, model_name: str, dataset_label: str, repo_id: str | None,
                name: str | None) -> dict[str, Any]:
    """The facts the card template shows besides the results' own numbers."""
    results, recipe, run = source.results, source.recipe, source.run_info or {}
    hub_id = f"hf-hub:{repo_id}" if repo_id else "local-dir:PATH/TO/THIS/FOLDER"
    size = source.config.get("pretrained_cfg", {}).get("input_size")
    n_train = run.get("num_examples_train", recipe.data.n_train if recipe else None)
    return {
        "model_name": model_name, "arch": source.arch, "dataset_label": dataset_label,
        "method": METHODS.get(source.method or "", ("an unknown method (no recipe.yaml found)",))[0],
        "baseline": not (source.method or "").startswith("sglr"), "threat": _threat_text(source),
        "input_size": "x".join(map(str, size)) if size else "size unknown", "paper": SGLR_PAPER,
        "attack_labels": ATTACK_LABELS, "check_status": {True: "passed", False: "FAILED", None: "not run"},
        # The template reads the results' numbers itself; these are ways of showing them.
        "failed_checks": [f"{check} ({info.detail})" for check, info in results.sanity.items()
                          if info.passed is False] if results else [],
        "command": public_text(results.provenance.command) if results else None,
        "attacks_yaml": yaml.safe_dump(results.attacks, sort_keys=False).rstrip() if results else None,
        "versions": ", ".join(f"{k} {v}" for k, v in results.versions.items()) if results else None,
        "standard_error": _standard_error(results) if results else None,
        "which": source.which, "epoch": source.epoch, "epochs": recipe.schedule.epochs if recipe else None,
        "best_epoch": run.get("best_epoch"), "last_epoch": run.get("last_epoch"),
        "selection_attack": _selection_attack(source.record("metrics")), "curves": source.record("curves") is not None,
        "recipe_yaml": yaml.safe_dump(public_paths(recipe.to_dict()), sort_keys=False).rstrip() if recipe else None,
        "refined_from": recipe.start_epoch if recipe and recipe.method.name.startswith("sglr") else None,
        "finetune": recipe.finetune if recipe and recipe.finetune.backbone else None,
        "backbone": public_text(recipe.finetune.backbone) if recipe and recipe.finetune.backbone else None,
        "facts": _training_facts(run), "imported": source.config.get("sglr_zoo_import"),
        "hub_id": hub_id, "repo_id": repo_id, "zoo_name": name, "num_classes": source.config.get("num_classes", "N"),
        "label_names": source.config.get("label_names"),
        "cpu_scale": bool(recipe) and (recipe.schedule.epochs < PAPER_EPOCHS or recipe.data.n_train is not None),
        "n_train": n_train if recipe and recipe.data.n_train is not None else None, "paper_epochs": PAPER_EPOCHS,
        "citation": CITATION, "half": _stored_dtypes(source.folder.weights) == {"F16"},
    }


def _stored_dtypes(weights: Path) -> set[str]:
    """The dtypes of the floating-point tensors in a safetensors file, read from its header ("F32", "F16", ...)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    return {dtype for dtype in dtypes if dtype.startswith(("F", "BF"))}


def _run_name(source: ModelSource) -> str | None:
    if source.recipe and source.recipe.run.name:
        return source.recipe.run.name
    return source.run.root.name if source.run else None


def _threat_text(source: ModelSource) -> str:
    threat = THREAT_LABELS.get(source.threat or "", source.threat or "unknown norm")
    return f"{threat}, eps = {source.eps}" if source.eps else threat


def _attack_version(results: Results, attack: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in results.attacks.get(attack, {}).items())


def _standard_error(results: Results) -> float:
    """The largest binomial standard error (percentage points) among the accuracies shown."""
    n = results.n_examples
    values = [results.clean_accuracy, *results.robust_accuracy.values()]
    return max(math.sqrt(v / 100 * (1 - v / 100) / n) * 100 for v in values) if n else float("nan")


def _selection_attack(metrics: Path | None) -> str:
    """The attack of the validation column that picks `best` (e.g. `val_pgd10_acc` -> "PGD-10"), read from
    metrics.csv's header so that the card names what the trainer measured."""
    header = []
    if metrics is not None:
        text = read_regular(metrics, TEXT_LIMIT, "metrics.csv").decode("utf-8", errors="replace")
        header = next(csv.reader(text.splitlines()[:1]), [])
    for column in header:
        if match := re.fullmatch(r"val_(pgd|cw)(\d*)_acc", column):
            return match[1].upper() + (f"-{match[2]}" if match[2] else "")
    return "PGD"


def _training_facts(run: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, value) lines from run.json: versions, seed, the real example counts and the command."""
    facts = [("sglr_zoo version", run.get("sglr_zoo_version")), ("git commit", run.get("git_commit")),
             ("seed", run.get("seed"))]
    facts += [(f"{key.removeprefix('num_examples_')} examples".replace("train ", "training ", 1), value)
              for key, value in run.items() if key.startswith("num_examples_")]
    facts.append(("command", public_text(run.get("command"))))
    return [(label, value) for label, value in facts if value is not None]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_regular(path, TEXT_LIMIT, path.name).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        detail = "nested too deeply" if isinstance(error, RecursionError) else error
        raise UserError(f"{path}: not valid JSON ({detail})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _eval_results(source: ModelSource, dataset_label: str, dataset_id: str | None) -> list:
    from huggingface_hub import EvalResult

    results = source.results
    if results is None:
        return []
    common = dict(task_type="image-classification", task_name="Image Classification",
                  dataset_type=dataset_id or source.dataset, dataset_name=dataset_label,
                  dataset_split=results.provenance.split)
    threat = f"{THREAT_LABELS.get(results.threat, results.threat)} eps={results.eps}"
    entries = [EvalResult(metric_type="accuracy", metric_name="Clean accuracy (%)",
                          metric_value=results.clean_accuracy, **common)]
    for attack, value in results.robust_accuracy.items():
        label = ATTACK_LABELS.get(attack, attack)
        entries.append(EvalResult(metric_type="robust_accuracy", metric_name=f"{label} robust accuracy (%), {threat}",
                                  metric_value=value, metric_config=attack,
                                  metric_args=results.attacks.get(attack), **common))
    return entries
