"""The evaluator's results: one typed object, its JSON file and how it reads back (no torch import).

Every number a model card, `sglr-zoo list` or a RobustBench entry shows comes from a `Results`, written by
`sglr_zoo.evaluate.evaluate` and read back with `Results.load`. The JSON file (schema "sglr_zoo.results/3";
accuracies are percentages over all n_examples):

    schema              "sglr_zoo.results/3"
    provenance          {"model", "dataset", "split", "source", "which", "command"}: what was evaluated, on which
                        data ("first n of the split in order") and by which command, as given; local paths are
                        stored relative to the working directory, or as their last component (`public_path`)
    arch                model.pretrained_cfg["architecture"], or null
    weights_sha256      sglr_zoo.models.weights_fingerprint of the evaluated weights: an export refuses results
                        whose fingerprint is not that of its weights
    threat, eps         "linf" | "l2"; eps as an exact fraction string ("8/255", "1/2")
    n_examples          how many examples
    clean_accuracy      percent
    robust_accuracy     {attack: percent}, e.g. {"pgd20": 45.1, "cw20": 44.0, "autoattack": 41.2}
    worst_case_accuracy percent correct under every attack run (per example), or null if none ran
    autoattack_per_attack  {sub-attack: {"robust_accuracy": percent after it (cumulative), "seconds": s}}
    attacks             {attack: settings}; AutoAttack's holds its version and every sub-attack's settings
    sanity              {check: {"passed": true | false | null (not run), "detail": str}} (sglr_zoo.sanity)
    seed, device        the seed of every attack; the device it ran on
    versions            {"python", "torch", "timm", "sglr_zoo", "pyautoattack", "git"}
    wall_time_s         seconds for the whole evaluation; attack_seconds: {"clean" | attack: seconds}
    created             UTC time, ISO 8601
    eps_sweep           optional (added within schema 3; older readers skip it): {"attack", "eps": [fractions],
                        "accuracy": [percent], "expected_robustness": percent}, see `EpsSweep`

Older schemas are read, never written: "sglr_zoo.results/2" had no weights_sha256 (read as null, which no check
can refuse), "sglr_zoo.results/1" also kept the six provenance keys at the top level.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sglr_zoo.errors import UserError
from sglr_zoo.files import TEXT_LIMIT, read_regular, write_atomic

SCHEMA = "sglr_zoo.results/3"
OLDER_SCHEMAS = ("sglr_zoo.results/2", "sglr_zoo.results/1")
THREATS = ("linf", "l2")


@dataclass(frozen=True)
class Provenance:
    """What was evaluated and how it was asked for; the evaluator only records it."""

    model: str | None = None  # the model id as given (zoo name, hf-hub:, local-dir:, a folder)
    dataset: str | None = None  # the dataset id as given
    split: str | None = None
    source: str | None = None  # where the data was read from
    which: str = "the given images, in order"  # which examples ("first n of the split in order")
    command: str | None = None  # the command line (CLI) or what the Python caller passed

    def public(self) -> Provenance:
        """The same with every local path in it made fit to publish (`public_text`)."""
        return Provenance(**{f.name: public_text(getattr(self, f.name)) for f in fields(self)})


@dataclass(frozen=True)
class SanityCheck:
    passed: bool | None  # None: not run
    detail: str


@dataclass(frozen=True)
class AttackStep:
    """One AutoAttack sub-attack: robust accuracy after it (cumulative) and its seconds."""

    robust_accuracy: float
    seconds: float


@dataclass(frozen=True)
class EpsSweep:
    """Accuracy under one attack at each radius (eps as exact fraction strings, ascending, "0" = clean), and the
    area under that curve divided by the largest radius: the mean accuracy over [0, eps max] ("expected
    robustness"), in percent."""

    attack: str
    eps: list[str]
    accuracy: list[float]
    expected_robustness: float


@dataclass(kw_only=True)
class Results:
    """Clean and robust accuracy of one model on one set of examples, with everything needed to trust them."""

    provenance: Provenance
    arch: str | None
    weights_sha256: str | None = None
    threat: str
    eps: str
    n_examples: int
    clean_accuracy: float
    robust_accuracy: dict[str, float] = field(default_factory=dict)
    worst_case_accuracy: float | None = None
    autoattack_per_attack: dict[str, AttackStep] = field(default_factory=dict)
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    sanity: dict[str, SanityCheck] = field(default_factory=dict)
    seed: int
    device: str
    versions: dict[str, str | None]
    wall_time_s: float
    attack_seconds: dict[str, float] = field(default_factory=dict)
    created: str
    eps_sweep: EpsSweep | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the current schema."""
        return {"schema": SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "results") -> Results:
        """Reads a JSON object of the current or an older schema; raises UserError naming `where` and the key."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object written by `sglr-zoo eval`")
        schema = data.get("schema")
        if schema not in (SCHEMA, *OLDER_SCHEMAS):
            raise UserError(f"{where}: schema {schema!r} is not {SCHEMA!r} (or an older {' or '.join(OLDER_SCHEMAS)})"
                            "; re-run `sglr-zoo eval`")
        if schema == "sglr_zoo.results/1":
            data = {**{k: v for k, v in data.items() if k not in _PROVENANCE_KEYS},
                    "provenance": {k: data[k] for k in _PROVENANCE_KEYS if k in data}}
        if schema in OLDER_SCHEMAS:
            data = {"weights_sha256": None, **data}
        read = _Reader(data, where)
        provenance = read.nested("provenance")
        return cls(
            provenance=Provenance(**{f.name: provenance.text(f.name, optional=True) for f in fields(Provenance)}),
            arch=read.text("arch", optional=True),
            weights_sha256=read.text("weights_sha256", optional=True),
            threat=read.choice("threat", THREATS),
            eps=read.text("eps"),
            n_examples=read.count("n_examples"),
            clean_accuracy=read.percent("clean_accuracy"),
            robust_accuracy=read.mapping("robust_accuracy", _Reader.percent),
            worst_case_accuracy=read.percent("worst_case_accuracy", optional=True),
            autoattack_per_attack={name: AttackStep(step.percent("robust_accuracy"), step.number("seconds"))
                                   for name, step in read.mapping("autoattack_per_attack", _Reader.nested).items()},
            attacks=read.mapping("attacks", _Reader.object),
            sanity={name: SanityCheck(check.flag("passed"), check.text("detail"))
                    for name, check in read.mapping("sanity", _Reader.nested).items()},
            seed=read.count("seed"),
            device=read.text("device"),
            versions=read.mapping("versions", lambda r, k: r.text(k, optional=True)),
            wall_time_s=read.number("wall_time_s"),
            attack_seconds=read.mapping("attack_seconds", _Reader.number),
            created=read.text("created"),
            eps_sweep=_read_eps_sweep(read, where),
        )

    def save(self, path: str | Path) -> Path:
        """Writes the JSON file atomically (parent folders are created), with no local path in it; returns its
        path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**self.to_dict(), "provenance": asdict(self.provenance.public())}
        write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Results:
        """Reads a results file; raises UserError naming the file and the problem if it is not one."""
        path = Path(path)
        try:
            data = json.loads(read_regular(path, TEXT_LIMIT, "results file"))  # a plain file of bounded size
        except (FileNotFoundError, NotADirectoryError):
            raise UserError(f"results file {path} not found; write one with `sglr-zoo eval MODEL --out {path}`"
                            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(data, where=str(path))

    def summary(self) -> str:
        """A short human-readable summary: accuracies, seconds and the sanity checks."""
        p = self.provenance
        data = f"{p.dataset} [{p.split}]" if p.dataset else "the given images"
        lines = [f"{p.model or 'model'} on {data}, n={self.n_examples}, {self.threat} eps={self.eps}",
                 f"  {'clean':<12}{self.clean_accuracy:7.2f}%"]
        for name, accuracy in self.robust_accuracy.items():
            lines.append(f"  {name:<12}{accuracy:7.2f}%  ({self.attack_seconds.get(name, 0):.1f} s)")
        for name, step in self.autoattack_per_attack.items():
            lines.append(f"    after {name:<8}{step.robust_accuracy:7.2f}%  ({step.seconds:.1f} s)")
        lines.append("sanity checks:")
        for name, check in self.sanity.items():
            status = {True: "PASS", False: "FAIL", None: "not run"}[check.passed]
            lines.append(f"  {status:<8}{name}: {check.detail}")
        return "\n".join(lines)

    def __getitem__(self, key: str) -> Any:
        """Deprecated: the results used to be a dict; read the attributes (`results.clean_accuracy`) instead."""
        warnings.warn("results[key] is deprecated: evaluate() returns a sglr_zoo.results.Results; use its "
                      f"attributes (results.{key}) or results.to_dict()", DeprecationWarning, stacklevel=2)
        data = self.to_dict()
        return data[key] if key in data else data["provenance"][key]


_PROVENANCE_KEYS = tuple(f.name for f in fields(Provenance))


def _read_eps_sweep(read: _Reader, where: str) -> EpsSweep | None:
    """The optional eps sweep (a later addition to schema 3: older files have none, older readers skip it)."""
    if read.data.get("eps_sweep") is None:
        return None
    sweep = read.nested("eps_sweep")
    eps = sweep.value("eps", lambda v: isinstance(v, list) and all(isinstance(e, str) for e in v),
                      "a list of fractions", False)
    accuracy = sweep.value("accuracy", lambda v: isinstance(v, list) and all(_is_number(a) and 0 <= a <= 100
                                                                             for a in v),
                           "a list of percentages", False)
    if len(eps) != len(accuracy):
        raise UserError(f"{where}: eps_sweep has {len(eps)} radii and {len(accuracy)} accuracies")
    return EpsSweep(sweep.text("attack"), eps, [float(a) for a in accuracy], sweep.percent("expected_robustness"))


def percent(count: int, total: int) -> float:
    """An accuracy as results state it: percent of all examples."""
    return 100.0 * count / total


def public_path(path: str) -> str:
    """How a local path appears in anything published (results, cards): relative to the working directory when
    inside it, else only its last component; Hub ids, names and relative paths that stay inside are kept."""
    if path.startswith("local-dir:"):
        return "local-dir:" + public_path(path.removeprefix("local-dir:"))
    local = Path(path).expanduser()
    if not local.is_absolute() and ".." not in local.parts:
        return path  # a Hub id, a zoo name or a path below the working directory, as the user typed it
    try:
        return str(local.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return local.resolve().name or path


def public_text(text: str | None) -> str | None:
    """`text` (a command line, an id, a description) with every word that is a local path made `public_path`,
    including the value of a `key=value` word; the other words are kept as they are."""
    return None if text is None else re.sub(r"\S+", lambda match: _public_word(match.group()), text)


def public_paths(value: Any) -> Any:
    """`public_text` applied to every string in a JSON-like tree (a recipe, a run record)."""
    if isinstance(value, dict):
        return {key: public_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [public_paths(item) for item in value]
    return public_text(value) if isinstance(value, str) else value


def _public_word(word: str) -> str:
    key, sep, value = word.partition("=")
    if sep and _looks_local(value):
        return f"{key}={public_path(value)}"
    return public_path(word) if _looks_local(word) else word


def _looks_local(word: str) -> bool:
    """An absolute path, a home path, or one that climbs out of the working directory (`../x`, `local-dir:/x`)."""
    word = word.removeprefix("local-dir:")
    return word.startswith(("/", "~", "..")) or word[1:3] in (":\\", ":/") or f"/..{os.sep}" in f"/{word}/"


class _Reader:
    """Typed reads from one JSON object; every error names the file and the key."""

    def __init__(self, data: dict[str, Any], where: str):
        self.data, self.where = data, where

    def value(self, key: str, check, expected: str, optional: bool) -> Any:
        if key not in self.data:
            raise UserError(f"{self.where}: missing key {key!r}; re-run `sglr-zoo eval`")
        value = self.data[key]
        if value is None and optional:
            return None
        if not check(value):
            expected += " or null" if optional else ""
            raise UserError(f"{self.where}: key {key!r} must be {expected}, got {json.dumps(value)[:80]}")
        return value

    def text(self, key: str, optional: bool = False) -> str | None:
        return self.value(key, lambda v: isinstance(v, str), "a string", optional)

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        return self.value(key, lambda v: v in choices, " or ".join(map(repr, choices)), False)

    def flag(self, key: str) -> bool | None:
        return self.value(key, lambda v: isinstance(v, bool), "true or false", True)

    def number(self, key: str, optional: bool = False) -> float | None:
        value = self.value(key, _is_number, "a finite number", optional)
        return None if value is None else float(value)

    def count(self, key: str) -> int:
        return int(self.value(key, lambda v: _is_number(v) and v == int(v) and v >= 0, "a whole number >= 0", False))

    def percent(self, key: str, optional: bool = False) -> float | None:
        value = self.value(key, lambda v: _is_number(v) and 0 <= v <= 100, "a percentage in [0, 100]", optional)
        return None if value is None else float(value)

    def object(self, key: str) -> dict[str, Any]:
        return self.value(key, lambda v: isinstance(v, dict), "a JSON object", False)

    def nested(self, key: str) -> _Reader:
        return _Reader(self.object(key), f"{self.where}: {key}")

    def mapping(self, key: str, read) -> dict[str, Any]:
        """An object whose every value is read with `read(reader, name)`."""
        inner = _Reader(self.object(key), f"{self.where}: {key}")
        return {name: read(inner, name) for name in inner.data}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
