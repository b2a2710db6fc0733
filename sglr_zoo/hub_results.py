"""Evaluation results in the Hub's `.eval_results/*.yaml` format (huggingface_hub's `EvalResultEntry`, 2026), which
the Hub shows on the model page and its leaderboards read. Exports write it beside the model card's model-index
metadata (the legacy format, kept for older readers): one entry per accuracy measured, clean and each attack."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from sglr_zoo.attack_names import AttackName
from sglr_zoo.files import write_atomic
from sglr_zoo.results import Results

EVAL_RESULTS_FOLDER = ".eval_results"  # huggingface_hub.constants.EVAL_RESULTS_FOLDER


def task_id(results: Results, attack: str) -> str:
    """The entry's task: `clean`, or the attack and threat, e.g. `autoattack-linf-8-255`."""
    if attack == "clean":
        return "clean"
    return "-".join([attack, results.threat, *re.findall(r"[0-9.]+", results.eps)])


def eval_result_entries(results: Results, dataset_id: str) -> list:
    """huggingface_hub `EvalResultEntry`s of `results` (accuracy in %), each with the split, the images, the attack's
    settings and the evaluator's version in its notes."""
    from huggingface_hub import EvalResultEntry

    provenance = results.provenance
    versions = ", ".join(f"{name} {version}" for name, version in results.versions.items() if version)
    where = (f"{results.n_examples} images of the {provenance.split or 'given'} split ({provenance.which}); "
             f"{results.threat} eps={results.eps}; evaluated in fp32, eval mode, by {versions}")
    entries = [EvalResultEntry(dataset_id=dataset_id, task_id="clean", value=results.clean_accuracy,
                               date=results.created, notes=f"clean accuracy (%), {where}")]
    for attack, accuracy in results.robust_accuracy.items():
        label = AttackName.parse(attack).label if AttackName.is_valid(attack) else attack
        settings = ", ".join(f"{key}={value}" for key, value in results.attacks.get(attack, {}).items())
        entries.append(EvalResultEntry(dataset_id=dataset_id, task_id=task_id(results, attack), value=accuracy,
                                       date=results.created,
                                       notes=f"{label} robust accuracy (%) ({settings}), {where}"))
    return entries


def write_eval_results(folder: Path, results: Results, dataset_id: str) -> Path:
    """Writes `folder/.eval_results/<dataset>.yaml` (atomically) and returns its path."""
    from huggingface_hub import eval_result_entries_to_yaml

    path = Path(folder) / EVAL_RESULTS_FOLDER / f"{dataset_id.split('/')[-1]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = eval_result_entries_to_yaml(eval_result_entries(results, dataset_id))
    write_atomic(path, yaml.safe_dump(data, sort_keys=False).encode())
    return path
