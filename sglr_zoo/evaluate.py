"""Robustness evaluation: clean accuracy, our quick PGD/CW and the reference AutoAttack, with sanity checks.

Every number a model card shows comes from the one results object written here (`save_results`). Its keys
(schema "sglr_zoo.results/1"; accuracies are percentages over all n examples):

    schema              "sglr_zoo.results/1"
    model               the model id as given (path, local-dir:, hf-hub:, zoo name)
    arch                model.pretrained_cfg["architecture"], or null
    dataset, split      the dataset id and split as given; source: where the data was read from
    threat, eps         "linf" | "l2"; eps as an exact fraction string ("8/255", "1/2")
    n_examples, which   how many examples and which ones ("first n of the split in order")
    clean_accuracy      percent
    robust_accuracy     {attack: percent}, e.g. {"pgd20": 45.1, "cw20": 44.0, "autoattack": 41.2}
    worst_case_accuracy percent correct under every attack run (per example), or null if none ran
    autoattack_per_attack  {sub-attack: {"robust_accuracy": percent after it (cumulative), "seconds": s}}
    attacks             {attack: settings}; AutoAttack's holds its version and every sub-attack's settings
    sanity              {check: {"passed": true | false | null (not run), "detail": str}} for the checks
                        eval_mode (eval mode, two forward passes agree), input_gradients (not zero for most
                        examples), autoattack_le_pgd, large_eps (pgd20 at 64/255 or L2 8 on <= 100 examples
                        must reach <= 5%), square_vs_white_box (Square adds <= 0.2 points after the white-box ones)
    seed, device        the seed of every attack; the device it ran on
    versions            {"python", "torch", "timm", "sglr_zoo", "pyautoattack", "git"}
    wall_time_s         seconds for the whole evaluation; attack_seconds: {"clean" | attack: seconds}
    command             the command line (CLI) or the `command=` given to the Python API
    created             UTC time, ISO 8601

Attacks run in fp32 (TF32 and autocast off) with the model in eval mode, each on the points it can still
break: our PGD/CW on the clean-correct points, AutoAttack's sub-attacks on the points that survived the
previous ones. AutoAttack is pyautoattack (Croce & Hein's code); we drive its sub-attacks batch by batch
(the batching its own loop uses) so that per-attack numbers are kept and a killed run resumes from a state
file: pyautoattack 0.2.0's own `state_path` cannot be read back (it stores the attack set as a string and
its resume branch uses an unset variable).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from fractions import Fraction
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sglr_zoo.attacks import Threat, model_mode, pgd
from sglr_zoo.errors import UserError
from sglr_zoo.recipe import parse_fraction

SCHEMA = "sglr_zoo.results/1"
STATE_SCHEMA = "sglr_zoo.autoattack_state/1"
REQUIRED_KEYS = ("schema", "model", "arch", "dataset", "split", "source", "threat", "eps", "n_examples", "which",
                 "clean_accuracy", "robust_accuracy", "worst_case_accuracy", "autoattack_per_attack", "attacks",
                 "sanity", "seed", "device", "versions", "wall_time_s", "attack_seconds", "command", "created")
DEFAULT_ATTACKS = ("clean", "pgd20", "cw20", "autoattack")
DEFAULT_EPS = {"linf": Fraction(8, 255), "l2": Fraction(1, 2)}
LARGE_EPS = {"linf": Fraction(64, 255), "l2": Fraction(8)}  # robust accuracy must fall to near 0 here
AUTOATTACK_NAMES = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
NEAR_ZERO = 5.0  # percent: the large-eps sanity bound
SQUARE_TOLERANCE = 0.2  # percentage points Square may add after the white-box attacks (AutoAttack's check_square_sr)


def make_autoattack(
    model: nn.Module,
    *,
    threat: Threat,
    eps: float,
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Any:
    """The reference AutoAttack object: `standard` or `rand` versions, or `custom` with a list of sub-attacks."""
    from pyautoattack import AutoAttack

    if version not in ("standard", "rand", "custom"):
        raise UserError(f"AutoAttack version {version!r}: choose standard, rand or custom")
    if (version == "custom") != bool(attacks):
        raise UserError("AutoAttack: give a list of sub-attacks (--autoattack-attacks) exactly when the version "
                        f"is custom (got version {version!r}, attacks {list(attacks or [])})")
    unknown = sorted(set(attacks or []) - set(AUTOATTACK_NAMES))
    if unknown:
        raise UserError(f"AutoAttack: unknown sub-attack {unknown[0]!r}; choose from {', '.join(AUTOATTACK_NAMES)}")
    aa = AutoAttack(model, attacks=list(attacks) if attacks else None, device=str(device), eps=eps,
                    norm={"linf": "Linf", "l2": "L2"}[threat], seed=seed, version=version)
    aa.verbose = False  # its log counts per call, i.e. per batch here; our progress bars count the whole run
    return aa


def autoattack_settings(aa: Any) -> dict[str, Any]:
    """Version, sub-attacks and each sub-attack's settings, read off the AutoAttack object."""
    subs = {}
    for name in aa.attacks_to_run:
        if name in ("apgd-ce", "apgd-dlr"):
            subs[name] = {"n_iter": aa.apgd.n_iter, "n_restarts": aa.apgd.n_restarts, "eot_iter": aa.apgd.eot_iter}
        elif name == "apgd-t":
            a = aa.apgd_targeted
            subs[name] = {"n_iter": a.n_iter, "n_restarts": a.n_restarts, "n_target_classes": a.n_target_classes}
        elif name in ("fab", "fab-t"):
            subs[name] = {"n_iter": aa.fab.n_iter, "n_restarts": 1 if name == "fab-t" else aa.fab.n_restarts}
            if name == "fab-t":
                subs[name]["n_target_classes"] = aa.fab.n_target_classes
        else:
            subs[name] = {"n_queries": aa.square.n_queries, "p_init": aa.square.p_init,
                          "n_restarts": aa.square.n_restarts}
    return {"implementation": f"pyautoattack {package_version('pyautoattack')}", "version": aa.version,
            "norm": aa.norm, "seed": aa.seed, "sub_attacks": subs, "precision": "fp32"}


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    threat: Threat = "linf",
    eps: Fraction | str | float | None = None,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    batch_size: int = 256,
    seed: int = 0,
    num_classes: int | None = None,
    autoattack_version: str = "standard",
    autoattack_attacks: Sequence[str] | None = None,
    state_path: str | Path | None = None,
    device: str | torch.device | None = None,
    bf16_quick: bool = False,
    progress: bool = False,
    model_name: str | None = None,
    dataset: str | None = None,
    split: str | None = None,
    source: str | None = None,
    which: str = "the given images, in order",
    command: str | None = None,
) -> dict[str, Any]:
    """Clean and robust accuracy of `model` on float images in [0, 1], plus sanity checks: the results object.

    Args:
        attacks: any of "clean" (always measured), "pgd<steps>", "cw<steps>" (ours: step eps/4, random start)
            and "autoattack".
        eps: an exact fraction like "8/255"; defaults to 8/255 (linf) or 1/2 (l2).
        num_classes: the dataset's number of classes; the model's output must match it.
        state_path: AutoAttack's progress is saved here after every batch; a rerun with the same file resumes.
        device: defaults to the model's device. The model is moved there and put in eval mode for the
            evaluation (its train/eval modes are restored afterwards).
        bf16_quick: bf16 autocast for our PGD/CW steps only (verdicts and AutoAttack stay fp32).
        model_name, dataset, split, source, which, command: recorded in the results as given.
    """
    started = time.time()
    if threat not in DEFAULT_EPS:
        raise UserError(f"threat {threat!r}: choose linf or l2")
    eps = _parse_eps(eps if eps is not None else DEFAULT_EPS[threat])
    quick = _parse_attacks(attacks)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    _check_inputs(model, images, labels)
    images, labels = images.cpu(), labels.cpu()
    model.to(device)
    aa = None
    if "autoattack" in attacks:  # built first: bad options fail before any work
        aa = make_autoattack(model, threat=threat, eps=float(eps), version=autoattack_version,
                             attacks=autoattack_attacks, seed=seed, device=device)
    n = len(labels)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    results: dict[str, Any] = {
        "schema": SCHEMA, "model": model_name, "arch": arch,
        "dataset": dataset, "split": split, "source": source, "threat": threat, "eps": _fraction_str(eps),
        "n_examples": n, "which": which, "clean_accuracy": None, "robust_accuracy": {}, "worst_case_accuracy": None,
        "autoattack_per_attack": {}, "attacks": {}, "sanity": {}, "seed": seed, "device": str(device),
        "versions": _versions(), "wall_time_s": None, "attack_seconds": {}, "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    sanity = results["sanity"]
    with model_mode(model, "eval"), _fp32(device):
        if any(module.training for module in model.modules()):
            raise UserError("the model stays in train mode after model.eval() (a module overrides train()); "
                            "evaluation would use batch statistics")
        sanity["eval_mode"] = _check_eval_mode(model, images[:batch_size].to(device), num_classes, labels)

        clock = time.time()
        correct = _predict(model, images, batch_size, device) == labels
        results["clean_accuracy"] = _percent(correct)
        results["attack_seconds"]["clean"] = time.time() - clock
        robust_flags = {}
        for name, (loss, steps) in quick.items():
            clock = time.time()
            torch.manual_seed(seed)
            robust_flags[name] = correct if eps == 0 else _quick_attack(
                model, images, labels, correct, loss=loss, steps=steps, threat=threat, eps=eps, batch_size=batch_size,
                device=device, bf16=bf16_quick, progress=progress, desc=name)
            results["attacks"][name] = {
                "implementation": "sglr_zoo.attacks.pgd", "loss": loss, "steps": steps,
                "step_size": _fraction_str(eps / 4), "random_start": True, "restarts": 1,
                "precision": "bf16 autocast (verdict fp32)" if bf16_quick else "fp32"}
            results["attack_seconds"][name] = time.time() - clock
        if aa is not None:
            clock = time.time()
            results["attacks"]["autoattack"] = autoattack_settings(aa)
            if eps == 0:
                robust_flags["autoattack"] = correct
            else:
                key = {"threat": threat, "eps": _fraction_str(eps), **autoattack_settings(aa),
                       "data_sha256": _fingerprint([images, labels]),
                       "model_sha256": _fingerprint(model.state_dict().values())}
                robust_flags["autoattack"], results["autoattack_per_attack"] = _run_autoattack(
                    aa, images, labels, correct, batch_size=batch_size, state_path=state_path, key=key,
                    progress=progress)
            results["attack_seconds"]["autoattack"] = time.time() - clock

        results["robust_accuracy"] = {name: _percent(flags) for name, flags in robust_flags.items()}
        if robust_flags:
            results["worst_case_accuracy"] = _percent(torch.stack(list(robust_flags.values())).all(0))
        sanity["input_gradients"] = _check_gradients(model, images[:100].to(device), labels[:100].to(device))
        sanity["autoattack_le_pgd"] = _check_autoattack_le_pgd(results["robust_accuracy"])
        sanity["large_eps"] = _check_large_eps(model, images[:100], labels[:100], threat=threat, seed=seed,
                                               batch_size=batch_size, device=device, progress=progress)
        sanity["square_vs_white_box"] = _check_square(results["autoattack_per_attack"])
    results["wall_time_s"] = time.time() - started
    return results


def attack_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, attack: str,
                   threat: Threat = "linf", eps: Fraction | str | float | None = None, batch_size: int = 256,
                   device: str | torch.device | None = None, seed: int | None = None) -> torch.Tensor:
    """Per example, True where the model classifies the image correctly and still does under `attack`.

    The evaluator's own measurement, for callers such as the trainer's per-epoch monitoring: "clean", or our
    "pgd<steps>" / "cw<steps>" (step eps/4, random start) run in fp32 with the model in eval mode on the
    clean-correct points only. `seed` seeds the random start (None keeps the global generator's state).
    """
    eps = _parse_eps(eps if eps is not None else DEFAULT_EPS[threat])
    quick = _parse_attacks([attack])
    device = torch.device(device) if device is not None else next(model.parameters()).device
    images, labels = images.cpu(), labels.cpu()
    with model_mode(model, "eval"), _fp32(device):
        correct = _predict(model, images, batch_size, device) == labels
        if attack == "clean" or eps == 0:
            return correct
        if seed is not None:
            torch.manual_seed(seed)
        loss, steps = quick[attack]
        return _quick_attack(model, images, labels, correct, loss=loss, steps=steps, threat=threat, eps=eps,
                             batch_size=batch_size, device=device, bf16=False, progress=False, desc=attack)


def evaluate_model(
    model_id: str,
    *,
    dataset: str = "uoft-cs/cifar10",
    split: str = "test",
    n: int = 1000,
    device: str | torch.device | None = None,
    weights: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Loads a model (`sglr_zoo.zoo.load`) and the first n examples of a split, in order, and runs `evaluate`.

    With `weights` (a .safetensors file), `model_id` is a timm architecture name.

    options: the keyword arguments of `evaluate` (threat, eps, attacks, seed, state_path, command, ...).
    """
    from sglr_zoo import zoo
    from sglr_zoo.data import load_splits, to_float
    from sglr_zoo.recipe import DataConfig

    if n < 1:
        raise UserError(f"--n {n}: evaluate at least one example")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    splits = load_splits(DataConfig(dataset=dataset, test_split=split, n_test=n, n_train=1))
    model = zoo.load(model_id, weights=weights, num_classes=splits.num_classes, device=device)
    image_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 32, 32))[-1]
    images = to_float(splits.test.images, image_size)
    return evaluate(model, images, splits.test.labels, num_classes=splits.num_classes, device=device,
                    model_name=f"{model_id} + {weights}" if weights else model_id, dataset=dataset, split=split, source=splits.source,
                    which=f"first {len(splits.test)} of the split in order", **options)


def save_results(results: dict[str, Any], path: str | Path) -> Path:
    """Writes the results object as JSON (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Reads a results object; raises UserError naming the file and the problem if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file {path} not found; write one with `sglr-zoo eval MODEL --out {path}`")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(results, dict):
        raise UserError(f"{path}: expected a JSON object written by `sglr-zoo eval`")
    if results.get("schema", SCHEMA) != SCHEMA:
        raise UserError(f"{path}: schema {results['schema']!r} is not {SCHEMA!r}; re-run `sglr-zoo eval`")
    missing = [key for key in REQUIRED_KEYS if key not in results]
    if missing:
        raise UserError(f"{path}: not a {SCHEMA} results file: missing key {missing[0]!r}")
    return results


def format_results(results: dict[str, Any]) -> str:
    """A short human-readable summary: accuracies, seconds and the sanity checks."""
    seconds = results["attack_seconds"]
    data = f"{results['dataset']} [{results['split']}]" if results["dataset"] else "the given images"
    lines = [f"{results['model'] or 'model'} on {data}, n={results['n_examples']}, "
             f"{results['threat']} eps={results['eps']}",
             f"  {'clean':<12}{results['clean_accuracy']:7.2f}%"]
    for name, accuracy in results["robust_accuracy"].items():
        lines.append(f"  {name:<12}{accuracy:7.2f}%  ({seconds.get(name, 0):.1f} s)")
    for name, step in results["autoattack_per_attack"].items():
        lines.append(f"    after {name:<8}{step['robust_accuracy']:7.2f}%  ({step['seconds']:.1f} s)")
    lines.append("sanity checks:")
    for name, check in results["sanity"].items():
        status = {True: "PASS", False: "FAIL", None: "not run"}[check["passed"]]
        lines.append(f"  {status:<8}{name}: {check['detail']}")
    return "\n".join(lines)


def _parse_eps(eps: Fraction | str | float) -> Fraction:
    try:
        value = parse_fraction(eps)
    except ValueError as error:
        raise UserError(f"eps: {error}") from None
    if value < 0:
        raise UserError(f"eps: must be >= 0, got {eps}")
    return value


def _parse_attacks(attacks: Sequence[str]) -> dict[str, tuple[str, int]]:
    """Checks attack names; returns our quick attacks as {name: (loss, steps)}."""
    quick = {}
    for name in attacks:
        match = re.fullmatch(r"(pgd|cw)(\d+)", name)
        if match and int(match[2]) >= 1:
            quick[name] = ("ce" if match[1] == "pgd" else "cw", int(match[2]))
        elif name not in ("clean", "autoattack"):
            raise UserError(f"unknown attack {name!r}; choose from clean, pgd<steps> (e.g. pgd20), cw<steps> "
                            "(e.g. cw20), autoattack")
    return quick


def _check_inputs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Images are float in [0, 1], labels match them, and the model takes [0, 1] images in fp32."""
    from sglr_zoo.models import Normalized, is_sglr_arch

    if not images.is_floating_point() or images.dim() != 4:
        raise UserError(f"images must be float (N, C, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}; "
                        "convert uint8 images with sglr_zoo.data.to_float")
    if len(images) == 0 or len(images) != len(labels):
        raise UserError(f"got {len(images)} images and {len(labels)} labels; need the same, non-zero number")
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise UserError(f"images range over [{low:.3g}, {high:.3g}]; models here take [0, 1] images and normalise "
                        "inside, so pass unnormalised images")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", (0.0,) * 3)), tuple(cfg.get("std", (1.0,) * 3))
    if not isinstance(model, Normalized) and not is_sglr_arch(cfg.get("architecture", "")) \
            and (any(mean) or any(s != 1 for s in std)):
        raise UserError(f"the model expects normalised inputs (pretrained_cfg mean={mean}, std={std}); wrap it as "
                        "sglr_zoo.models.Normalized(model, mean, std) so that it takes [0, 1] images")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise UserError(f"the model's weights are {sorted(map(str, dtypes))}; evaluation runs in fp32: "
                        "call model.float()")


@contextlib.contextmanager
def _fp32(device: torch.device) -> Iterator[None]:
    """Full fp32: no autocast, no TF32 matmuls or convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(batch.to(device)).argmax(1).cpu() for batch in images.split(batch_size)])


def _quick_attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor, *,
                  loss: str, steps: int, threat: Threat, eps: Fraction, batch_size: int, device: torch.device,
                  bf16: bool, progress: bool, desc: str) -> torch.Tensor:
    """Our PGD (step eps/4, random start) on the candidate points only; True where the model stays correct."""
    robust = torch.zeros_like(candidates)
    for index in tqdm(_batches(candidates, batch_size), desc=desc, disable=not progress):
        x, y = images[index].to(device), labels[index].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x_adv = pgd(model, x, y, threat=threat, eps=float(eps), step_size=float(eps / 4), steps=steps,
                        random_start=True, loss=loss)
        with torch.no_grad():
            robust[index] = (model(x_adv).argmax(1) == y).cpu()
    return robust


def _run_autoattack(aa: Any, images: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor, *, batch_size: int,
                    state_path: str | Path | None, key: dict[str, Any], progress: bool
                    ) -> tuple[torch.Tensor, dict[str, dict[str, float]]]:
    """AutoAttack's loop (each sub-attack on the points still robust, in batches), saving state after each batch."""
    n = len(labels)
    state = {"schema": STATE_SCHEMA, "key": key, "robust": correct.tolist(), "attacked": {}, "seconds": {},
             "per_attack": {}}
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("schema") != STATE_SCHEMA or saved.get("key") != key:
            raise UserError(f"state file {path} belongs to a different evaluation (model, data, eps or AutoAttack "
                            "settings differ); delete it or pass another --state-path")
        state = saved
    robust = torch.tensor(state["robust"], dtype=torch.bool)
    sub_attacks = list(aa.attacks_to_run)
    try:
        for name in sub_attacks:
            attacked = torch.tensor(state["attacked"].get(name, [False] * n), dtype=torch.bool)
            aa.attacks_to_run = [name]
            for index in tqdm(_batches(robust & ~attacked, batch_size), desc=f"autoattack {name}",
                              disable=not progress):
                clock = time.time()
                _, predicted = aa.run_standard_evaluation(images[index], labels[index], batch_size=len(index))
                robust[index] = predicted.cpu() == labels[index]
                attacked[index] = True
                state["robust"], state["attacked"][name] = robust.tolist(), attacked.tolist()
                state["seconds"][name] = state["seconds"].get(name, 0.0) + time.time() - clock
                _write_state(path, state)
            state["per_attack"][name] = {"robust_accuracy": _percent(robust),
                                         "seconds": state["seconds"].get(name, 0.0)}
            _write_state(path, state)
    finally:
        aa.attacks_to_run = sub_attacks
    return robust, state["per_attack"]


def _write_state(path: Path | None, state: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)  # atomic: a kill never leaves half a file


def _check_eval_mode(model: nn.Module, x: torch.Tensor, num_classes: int | None,
                     labels: torch.Tensor) -> dict[str, Any]:
    """Checks the output shape (a UserError if wrong) and that two forward passes agree."""
    with torch.no_grad():
        first, second = model(x), model(x)
    classes = num_classes or int(labels.max()) + 1
    if first.dim() != 2 or (first.shape[1] != classes if num_classes else first.shape[1] < classes):
        got = f"{first.shape[1]} logits" if first.dim() == 2 else f"logits of shape {tuple(first.shape[1:])}"
        raise UserError(f"the model outputs {got} per image but the data has {classes} "
                        "classes; evaluate a model trained on this dataset (or pick the matching --dataset)")
    difference = (first - second).abs().max().item()
    same = torch.allclose(first, second, rtol=1e-5, atol=1e-5)
    return {"passed": same, "detail": f"eval mode; two forward passes differ by at most {difference:.2g}"
            + ("" if same else ": a randomized model; use --autoattack-version rand")}


def _check_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Flags gradient masking: the cross-entropy's input gradient is exactly zero for most examples."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x).float(), y, reduction="sum"), [x])
    zero = int((grad.flatten(1).abs().sum(1) == 0).sum())
    passed = zero <= len(x) / 2
    return {"passed": passed, "detail": f"{zero} of {len(x)} examples have an all-zero input gradient"
            + ("" if passed else ": gradient masking, white-box attack numbers are unreliable")}


def _check_autoattack_le_pgd(robust: dict[str, float]) -> dict[str, Any]:
    pgd_name = next((name for name in robust if name.startswith("pgd")), None)
    if "autoattack" not in robust or pgd_name is None:
        return {"passed": None, "detail": "not run: needs both autoattack and a pgd attack"}
    passed = robust["autoattack"] <= robust[pgd_name]
    return {"passed": passed, "detail": f"autoattack {robust['autoattack']:.2f}% vs {pgd_name} {robust[pgd_name]:.2f}%"}


def _check_large_eps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, threat: Threat, seed: int,
                     batch_size: int, device: torch.device, progress: bool) -> dict[str, Any]:
    """PGD-20 at a huge eps must break nearly everything, else the attack or the model is broken."""
    eps = LARGE_EPS[threat]
    torch.manual_seed(seed)
    correct = _predict(model, images, batch_size, device) == labels
    robust = _quick_attack(model, images, labels, correct, loss="ce", steps=20, threat=threat, eps=eps,
                           batch_size=batch_size, device=device, bf16=False, progress=progress, desc="sanity large eps")
    accuracy = _percent(robust)
    return {"passed": accuracy <= NEAR_ZERO, "detail": f"pgd20 at eps {_fraction_str(eps)} on {len(labels)} "
            f"examples: {accuracy:.2f}% (must be <= {NEAR_ZERO}%)"}


def _check_square(per_attack: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The black-box Square attack must not break points that AutoAttack's white-box attacks left."""
    names = list(per_attack)
    if "square" not in names or names.index("square") == 0:
        return {"passed": None, "detail": "not run: needs AutoAttack's per-attack results with square after a "
                                          "white-box attack"}
    before = per_attack[names[names.index("square") - 1]]["robust_accuracy"]
    drop = before - per_attack["square"]["robust_accuracy"]
    passed = drop <= SQUARE_TOLERANCE
    return {"passed": passed, "detail": f"square lowered robust accuracy by {drop:.2f} points after the white-box "
            f"attacks (allowed {SQUARE_TOLERANCE})" + ("" if passed else ": likely gradient masking")}


def _batches(flags: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The indices where flags is True, in order, in batches."""
    index = flags.nonzero().flatten()
    return list(index.split(batch_size)) if len(index) else []


def _percent(flags: torch.Tensor) -> float:
    return 100.0 * int(flags.sum()) / len(flags)


def _fraction_str(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _fingerprint(tensors: Any) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _versions() -> dict[str, str | None]:
    import timm

    import sglr_zoo

    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "sglr_zoo": sglr_zoo.__version__, "pyautoattack": package_version("pyautoattack"), "git": git}
