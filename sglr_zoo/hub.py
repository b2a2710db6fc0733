"""Sharing trained models: Hub-ready folders with a model card, `sglr-zoo push`, RobustBench entries.

Every number a card or a RobustBench entry shows comes from the evaluator's results JSON
(schema `sglr_zoo.results/1`); without one the card says "not evaluated".
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from sglr_zoo.errors import UserError
from sglr_zoo.evaluate import load_results
from sglr_zoo.models import IDENTITY_MEAN, IDENTITY_STD, is_sglr_arch
from sglr_zoo.recipe import Recipe, format_fraction, load_recipe
from sglr_zoo.zoo import MODEL_CARDS, WEIGHTS_NAME, ZOO

__all__ = ["ModelSource", "Upload", "collect", "export_folder", "export_robustbench", "push",
           "render_card", "robustbench_entry", "write_card", "write_zoo_cards"]

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
RUN_FILES = ("recipe.yaml", "run.json", "metrics.csv", "curves.png")  # copied next to the weights when present


@dataclass
class ModelSource:
    """Everything a card or an export needs about one checkpoint, gathered from a run or model folder."""

    folder: Path  # holds config.json + model.safetensors
    config: dict[str, Any]
    run_dir: Path | None = None  # where recipe.yaml, run.json, metrics.csv, curves.png are
    which: str | None = None  # "best" or "last" when known
    recipe: Recipe | None = None
    run_info: dict[str, Any] | None = None
    results: dict[str, Any] | None = None

    @property
    def arch(self) -> str:
        return self.config["architecture"]

    @property
    def epoch(self) -> int | None:
        exported = self.config.get("sglr_zoo_export", {})
        if "epoch" in exported:
            return exported["epoch"]
        return (self.run_info or {}).get(f"{self.which}_epoch") if self.which else None

    @property
    def method(self) -> str | None:
        return self.recipe.method.name if self.recipe else None

    @property
    def dataset(self) -> str:
        """The dataset's short name (`cifar10`), from the results, else the recipe."""
        name = (self.results or {}).get("dataset") or (self.recipe.data.dataset if self.recipe else "")
        return re.sub(r"[^a-z0-9]", "", Path(str(name).rstrip("/")).name.lower()) or "unknown"

    @property
    def threat(self) -> str | None:
        return (self.results or {}).get("threat") or (self.recipe.attack.threat if self.recipe else None)

    @property
    def eps(self) -> str | None:
        if self.results:
            return str(self.results["eps"])
        return str(format_fraction(self.recipe.attack.eps)) if self.recipe else None

    def file(self, name: str) -> Path | None:
        """A run file (recipe.yaml, run.json, ...) next to the weights or in the run directory."""
        for folder in (self.folder, self.run_dir):
            if folder is not None and (folder / name).is_file():
                return folder / name
        return None


def collect(run_or_folder: str | Path, *, which: str = "best",
            results: str | Path | dict[str, Any] | None = None) -> ModelSource:
    """Finds the weights, recipe, run record and results of a run directory or a model folder.

    `results` defaults to the `results.json` the trainer's final evaluation wrote next to the weights.
    """
    path = Path(run_or_folder)
    if which not in ("best", "last"):
        raise UserError(f"which must be 'best' or 'last', not {which!r}")
    if (path / "config.json").is_file():
        folder = path
        run_dir = path.parent if path.name in ("best", "last") and (path.parent / "run.json").is_file() else None
        which = path.name if run_dir else None
    elif (path / which / "config.json").is_file():
        folder, run_dir = path / which, path
    elif path.is_dir():
        raise UserError(f"{path} has no {which}/ export with config.json + {WEIGHTS_NAME}: "
                        "pass a run directory written by `sglr-zoo train` or a model folder")
    else:
        raise UserError(f"{path} not found: pass a run directory or a model folder")
    if not (folder / WEIGHTS_NAME).is_file():
        raise UserError(f"{folder} has config.json but no {WEIGHTS_NAME}")
    source = ModelSource(folder=folder, config=json.loads((folder / "config.json").read_text()), run_dir=run_dir,
                         which=which)
    source.which = source.config.get("sglr_zoo_export", {}).get("checkpoint", source.which)
    if (recipe := source.file("recipe.yaml")) is not None:
        source.recipe = load_recipe(recipe)
    if (run_json := source.file("run.json")) is not None:
        source.run_info = json.loads(run_json.read_text())
    if isinstance(results, dict):
        source.results = results
    elif results is not None:
        source.results = load_results(results)
    else:
        found = folder / "results.json"
        source.results = load_results(found) if found.is_file() else None
    if source.results and source.results.get("arch") not in (None, source.arch):
        raise UserError(f"results are for {source.results['arch']!r} but the weights in {folder} are "
                        f"{source.arch!r}: pass the matching results file with --results")
    return source


def export_folder(run_or_folder: str | Path, out_dir: str | Path, *, which: str = "best",
                  results: str | Path | dict[str, Any] | None = None, repo_id: str | None = None,
                  name: str | None = None) -> Path:
    """Writes a Hub-ready folder: weights + timm config.json, README.md model card, recipe, results, curves.

    The folder loads with `timm.create_model("local-dir:OUT", pretrained=True)` and `sglr_zoo.load(OUT)`.
    `repo_id` and `name` (a zoo name) only change what the card says.
    """
    source = collect(run_or_folder, which=which, results=results)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose a new output folder")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source.folder / WEIGHTS_NAME, out / WEIGHTS_NAME)
    (out / "config.json").write_text(json.dumps(_export_config(source), indent=2) + "\n")
    for file_name in RUN_FILES:
        if (found := source.file(file_name)) is not None:
            shutil.copyfile(found, out / file_name)
    if source.results is not None:
        (out / "results.json").write_text(json.dumps(source.results, indent=2) + "\n")
    render_card(source, repo_id=repo_id, name=name).save(out / "README.md")
    return out


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
    body = "\n\n".join(part for part in (
        _intro(source, model_name, dataset_label), _results_section(source), _measurement_section(source),
        _checkpoint_section(source), _training_section(source), _usage_section(source, repo_id, name),
        _limitations_section(source), "## Citation\n\n```bibtex\n" + CITATION + "\n```",
    ) if part)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


def write_card(run_or_folder: str | Path, path: str | Path, *, which: str = "best",
               results: str | Path | dict[str, Any] | None = None, repo_id: str | None = None,
               name: str | None = None) -> Path:
    """Writes the model card of a run or model folder to `path` (a README.md or `model_cards/<name>.md`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_card(collect(run_or_folder, which=which, results=results), repo_id=repo_id, name=name).save(path)
    return path


def write_zoo_cards(runs_dir: str | Path = "runs", out_dir: str | Path = MODEL_CARDS) -> list[Path]:
    """Writes `<name>.md` (and `<name>.results.json` when evaluated) for each zoo entry whose run exists.

    A zoo entry's run is `runs_dir/<recipe file stem>` (the default run name of its recipe); its `best/` export
    is used when the run kept a validation split, else `last/`.
    """
    written = []
    for entry in ZOO.values():
        run = Path(runs_dir) / Path(entry.recipe).stem
        which = "best" if (run / "best" / "config.json").is_file() else "last"
        if not (run / which / "config.json").is_file():
            continue
        source = collect(run, which=which)
        card = Path(out_dir) / f"{entry.name}.md"
        card.parent.mkdir(parents=True, exist_ok=True)
        render_card(source, repo_id=entry.repo_id, name=entry.name).save(card)
        written.append(card)
        if source.results is not None:
            (Path(out_dir) / f"{entry.name}.results.json").write_text(json.dumps(source.results, indent=2) + "\n")
    return written


class Upload(NamedTuple):
    """What `push` sent (or, for a dry run, would send)."""

    files: list[tuple[str, int]]  # path in the repo, size in bytes
    sha256: str  # of model.safetensors
    url: str | None  # commit or pull-request URL; None for a dry run


def push(run_or_folder: str | Path, repo_id: str, *, which: str = "best",
         results: str | Path | dict[str, Any] | None = None, private: bool = False, revision: str | None = None,
         create_pr: bool = False, dry_run: bool = False, commit_message: str | None = None) -> Upload:
    """Exports the checkpoint with its card and uploads the folder to the Hub repo `repo_id`.

    The token comes from HF_TOKEN or `hf auth login`. `dry_run` lists the files and uploads nothing.
    """
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise UserError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    if create_pr and revision not in (None, "main"):
        raise UserError("--create-pr opens a pull request against main; drop --revision or --create-pr")
    with tempfile.TemporaryDirectory(prefix="sglr_zoo_push_") as tmp:
        folder = export_folder(run_or_folder, Path(tmp) / "export", which=which, results=results, repo_id=repo_id)
        files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
        sha256 = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
        if dry_run:
            return Upload(files, sha256, None)
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        from sglr_zoo.zoo import _network_errors

        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or f"Upload {_folder_name(run_or_folder)} ({which})")
        except HfHubHTTPError as error:
            status = getattr(error.response, "status_code", None)
            hint = (" Log in with `hf auth login` or set HF_TOKEN to a token with write access."
                    if status in (401, 403) else "")
            raise UserError(f"push to {repo_id} failed: {str(error).splitlines()[0]}.{hint}") from None
        except _network_errors() as error:
            raise UserError(f"push to {repo_id} failed: cannot reach the Hub ({error})") from None
    return Upload(files, sha256, info.pr_url or info.commit_url)


def _folder_name(path: str | Path) -> str:
    path = Path(path).resolve()
    return f"{path.parent.name}/{path.name}" if path.name in ("best", "last") else path.name


def robustbench_entry(run_or_folder: str | Path, *, which: str = "best",
                      results: str | Path | dict[str, Any] | None = None) -> dict[str, Any]:
    """A RobustBench model_info entry; accuracies are the results JSON's, as strings with 2 decimals."""
    source = collect(run_or_folder, which=which, results=results)
    if source.results is None:
        raise UserError(f"{run_or_folder} has no results JSON: evaluate it first (with AutoAttack)")
    robust = source.results["robust_accuracy"]
    if "autoattack" not in robust:
        raise UserError(f"the results for {run_or_folder} have no AutoAttack accuracy (only "
                        f"{', '.join(robust) or 'clean'}); RobustBench needs AutoAttack: re-run the evaluator with it")
    if source.dataset not in ("cifar10", "cifar100"):
        raise UserError(f"RobustBench lists CIFAR-10/100 models here; this model is on {source.dataset!r}")
    description, paper = METHODS.get(source.method or "", ("unknown training method", SGLR_PAPER))
    results = source.results
    return {
        "link": paper["link"],
        "name": paper["title"],
        "authors": paper["authors"],
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": source.dataset,
        "venue": paper["venue"],
        "architecture": ARCH_LABELS.get(source.arch, source.arch),
        "threat_model": THREAT_LABELS[results["threat"]],
        "eps": str(results["eps"]),
        "clean_acc": f"{results['clean_accuracy']:.2f}",
        "reported": f"{robust['autoattack']:.2f}",
        "autoattack_acc": f"{robust['autoattack']:.2f}",
        "footnote": (f"{description}, trained with sglr_zoo ({_run_name(source) or source.arch}). AutoAttack "
                     f"({_attack_version(results, 'autoattack')}) on {results['n_examples']} "
                     f"{results.get('split', 'test')} "
                     f"examples; 'reported' is this evaluation, not a number from the paper."),
        "unreliable": False,
    }


def export_robustbench(run_or_folder: str | Path, out: str | Path | None = None, *, which: str = "best",
                       results: str | Path | dict[str, Any] | None = None) -> dict[str, Any]:
    """Builds the RobustBench entry and writes it to `out` when given."""
    entry = robustbench_entry(run_or_folder, which=which, results=results)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(entry, indent=2) + "\n")
    return entry


# ---- model card sections -----------------------------------------------------------------------------------------

def _run_name(source: ModelSource) -> str | None:
    if source.recipe and source.recipe.run.name:
        return source.recipe.run.name
    return source.run_dir.name if source.run_dir else None


def _threat_text(source: ModelSource) -> str:
    threat = THREAT_LABELS.get(source.threat or "", source.threat or "unknown norm")
    return f"{threat}, eps = {source.eps}" if source.eps else threat


def _attack_version(results: dict[str, Any], attack: str) -> str:
    settings = results["attacks"].get(attack, {})
    return ", ".join(f"{k}={v}" for k, v in settings.items()) if isinstance(settings, dict) else str(settings)


def _eval_results(source: ModelSource, dataset_label: str, dataset_id: str | None) -> list:
    from huggingface_hub import EvalResult

    if source.results is None:
        return []
    results = source.results
    common = dict(task_type="image-classification", task_name="Image Classification",
                  dataset_type=dataset_id or source.dataset, dataset_name=dataset_label,
                  dataset_split=results.get("split"))
    threat = f"{THREAT_LABELS.get(results['threat'], results['threat'])} eps={results['eps']}"
    entries = [EvalResult(metric_type="accuracy", metric_name="Clean accuracy (%)",
                          metric_value=results["clean_accuracy"], **common)]
    for attack, value in results["robust_accuracy"].items():
        label = ATTACK_LABELS.get(attack, attack)
        settings = results["attacks"].get(attack)
        entries.append(EvalResult(metric_type="robust_accuracy", metric_name=f"{label} robust accuracy (%), {threat}",
                                  metric_value=value, metric_config=attack,
                                  metric_args=settings if isinstance(settings, dict) else None, **common))
    return entries


def _intro(source: ModelSource, model_name: str, dataset_label: str) -> str:
    description = METHODS.get(source.method or "", ("an unknown method (no recipe.yaml found)",))[0]
    baseline = ("" if (source.method or "").startswith("sglr") else
                " This model is a baseline, trained with the same code and recipe layout for comparison with SGLR.")
    return (f"# {model_name}\n\n"
            f"An adversarially robust `{source.arch}` image classifier for {dataset_label}, trained with "
            f"{description} against the {_threat_text(source)} threat model. It is a "
            "[timm](https://github.com/huggingface/pytorch-image-models) model from sglr_zoo: it takes RGB images "
            f"in [0, 1] "
            f"({_input_text(source)}) and normalises inside the model, so attacks work in pixel space.\n\n"
            f"SGLR (Self-Guided Label Refinement, \"{SGLR_PAPER['title']}\", {SGLR_PAPER['venue']}) replaces the "
            "one-hot training label with a soft label built from the model's own predictions averaged over "
            "training (an exponential moving average per example), which counters robust overfitting without "
            "an external teacher." + baseline)


def _input_text(source: ModelSource) -> str:
    size = source.config.get("pretrained_cfg", {}).get("input_size")
    return "x".join(map(str, size)) if size else "size unknown"


def _results_section(source: ModelSource) -> str:
    if source.results is None:
        return ("## Results\n\nNot evaluated: no results JSON from the evaluator was found for this checkpoint, so "
                "this card reports no accuracy. Evaluate it (`sglr-zoo eval`) and export again.")
    results = source.results
    rows = [("Clean", "-", results["clean_accuracy"])]
    rows += [(ATTACK_LABELS.get(a, a), _threat_text(source), v) for a, v in results["robust_accuracy"].items()]
    table = "\n".join(f"| {name} | {threat} | {value:.2f} |" for name, threat, value in rows)
    failed = [f"{check} ({info.get('detail', '')})" for check, info in (results.get("sanity") or {}).items()
              if not info.get("passed", False)]
    warning = (f"\n\n**Sanity checks failed:** {'; '.join(failed)}. Treat these numbers with care."
               if failed else "")
    return (f"## Results\n\nAccuracy (%) on {results['n_examples']} examples of the {_dataset_split(results)} split "
            f"({results.get('which', 'examples not recorded')}).\n\n"
            f"| evaluation | threat model | accuracy (%) |\n|---|---|---|\n{table}{warning}")


def _dataset_split(results: dict[str, Any]) -> str:
    return f"{results.get('dataset', '?')} {results.get('split', '?')}"


def _measurement_section(source: ModelSource) -> str:
    if source.results is None:
        return ""
    results = source.results
    attacks = yaml.safe_dump(results["attacks"], sort_keys=False).rstrip()
    sanity = "\n".join(f"- {check}: {'passed' if info.get('passed') else 'FAILED'} - {info.get('detail', '')}"
                       for check, info in (results.get("sanity") or {}).items()) or "- none recorded"
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    wall = f"; wall time {results['wall_time_s']:.0f} s" if isinstance(results.get("wall_time_s"), (int, float)) else ""
    return (f"## How the numbers were measured\n\n"
            f"Evaluated by the sglr_zoo evaluator on {results['n_examples']} examples "
            f"({results.get('which', 'not recorded')}), seed {results.get('seed', 'not recorded')}{wall}, "
            f"with:\n\n```\n{results['command']}\n```\n\n"
            f"Attack settings:\n\n```yaml\n{attacks}\n```\n\n"
            f"Sanity checks (gradient masking and evaluation bugs):\n{sanity}\n\n"
            f"Versions: {versions}. The full results are in `results.json`.")


def _checkpoint_section(source: ModelSource) -> str:
    run = source.run_info or {}
    epochs = source.recipe.schedule.epochs if source.recipe else None
    if source.which is None:
        return "## Checkpoint\n\nWhich epoch of its run this checkpoint comes from was not recorded."
    best, last = run.get("best_epoch"), run.get("last_epoch")
    rule = ("the `best` checkpoint is the epoch with the highest PGD accuracy on the held-out validation split; the "
            "`last` checkpoint is the final epoch")
    return (f"## Checkpoint\n\nThis is the **{source.which}** checkpoint, from epoch {source.epoch} "
            f"(of {epochs if epochs else 'an unrecorded number of'} scheduled epochs; best epoch {best}, last "
            f"epoch {last}): {rule}. Robust overfitting makes the two differ under plain adversarial training; "
            "SGLR aims to keep them close."
            + ("\n\n![training curves](curves.png)" if source.file("curves.png") else ""))


def _training_section(source: ModelSource) -> str:
    if source.recipe is None:
        return "## Training\n\nNo recipe.yaml was found next to these weights: the training settings are unknown."
    recipe_yaml = yaml.safe_dump(source.recipe.to_dict(), sort_keys=False).rstrip()
    run = source.run_info or {}
    facts = [f"- {label}: {run[key]}" for key, label in (
        ("sglr_zoo_version", "sglr_zoo version"), ("git_commit", "git commit"), ("seed", "seed"),
        ("num_examples_train", "training examples"), ("command", "command")) if key in run]
    start = (f" SGLR uses refined labels from epoch {source.recipe.start_epoch} on."
             if source.recipe.method.name.startswith("sglr") else "")
    return ("## Training\n\nTrained with `sglr-zoo train` from this resolved recipe (every hyper-parameter; the "
            f"file is `recipe.yaml` in this repo).{start}\n\n```yaml\n{recipe_yaml}\n```"
            + ("\n\n" + "\n".join(facts) if facts else ""))


def _usage_section(source: ModelSource, repo_id: str | None, name: str | None) -> str:
    hub_id = f"hf-hub:{repo_id}" if repo_id else "local-dir:PATH/TO/THIS/FOLDER"
    zoo = f'\nmodel = sglr_zoo.load("{name}")  # the same, by its zoo name' if name else ""
    num_classes = source.config.get("num_classes", "N")
    return ("## How to use\n\n```python\nimport sglr_zoo\n\n"
            f'model = sglr_zoo.load("{hub_id}")  # eval mode, takes [0, 1] images{zoo}\n```\n\n'
            "With timm (importing sglr_zoo registers the architecture):\n\n```python\nimport timm\nimport sglr_zoo\n\n"
            f'model = timm.create_model("{hub_id}", pretrained=True).eval()\n```\n\n'
            "Fine-tune (adversarially) on another dataset: start a recipe from these weights, e.g.\n\n"
            f"```bash\nsglr-zoo train recipes/quickstart_cifar10.yaml model.arch={source.arch} "
            f"model.pretrained={hub_id} data.dataset=uoft-cs/cifar100 schedule.epochs=30\n```\n\n"
            "or in Python, with a new classifier head:\n\n```python\nfrom sglr_zoo.models import create_model\n\n"
            f'model = create_model("{source.arch}", num_classes=100, pretrained="{hub_id}")\n```\n\n'
            f"The classifier has {num_classes} outputs" +
            (f" ({', '.join(source.config['label_names'])})." if source.config.get("label_names") else "."))


def _limitations_section(source: ModelSource) -> str:
    items = [f"Robustness is only claimed for the {_threat_text(source)} threat model it was trained and "
             "evaluated for; other norms, budgets, corruptions or adaptive attacks may do better."]
    results = source.results
    if results is None:
        items.append("Not evaluated: no accuracy is known for this checkpoint.")
    else:
        n = results["n_examples"]
        values = [results["clean_accuracy"], *results["robust_accuracy"].values()]
        worst = max(math.sqrt(v / 100 * (1 - v / 100) / n) * 100 for v in values) if n else float("nan")
        items.append(f"Numbers come from {n} examples: one standard error is up to {worst:.1f} points.")
        if "autoattack" not in results["robust_accuracy"]:
            items.append("AutoAttack was not run: PGD numbers can overstate the robustness of soft-label training "
                         "(SGLR's PGD-vs-AutoAttack gap), so treat them as upper bounds.")
    if source.recipe is not None:
        recipe = source.recipe
        if recipe.schedule.epochs < PAPER_EPOCHS or recipe.data.n_train is not None:
            subset = f", on the first {recipe.data.n_train} training examples" if recipe.data.n_train else ""
            items.append(f"CPU-scale training: {recipe.schedule.epochs} epochs (the paper uses {PAPER_EPOCHS})"
                         f"{subset}; "
                         "do not compare these numbers with the paper's.")
    items.append("Inputs must be RGB in [0, 1] at the training resolution; do not normalise them outside the model.")
    return "## Limitations\n\n" + "\n".join(f"- {item}" for item in items)
