"""Model cards: the facts a card shows about one checkpoint, and its rendering.

Every number a card shows comes from the evaluator's results (`sglr_zoo.results.Results`); without them the card
says "not evaluated". The card's text is the Jinja template `templates/model_card.md`, rendered with
huggingface_hub's `ModelCard.from_template`; this module gathers the facts it shows, and the labels and citations
that describe a method (RobustBench's entry uses them too). Nothing published holds a local path
(`sglr_zoo.results.public_paths`).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import yaml

from sglr_zoo.attack_names import AttackName
from sglr_zoo.errors import UserError
from sglr_zoo.files import TEXT_LIMIT, read_regular
from sglr_zoo.outcomes import Outcomes, paired_test
from sglr_zoo.results import Results, public_paths, public_text
from sglr_zoo.rundir import RunDir
from sglr_zoo.source import ModelSource, collect
from sglr_zoo.warmup import describe_warmup
from sglr_zoo.zoo import MODEL_CARDS, ZOO

__all__ = ["ARCH_LABELS", "ATTACK_LABELS", "CITATION", "METHODS", "SGLR_PAPER", "THREAT_LABELS", "attack_label",
           "attack_version",
           "render_card", "rewrite_bundled_card", "run_name", "write_card", "write_zoo_cards"]

CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
ATTACK_LABELS = {name: AttackName.parse(name).label for name in ("pgd20", "cw20", "autoattack")}  # older callers
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


def render_card(source: ModelSource, *, repo_id: str | None = None, name: str | None = None):
    """The model card (a huggingface_hub `ModelCard`) with eval results in its model-index metadata."""
    from huggingface_hub import ModelCard, ModelCardData

    model_name = name or (repo_id.split("/")[-1] if repo_id else None) or run_name(source) or source.arch
    dataset_label, dataset_id = DATASETS.get(source.dataset, (source.dataset, None))
    # A fine-tuned model's backbone: `base_model` (the Hub's model tree) takes Hub ids only, so a backbone without one
    # (a zoo name, a folder) is named in `base_model_name`; `base_model_sha256` pins its weights either way.
    backbone = (source.run_info or {}).get("backbone") or {}
    card_data = ModelCardData(
        library_name="timm", license=LICENSE, pipeline_tag="image-classification", model_name=model_name,
        tags=["image-classification", "timm", "adversarial-robustness", "sglr",
              *([source.method] if source.method else [])],
        datasets=[dataset_id] if dataset_id else None, metrics=["accuracy"] if source.results else None,
        eval_results=_eval_results(source, dataset_label, dataset_id) or None,
        base_model=backbone.get("hub_id"), base_model_name=None if backbone.get("hub_id") else backbone.get("name"),
        base_model_sha256=backbone.get("sha256"),
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


def rewrite_bundled_card(name: str) -> Path:
    """Renders the bundled zoo entry `name`'s card again in its folder, from the folder alone (after its twin is
    bundled, say)."""
    entry = ZOO.get(name)
    if entry is None or entry.folder is None or not entry.folder.is_dir():
        bundled = ", ".join(n for n, e in ZOO.items() if e.bundle is not None) or "none"
        raise UserError(f"--zoo-entry {name}: not a bundled zoo entry (bundled: {bundled}); to bundle a run, give it: "
                        f"sglr-zoo export RUN --zoo-entry {name} --check-results FILE")
    path = entry.folder / "README.md"
    render_card(collect(entry.folder), repo_id=entry.repo_id, name=name).save(path)
    return path


def write_zoo_cards(runs_dir: str | Path = "runs", out_dir: str | Path = MODEL_CARDS) -> list[Path]:
    """Writes `<name>.md` (and `<name>.results.json` when evaluated) for each zoo entry whose run exists.

    A zoo entry's run is `runs_dir/<recipe file stem>` (the default run name of its recipe); its `best/` export
    is used when the run kept a validation split, else `last/`. Bundled and retired entries are skipped: their card
    and results are in their bundle, or were (a retired entry's results stay in model_cards/; a run of its recipe now
    is another model's).
    """
    written = []
    for entry in ZOO.values():
        if entry.bundle is not None or entry.superseded_by is not None:
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


def _card_facts(source: ModelSource, *, model_name: str, dataset_label: str, repo_id: str | None,
                name: str | None) -> dict[str, Any]:
    """The facts the card template shows besides the results' own numbers."""
    results, recipe, run = source.results, source.recipe, source.run_info or {}
    hub_id = f"hf-hub:{repo_id}" if repo_id else "local-dir:PATH/TO/THIS/FOLDER"
    size = source.config.get("pretrained_cfg", {}).get("input_size")
    n_train = run.get("num_examples_train", recipe.data.n_train if recipe else None)
    # A budgeted run's recipe keeps its nominal schedule: the epochs and SGLR's start are those of its last plan.
    plan = (run.get("plans") or [None])[-1]
    epochs = plan["epochs"] if plan else recipe.schedule.epochs if recipe else None
    return {
        "model_name": model_name, "arch": source.arch, "dataset_label": dataset_label,
        "method": METHODS.get(source.method or "", ("an unknown method (no recipe.yaml found)",))[0],
        "baseline": not (source.method or "").startswith("sglr"), "threat": _threat_text(source),
        "input_size": "x".join(map(str, size)) if size else "size unknown", "paper": SGLR_PAPER,
        "attack_labels": {attack: attack_label(attack) for attack in [*results.robust_accuracy, *(
            [results.eps_sweep.attack] if results.eps_sweep else [])]} if results else {},
        "check_status": {True: "passed", False: "FAILED", None: "not run"},
        # The template reads the results' numbers itself; these are ways of showing them.
        "failed_checks": [f"{check} ({info.detail})" for check, info in results.sanity.items()
                          if info.passed is False] if results else [],
        "command": public_text(results.provenance.command) if results else None,
        "attacks_yaml": yaml.safe_dump(results.attacks, sort_keys=False).rstrip() if results else None,
        "versions": ", ".join(f"{k} {v}" for k, v in results.versions.items()) if results else None,
        "standard_error": _standard_error(results) if results else None,
        "autoattack_seconds_in_all": _resumed_autoattack_seconds(results) if results else None,
        "which": source.which, "epoch": source.epoch, "epochs": epochs,
        "best_epoch": run.get("best_epoch"), "last_epoch": run.get("last_epoch"),
        "selection_attack": _selection_attack(source.record("metrics")), "curves": source.record("curves") is not None,
        "recipe_yaml": yaml.safe_dump(public_paths(recipe.to_dict()), sort_keys=False).rstrip() if recipe else None,
        "refined_from": (plan["start_epoch"] if plan else recipe.start_epoch)
        if recipe and recipe.method.name.startswith("sglr") else None,
        "finetune": recipe.finetune if recipe and recipe.finetune.backbone else None,
        "backbone": public_text(recipe.finetune.backbone) if recipe and recipe.finetune.backbone else None,
        "backbone_accuracy": _backbone_accuracy(run.get("backbone")),
        "eps_sweep_plot": source.folder.eps_sweep_plot.is_file(),
        "facts": _training_facts(run) + ([("eps warm-up", describe_warmup(recipe.attack).removeprefix("eps warm-up: "))]
                                         if recipe and recipe.attack.warmup else []),
        "imported": source.config.get("sglr_zoo_import"),
        "hub_id": hub_id, "repo_id": repo_id, "zoo_name": name, "num_classes": source.config.get("num_classes", "N"),
        "label_names": source.config.get("label_names"),
        "cpu_scale": bool(recipe) and (epochs < PAPER_EPOCHS or recipe.data.n_train is not None),
        "n_train": n_train if recipe and recipe.data.n_train is not None else None, "paper_epochs": PAPER_EPOCHS,
        "citation": CITATION, "half": _stored_dtypes(source.folder.weights) == {"F16"},
        "twin": _twin_comparison(source, name),
    }


def _twin_comparison(source: ModelSource, name: str | None) -> dict[str, Any] | None:
    """The zoo entry `name` against its twin (`ZooEntry.twin`), paired on the same images: each attack both ran,
    from the two evaluations' per-example outcomes; else why not (`missing`). None when the entry has no twin."""
    entry = ZOO.get(name or "")
    twin = ZOO.get(entry.twin) if entry and entry.twin else None
    if twin is None:
        return None
    comparison: dict[str, Any] = {"name": twin.name, "method": METHODS[twin.method][0], "tests": [], "missing": None}
    theirs_path = Outcomes.beside(twin.results_path)
    if source.outcomes is None:
        comparison["missing"] = "this model's evaluation kept no per-example outcomes (results.outcomes.json)"
    elif not theirs_path.is_file():
        comparison["missing"] = f"`{twin.name}` has no per-example outcomes committed yet (not bundled, say)"
    else:
        theirs = Outcomes.load(theirs_path)
        attacks = [attack for attack in ("clean", *source.results.robust_accuracy) if attack in theirs.correct]
        try:
            comparison["tests"] = [paired_test(source.outcomes, theirs, attack) for attack in attacks]
        except UserError:
            comparison["missing"] = "the two evaluations are not of the same images"
    return comparison


def _backbone_accuracy(backbone: dict[str, Any] | None) -> str | None:
    """The backbone's own accuracy as run.json recorded it at fine-tuning (`finetune.backbone_record`), in words."""
    if not backbone:
        return None
    accuracy = backbone.get("accuracy")
    if not accuracy:
        return "never measured by the sglr_zoo evaluator (no results.json beside its weights: a clean model, say)"
    shown = [f"{attack_label(name)} {value:.2f}%" for name, value in accuracy.items()
             if name not in ("n", "threat", "eps")]
    return (f"{', '.join(shown)} on {accuracy['n']} test images of its own data "
            f"({THREAT_LABELS.get(accuracy['threat'], accuracy['threat'])} eps={accuracy['eps']})")


def _stored_dtypes(weights: Path) -> set[str]:
    """The dtypes of the floating-point tensors in a safetensors file, read from its header ("F32", "F16", ...)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    return {dtype for dtype in dtypes if dtype.startswith(("F", "BF"))}


def run_name(source: ModelSource) -> str | None:
    if source.recipe and source.recipe.run.name:
        return source.recipe.run.name
    return source.run.root.name if source.run else None


def _threat_text(source: ModelSource) -> str:
    threat = THREAT_LABELS.get(source.threat or "", source.threat or "unknown norm")
    return f"{threat}, eps = {source.eps}" if source.eps else threat


def attack_version(results: Results, attack: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in results.attacks.get(attack, {}).items())


def _standard_error(results: Results) -> float:
    """The largest binomial standard error (percentage points) among the accuracies shown."""
    n = results.n_examples
    values = [results.clean_accuracy, *results.robust_accuracy.values()]
    return max(math.sqrt(v / 100 * (1 - v / 100) / n) * 100 for v in values) if n else float("nan")


def _resumed_autoattack_seconds(results: Results) -> float | None:
    """AutoAttack's seconds in all when the command resumed it from a state file (its sub-attacks' seconds, which the
    state keeps, then exceed this command's), else None: the wall time alone would hide the earlier runs."""
    total = sum(step.seconds for step in results.autoattack_per_attack.values())
    return total if total > results.attack_seconds.get("autoattack", total) + 1 else None


def _selection_attack(metrics: Path | None) -> str:
    """The attack of the validation column that picks `best` (e.g. `val_pgd10_acc` -> "PGD-10"), read from
    metrics.csv's header so that the card names what the trainer measured."""
    header = []
    if metrics is not None:
        text = read_regular(metrics, TEXT_LIMIT, "metrics.csv").decode("utf-8", errors="replace")
        header = next(csv.reader(text.splitlines()[:1]), [])
    for column in header:
        if match := re.fullmatch(r"val_(pgd|cw)(\d*)_acc", column):
            return attack_label(match[1] + match[2]) if match[2] else match[1].upper()
    return "PGD"


def attack_label(name: str) -> str:
    """How a card names an attack (`pgd20` -> "PGD-20": `AttackName.label`); a name outside the grammar as it is."""
    return AttackName.parse(name).label if AttackName.is_valid(name) else name


def _training_facts(run: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, value) lines from run.json: versions, seed, which weights (an average?), the real example counts and
    the command."""
    facts = [("sglr_zoo version", run.get("sglr_zoo_version")), ("git commit", run.get("git_commit")),
             ("seed", run.get("seed")), ("weights", run.get("weights")),  # the trained ones, or their average
             ("machine", run.get("machine")), ("training time", _duration(run.get("train_seconds")))]
    facts += [(f"{key.removeprefix('num_examples_')} examples".replace("train ", "training ", 1), value)
              for key, value in run.items() if key.startswith("num_examples_")]
    facts.append(("catastrophic-overfitting guard", _guard_text(run.get("guard"))))
    facts.append(("command", public_text(run.get("command"))))
    return [(label, value) for label, value in facts if value is not None]


def _duration(seconds: float | None) -> str | None:
    """run.json's `train_seconds` in words: the epochs' training, monitoring and evaluation excluded."""
    if seconds is None:
        return None
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{f'{hours} h ' if hours else ''}{minutes} min (the epochs' training steps; monitoring and evaluation excluded)"


def _guard_text(guard: dict[str, Any] | None) -> str | None:
    """What the catastrophic-overfitting guard did (run.json's `guard`), or None for a run without it."""
    if not guard or not guard.get("enabled"):
        return None
    check = f"PGD-{guard['steps']}"
    text = f"on ({check} on {guard['n']} held-out images every {guard['every']} steps); "
    events = guard["events"]
    if not events:
        return text + "never acted"
    acted = "; ".join(f"at step {e['step']} ({check} accuracy {e['accuracy']:.1f}% < {guard['drop']:g} x the best "
                      f"{e['best']:.1f}%) " + (f"rolled back to step {e['restored_step']}" if e["restored_step"]
                                               is not None else "fell back (no check had passed since the resume)")
                      for e in events)
    return f"{text}{acted}; trained on with PGD-{events[-1]['fallback_steps']}"


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
        label = attack_label(attack)
        entries.append(EvalResult(metric_type="robust_accuracy", metric_name=f"{label} robust accuracy (%), {threat}",
                                  metric_value=value, metric_config=attack,
                                  metric_args=results.attacks.get(attack), **common))
    return entries
