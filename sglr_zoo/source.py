"""Reading a checkpoint back: the weights, recipe, run record and results of a run directory or model folder.

`collect` gathers them into a `ModelSource`, which the model card (`sglr_zoo.cards`), an export
(`sglr_zoo.export`), a zoo bundle (`sglr_zoo.bundle`) and a push (`sglr_zoo.push`) all read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from sglr_zoo.errors import UserError
from sglr_zoo.files import TEXT_LIMIT, read_regular
from sglr_zoo.models import check_model_folder, weights_fingerprint
from sglr_zoo.outcomes import Outcomes
from sglr_zoo.recipe import Recipe, format_fraction, load_recipe
from sglr_zoo.results import Results
from sglr_zoo.rundir import EXPORTS, ModelFolder, RunDir

__all__ = ["ModelSource", "check_same_weights", "collect", "read_json"]


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
    outcomes: Outcomes | None = None  # which images each attack of `results` left correct, when kept beside them

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
        source.run_info = read_json(run_info)
    results_path = Path(results) if isinstance(results, (str, Path)) else None
    if isinstance(results, Results):
        source.results = results
    elif isinstance(results, dict):
        source.results = Results.from_dict(results)
    elif results_path is not None:
        source.results = Results.load(results_path)
    elif folder.results.is_file():
        source.results, results_path = Results.load(folder.results), folder.results
    if source.results and source.results.arch not in (None, source.arch):
        raise UserError(f"results are for {source.results.arch!r} but the weights in {folder.root} are "
                        f"{source.arch!r}: pass the matching results file with --results")
    if source.results:
        check_same_weights(source.results, source, "the results")
        if results_path is not None and (beside := Outcomes.beside(results_path)).is_file():
            source.outcomes = _outcomes_of(source.results, beside)
    return source


def _outcomes_of(results: Results, path: Path) -> Outcomes:
    """The outcomes file beside `results`, refused unless it is of the same evaluation: weights, images and
    attacks."""
    outcomes = Outcomes.load(path)
    accuracies = {"clean": results.clean_accuracy, **results.robust_accuracy}
    same = (outcomes.n_examples == results.n_examples and outcomes.weights_sha256 in (None, results.weights_sha256)
            and all(attack in outcomes.correct and math.isclose(outcomes.accuracy(attack), accuracy, abs_tol=1e-6)
                    for attack, accuracy in accuracies.items()))
    if not same:
        raise UserError(f"{path}: not the per-example outcomes of the results beside it (its examples, weights, "
                        "attacks or accuracies differ); evaluate again with `sglr-zoo eval ... --out`, which writes "
                        "both")
    return outcomes


def check_same_weights(results: Results, source: ModelSource, what: str) -> None:
    """Refuses results that record a weights fingerprint other than that of the source's weights."""
    if results.weights_sha256 not in (None, source.weights_sha256):
        raise UserError(f"{what} are for other weights than {source.folder.weights} (weights_sha256 differs): pass "
                        f"the results of these weights, or evaluate them: `sglr-zoo eval {source.folder.root}`")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_regular(path, TEXT_LIMIT, path.name).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        detail = "nested too deeply" if isinstance(error, RecursionError) else error
        raise UserError(f"{path}: not valid JSON ({detail})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data
