"""Robustness evaluation: clean accuracy, our quick PGD/CW and the reference AutoAttack, with sanity checks.

`evaluate` measures a model on given images and returns a `sglr_zoo.results.Results` (its JSON file is described
there): every number a model card shows comes from one. `evaluate_model` first loads a model id and the first n
examples of a dataset split. Attacks run in fp32 (TF32 and autocast off) with the model in eval mode, each on the
points it can still break: our PGD/CW on the clean-correct points, AutoAttack's sub-attacks
(`sglr_zoo.autoattack`) on the points that survived the previous ones. The checks are in `sglr_zoo.sanity`.
Sharded over several processes (`sglr_zoo.sharding`), every process evaluates its share of every attack's batches
and returns the same results; the main process alone writes the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from fractions import Fraction
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from sglr_zoo import sanity
from sglr_zoo.attack_names import AttackName
from sglr_zoo.attacks import THREATS, Threat, model_mode, pgd
from sglr_zoo.autoattack import AUTOATTACK_NAMES, autoattack_settings, batches, make_autoattack, run_autoattack
from sglr_zoo.errors import UserError
from sglr_zoo.eval_checks import check_inputs, check_options, sweep_radii
from sglr_zoo.models import unwrap_timm, weights_fingerprint
from sglr_zoo.outcomes import Outcomes
from sglr_zoo.results import EpsSweep, Provenance, Results, percent
from sglr_zoo.sharding import Shards

__all__ = ["AUTOATTACK_NAMES", "DEFAULT_ATTACKS", "Provenance", "Results", "attack_correct", "autoattack_settings",
           "evaluate", "evaluate_model", "for_evaluation", "format_results", "load_results", "make_autoattack",
           "save_results"]

DEFAULT_ATTACKS = ("clean", "pgd20", "cw20", "autoattack")
# evaluate()'s keywords before provenance= grouped them, still accepted (deprecated): old name -> Provenance field.
LEGACY_PROVENANCE = {"model_name": "model", "dataset": "dataset", "split": "split", "source": "source",
                     "which": "which", "command": "command"}

# The results object's own methods, under the names this module has always exported.
load_results, save_results, format_results = Results.load, Results.save, Results.summary


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
    outcomes_path: str | Path | None = None,
    eps_sweep: Sequence[Fraction | str] = (),
    sweep_attack: str = "pgd20",
    device: str | torch.device | None = None,
    bf16_quick: bool = False,
    progress: bool = False,
    provenance: Provenance | None = None,
    shards: Shards = Shards(),
    **legacy_provenance: str | None,
) -> Results:
    """Clean and robust accuracy of `model` on float images in [0, 1], plus sanity checks: the results object.

    Args:
        attacks: any of "clean" (always measured), "pgd<steps>", "cw<steps>" (ours: step eps/4, random start)
            and "autoattack".
        eps: an exact fraction like "8/255"; defaults to 8/255 (linf) or 1/2 (l2).
        num_classes: the dataset's number of classes; the model's output must match it.
        state_path: AutoAttack's progress is saved here after every batch; a rerun with the same file resumes.
        eps_sweep: radii at which `sweep_attack` (pgd<steps>, cw<steps> or autoattack) is also run, giving
            accuracy against eps and the area under it (`EpsSweep`); 0 is clean accuracy, and is added.
        outcomes_path: the per-example outcomes (`sglr_zoo.outcomes.Outcomes`) are written here after each
            attack, so a stopped evaluation keeps the attacks it finished.
        device: defaults to the model's device. The model is moved there and put in eval mode for the
            evaluation (its train/eval modes are restored afterwards).
        bf16_quick: bf16 autocast for our PGD/CW steps only (verdicts and AutoAttack stay fp32).
        provenance: what is evaluated and how it was asked for, recorded as given (local paths made
            relative, see `sglr_zoo.results.public_path`). The old keywords model_name, dataset, split, source,
            which and command still work and are deprecated.
        shards: this process's place when several share the evaluation (`sglr_zoo.sharding.process_group`); every
            process passes the same images and options, and only the main one writes `outcomes_path` and
            `state_path`.
    """
    started = time.time()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    provenance = _provenance(provenance, legacy_provenance)
    labels = check_inputs(model, images, labels, num_classes)
    eps, quick = check_options(threat, eps, attacks, batch_size, seed, images[0].numel())
    radii = sweep_radii(threat, eps_sweep, sweep_attack, images[0].numel())
    device = torch.device(device) if device is not None else next(model.parameters()).device
    images, labels = images.cpu(), labels.cpu()
    model.to(device)
    weights_sha256 = weights_fingerprint(unwrap_timm(model).state_dict())
    data_sha256 = _fingerprint([images, labels])
    outcomes = Outcomes(len(labels), weights_sha256, data_sha256)
    progress = progress and shards.main

    def finished(name: str, correct_after: torch.Tensor) -> None:
        if outcomes_path is not None and shards.main:
            outcomes.correct[name] = correct_after.tolist()
            outcomes.save(outcomes_path)
    aa = None
    if "autoattack" in attacks:  # built first: bad options fail before any work
        aa = make_autoattack(model, threat=threat, eps=float(eps), version=autoattack_version,
                             attacks=autoattack_attacks, seed=seed, device=device, num_classes=num_classes)
    settings: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    flags: dict[str, torch.Tensor] = {}
    per_attack = {}
    with model_mode(model, "eval"), _fp32(device):
        if any(module.training for module in model.modules()):
            raise UserError("the model stays in train mode after model.eval() (a module overrides train()); "
                            "evaluation would use batch statistics")
        eval_mode = sanity.eval_mode(model, images[:batch_size].to(device), labels, num_classes)

        clock = time.time()
        correct = _predict(model, images, batch_size, device) == labels
        seconds["clean"] = time.time() - clock
        finished("clean", correct)
        for name, (loss, steps) in quick.items():
            clock = time.time()
            torch.manual_seed(seed)
            flags[name] = correct if eps == 0 else _quick_attack(
                model, images, labels, correct, loss=loss, steps=steps, threat=threat, eps=eps, batch_size=batch_size,
                device=device, bf16=bf16_quick, progress=progress, desc=name, shards=shards)
            settings[name] = {
                "implementation": "sglr_zoo.attacks.pgd", "loss": loss, "steps": steps,
                "step_size": str(eps / 4), "random_start": True, "restarts": 1,
                "precision": "bf16 autocast (verdict fp32)" if bf16_quick else "fp32"}
            seconds[name] = time.time() - clock
            finished(name, flags[name])
        if aa is not None:
            clock = time.time()
            settings["autoattack"] = autoattack_settings(aa)
            if eps == 0:
                flags["autoattack"] = correct
            else:
                key = {"threat": threat, "eps": str(eps), **autoattack_settings(aa),
                       "data_sha256": data_sha256,
                       "model_sha256": weights_sha256}
                flags["autoattack"], per_attack = run_autoattack(
                    aa, images, labels, correct, batch_size=batch_size, state_path=state_path, key=key,
                    progress=progress, shards=shards)
            seconds["autoattack"] = time.time() - clock
            finished("autoattack", flags["autoattack"])

        robust = {name: _percent(robust_flags) for name, robust_flags in flags.items()}
        checked = min(len(labels), sanity.CHECK_EXAMPLES)
        checks = {
            "eval_mode": eval_mode,
            "input_gradients": sanity.input_gradients(model, images[:checked].to(device), labels[:checked].to(device)),
            "autoattack_le_pgd": sanity.autoattack_le_pgd(robust),
            "large_eps": sanity.large_eps(
                _large_eps_accuracy(model, images[:checked], labels[:checked], threat=threat, seed=seed,
                                    batch_size=batch_size, device=device, progress=progress, shards=shards),
                threat, checked),
            "square_vs_white_box": sanity.square_vs_white_box(per_attack),
        }
        sweep = _eps_sweep(model, images, labels, correct, radii=radii, attack=sweep_attack, threat=threat,
                           seed=seed, batch_size=batch_size, device=device, progress=progress,
                           num_classes=num_classes, shards=shards) if radii else None
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return Results(
        provenance=provenance, arch=arch, weights_sha256=weights_sha256, threat=threat, eps=str(eps),
        n_examples=len(labels), clean_accuracy=_percent(correct), robust_accuracy=robust,
        worst_case_accuracy=_percent(torch.stack(list(flags.values())).all(0)) if flags else None,
        autoattack_per_attack=per_attack, attacks=settings, sanity=checks, seed=seed, device=str(device),
        versions=_versions(), wall_time_s=time.time() - started, attack_seconds=seconds, created=created,
        eps_sweep=sweep)


def attack_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, attack: str,
                   threat: Threat = "linf", eps: Fraction | str | float | None = None, batch_size: int = 256,
                   device: str | torch.device | None = None, seed: int | None = None) -> torch.Tensor:
    """Per example, True where the model classifies the image correctly and still does under `attack`.

    The evaluator's own measurement, for callers such as the trainer's per-epoch monitoring: "clean", or our
    "pgd<steps>" / "cw<steps>" (step eps/4, random start) run in fp32 with the model in eval mode on the
    clean-correct points only. `seed` seeds the random start (None keeps the global generator's state).
    """
    eps, quick = check_options(threat, eps, [attack], batch_size)
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


def for_evaluation(model: nn.Module, device: str | torch.device) -> nn.Module:
    """`model` moved to `device`; on a CPU also to channels_last, which oneDNN's fp32 convolutions run 1.5x faster
    in (benchmarks/RESULTS.md, "PGD-20 evaluation"). For models the caller owns: it converts them in place."""
    device = torch.device(device)
    return model.to(device, memory_format=torch.channels_last if device.type == "cpu" else torch.preserve_format)


def evaluate_model(
    model_id: str,
    *,
    dataset: str = "uoft-cs/cifar10",
    split: str = "test",
    n: int = 1000,
    device: str | torch.device | None = None,
    weights: str | None = None,
    command: str | None = None,
    **options: Any,
) -> Results:
    """Loads a model (`sglr_zoo.zoo.load`) and the first n examples of a split, in order, and runs `evaluate`.

    With `weights` (a .safetensors file), `model_id` is a timm architecture name.

    options: the keyword arguments of `evaluate` (threat, eps, attacks, batch_size, seed, state_path, ...).
    """
    from sglr_zoo import zoo
    from sglr_zoo.data import load_splits, to_float
    from sglr_zoo.recipe import DataConfig

    if n < 1:
        raise UserError(f"--n {n}: evaluate at least one example")
    check_options(options.get("threat", "linf"), options.get("eps"), options.get("attacks", DEFAULT_ATTACKS),
                   options.get("batch_size", 256), options.get("seed", 0))  # before minutes of loading
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    located = model_id if weights else zoo.locate(model_id)  # a wrong name fails before the data loads
    # n_train=1: only the test split is needed; the train split's first example is decoded for its class names.
    splits = load_splits(DataConfig(dataset=dataset, test_split=split, n_test=n, n_train=1))
    model = for_evaluation(zoo.load(located, weights=weights, num_classes=splits.num_classes), device)
    image_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 32, 32))[-1]
    images = to_float(splits.test.images, image_size)
    provenance = Provenance(model=f"{model_id} + {weights}" if weights else model_id, dataset=dataset, split=split,
                            source=splits.source, which=f"first {len(splits.test)} of the split in order",
                            command=command)
    return evaluate(model, images, splits.test.labels, num_classes=splits.num_classes, device=device,
                    provenance=provenance, **options)


def _provenance(provenance: Provenance | None, legacy: dict[str, str | None]) -> Provenance:
    """`provenance`, or one built from the deprecated keywords; made fit to publish either way."""
    unknown = sorted(set(legacy) - set(LEGACY_PROVENANCE))
    if unknown:
        raise TypeError(f"evaluate() got an unexpected keyword argument {unknown[0]!r}")
    if legacy:
        if provenance is not None:
            raise TypeError("evaluate(): pass provenance= or the deprecated keywords "
                            f"({', '.join(sorted(legacy))}), not both")
        warnings.warn(f"evaluate({', '.join(f'{k}=' for k in legacy)}...) is deprecated: pass "
                      "provenance=sglr_zoo.results.Provenance(model=..., dataset=..., split=..., source=..., "
                      "which=..., command=...)", DeprecationWarning, stacklevel=3)
        provenance = Provenance(**{LEGACY_PROVENANCE[key]: value for key, value in legacy.items()})
    return (provenance or Provenance()).public()


def _eps_sweep(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor, *,
               radii: list[Fraction], attack: str, threat: Threat, seed: int, batch_size: int, device: torch.device,
               progress: bool, num_classes: int | None, shards: Shards) -> EpsSweep:
    """Accuracy under `attack` at each radius (the same seed at each), and the trapezoid area under the curve
    divided by the largest radius."""
    spec, accuracy = AttackName.parse(attack), []
    for eps in radii:
        if eps == 0:
            flags = correct
        elif spec.kind == "autoattack":
            aa = make_autoattack(model, threat=threat, eps=float(eps), seed=seed, device=device,
                                 num_classes=num_classes)
            flags, _ = run_autoattack(aa, images, labels, correct, batch_size=batch_size, state_path=None, key={},
                                      progress=progress, shards=shards)
        else:
            torch.manual_seed(seed)
            flags = _quick_attack(model, images, labels, correct, loss="ce" if spec.kind == "pgd" else "cw",
                                  steps=spec.steps, threat=threat, eps=eps, batch_size=batch_size, device=device,
                                  bf16=False, progress=progress, desc=f"{attack} at {str(eps)}", shards=shards)
        accuracy.append(_percent(flags))
    area = sum((float(b - a)) * (x + y) / 2 for a, b, x, y in zip(radii, radii[1:], accuracy, accuracy[1:]))
    return EpsSweep(attack, [str(eps) for eps in radii], accuracy,
                    area / float(radii[-1]) if radii[-1] else accuracy[0])


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
        return torch.cat([sanity.logits_of(model, batch.to(device)).argmax(1).cpu()
                          for batch in images.split(batch_size)])


def _quick_attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor, *,
                  loss: str, steps: int, threat: Threat, eps: Fraction, batch_size: int, device: torch.device,
                  bf16: bool, progress: bool, desc: str, shards: Shards = Shards()) -> torch.Tensor:
    """Our PGD (step eps/4, random start) on the candidate points only; True where the model stays correct.

    Sharded, a process attacks its batches and draws the random start of the others' (pgd draws nothing else for
    the ce and cw losses), so that each batch starts from the numbers a single process would draw for it.
    """
    robust, owned = torch.zeros_like(candidates), torch.zeros_like(candidates)
    for k, index in enumerate(tqdm(batches(candidates, batch_size), desc=desc, disable=not progress)):
        if not shards.owns(k):
            THREATS[threat](float(eps)).random_start(torch.empty(len(index), *images.shape[1:], device=device))
            continue
        x, y = images[index].to(device), labels[index].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x_adv = pgd(model, x, y, threat=threat, eps=float(eps), step_size=float(eps / 4), steps=steps,
                        random_start=True, loss=loss)
        with torch.no_grad():
            robust[index] = (model(x_adv).argmax(1) == y).cpu()
        owned[index] = True
    return shards.gather(robust, owned)


def _large_eps_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, threat: Threat, seed: int,
                        batch_size: int, device: torch.device, progress: bool, shards: Shards) -> float:
    """PGD-20 accuracy at `sanity.LARGE_EPS`, for the check that it falls to near zero."""
    torch.manual_seed(seed)
    correct = _predict(model, images, batch_size, device) == labels
    return _percent(_quick_attack(model, images, labels, correct, loss="ce", steps=20, threat=threat,
                                  eps=sanity.LARGE_EPS[threat], batch_size=batch_size, device=device, bf16=False,
                                  progress=progress, desc="sanity large eps", shards=shards))


def _percent(flags: torch.Tensor) -> float:
    return percent(int(flags.sum()), len(flags))


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
