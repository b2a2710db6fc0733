"""Zoo bundles: an evaluated run written as a zoo entry's folder under sglr_zoo/bundled/ (its layout:
sglr_zoo/zoo.py), the lines its table entry needs, and the upload of the bundles as they are (`push_zoo`)."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from sglr_zoo.cards import render_card
from sglr_zoo.errors import UserError
from sglr_zoo.export import listing, weights_bytes, write_folder
from sglr_zoo.models import sha256_of, weights_fingerprint
from sglr_zoo.push import Upload, check_target, upload_folder
from sglr_zoo.results import Results
from sglr_zoo.rundir import ModelFolder
from sglr_zoo.source import check_same_weights, collect
from sglr_zoo.zoo import CHECK_RESULTS, ZOO, bundle_folder

__all__ = ["CHECK_ATTACKS", "MAX_BUNDLE_MB", "Bundle", "bundle", "load_check_results", "published_entry", "push_zoo"]

MAX_BUNDLE_MB = 24  # weights committed to the repository: the CPU-scale entries take about 1 MiB, the
# PreActResNet-18 trained on an H100 21.3 MiB in float16; larger models (WRN-34-10) go to the Hub only
CHECK_ATTACKS = ("clean", "pgd20")  # what a bundle's check_results.json must hold (tests/test_zoo.py re-measures it)


class Bundle(NamedTuple):
    """What `bundle` wrote: a zoo entry's folder and the sha256s its table entry must pin."""

    name: str
    folder: Path
    files: list[tuple[str, int]]  # path in the folder, size in bytes
    sha256: str  # of model.safetensors
    config_sha256: str  # of config.json

    def table_entry(self) -> str:
        """The fields of the zoo table's entry (sglr_zoo/zoo.py) that name this bundle and pin its files."""
        return (f"zoo table (sglr_zoo/zoo.py), entry {self.name}: bundle={self.folder.name!r}, sha256={self.sha256!r}, "
                f"config_sha256={self.config_sha256!r}")


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
    check = load_check_results(check_results, source.results)
    check_same_weights(check, source, str(check_results))
    weights = weights_bytes(source.folder.weights, half)
    if half:
        _check_measured_on_half(weights, {"the results": source.results, str(check_results): check}, evaluated)
    if len(weights) > MAX_BUNDLE_MB * 2**20:
        raise UserError(f"{source.folder.weights}: {len(weights) / 2**20:.1f} MiB of weights is over the "
                        f"{MAX_BUNDLE_MB} MiB a bundled entry may commit" + ("; pass --fp16 to halve it" if not half
                                                                             else "; publish it on the Hub only"))
    target = out or replace(entry, bundle=entry.bundle or name).folder
    folder = write_folder(source, target, weights, repo_id=entry.repo_id, name=name)
    check.save(folder / CHECK_RESULTS)
    written = ModelFolder(folder)
    return Bundle(name, folder, listing(folder), sha256_of(written.weights), sha256_of(written.config))


def _check_measured_on_half(weights: bytes, measured: dict[str, Results], evaluated: Path) -> None:
    """Refuses results measured on other weights than the float16 ones a bundle stores: its card's numbers are the
    stored weights'."""
    from safetensors.torch import load

    fingerprint = weights_fingerprint(load(weights))
    for what, results in measured.items():
        if results.weights_sha256 not in (None, fingerprint):
            raise UserError(f"{what} were measured on other weights than the float16 ones the bundle would store; "
                            f"export them first (`sglr-zoo export {evaluated} --fp16 --out FOLDER`), evaluate FOLDER "
                            "(`sglr-zoo eval FOLDER ... --out FOLDER/results.json`, and the check results), then "
                            "bundle FOLDER")


def load_check_results(path: str | Path | None, results: Results) -> Results:
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
        check_target(repo_id, revision, create_pr)
        with tempfile.TemporaryDirectory(prefix="sglr_zoo_push_") as tmp:
            if repo_id != entry.repo_id:
                folder = Path(shutil.copytree(folder, Path(tmp) / entry.name))
                render_card(collect(folder), repo_id=repo_id, name=entry.name).save(folder / "README.md")
            upload = upload_folder(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                             dry_run=dry_run, commit_message=f"Upload zoo entry {entry.name}", announce=announce)
        uploads.append((entry.name, repo_id, upload))
    return uploads


def published_entry(name: str, repo_id: str, upload: Upload) -> str:
    """The fields of zoo entry `name` that make `sglr_zoo.load(name)` prefer the Hub copy `push_zoo` uploaded."""
    moved = f", repo_id={repo_id!r}" if repo_id != ZOO[name].repo_id else ""
    return f"{name}: published=True, revision={upload.commit!r}{moved}"
