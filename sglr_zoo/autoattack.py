"""The reference AutoAttack (PyPI `pyautoattack`, Croce & Hein's code), driven so that a killed run resumes.

We run AutoAttack's own loop ourselves: each sub-attack on the points that survived the previous ones, in batches,
saving a state file after every batch, so that per-attack numbers are kept and a rerun with the same file
continues where a killed one stopped (pyautoattack's own `state_path` cannot be read back: it stores the attack set
as a string and its resume branch uses an unset variable). That reaches into pyautoattack's internals
(`attacks_to_run`, `apgd`, `apgd_targeted`, `fab`, `square`, one sub-attack per `run_standard_evaluation`), so the
version is pinned exactly, here and in pyproject.toml.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from sglr_zoo.attacks import Threat
from sglr_zoo.errors import UserError
from sglr_zoo.files import TEXT_LIMIT, read_regular, write_atomic
from sglr_zoo.results import AttackStep, percent
from sglr_zoo.sharding import Shards

PYAUTOATTACK_VERSION = "0.2.0"  # the internals read below are this version's; pyproject.toml pins the same
STATE_SCHEMA = "sglr_zoo.autoattack_state/1"
AUTOATTACK_NAMES = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")


def make_autoattack(
    model: nn.Module,
    *,
    threat: Threat,
    eps: float,
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
) -> Any:
    """The reference AutoAttack object: `standard` or `rand` versions, or `custom` with a list of sub-attacks.

    With fewer than 10 classes the targeted attacks (APGD-T, FAB-T) target all num_classes - 1 other classes
    instead of AutoAttack's 9, as its README advises (9 would index past the logits).
    """
    from pyautoattack import AutoAttack

    installed = package_version("pyautoattack")
    if installed != PYAUTOATTACK_VERSION:
        raise UserError(f"pyautoattack {installed} is installed; sglr_zoo drives the internals of version "
                        f"{PYAUTOATTACK_VERSION}: pip install pyautoattack=={PYAUTOATTACK_VERSION}")
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
    if num_classes is not None:
        targets = min(aa.apgd_targeted.n_target_classes, num_classes - 1)
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = targets
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


def run_autoattack(aa: Any, images: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor, *,
                   batch_size: int, state_path: str | Path | None, key: dict[str, Any], progress: bool = False,
                   shards: Shards = Shards()) -> tuple[torch.Tensor, dict[str, AttackStep]]:
    """AutoAttack's loop over its sub-attacks, starting from the `candidates` (True: still to break).

    Returns, per example, True where every sub-attack failed, and each sub-attack's cumulative robust accuracy.
    With `state_path`, progress is saved after every batch; a rerun with the same `key` (what identifies the
    evaluation: model, data, eps, settings) resumes from it, and a different key is refused, as is a state that
    claims more than the candidates allow. Sharded (`shards`), each round of batches, one per process, is gathered
    before the main process saves it (a batch's result depends on its images alone: pyautoattack reseeds each
    sub-attack with the seed at each call), and only the main process reads and writes the state file.
    """
    path = Path(state_path) if state_path is not None else None
    saved = _read_state(path, key, candidates) if shards.main and path is not None and path.exists() else None
    state = shards.share(saved) or {"schema": STATE_SCHEMA, "key": key, "robust": candidates.tolist(), "attacked": {},
                                    "seconds": {}, "per_attack": {}}
    path = path if shards.main else None
    robust = torch.tensor(state["robust"], dtype=torch.bool)
    sub_attacks = list(aa.attacks_to_run)
    try:
        for name in sub_attacks:
            attacked = torch.tensor(state["attacked"].get(name, [False] * len(labels)), dtype=torch.bool)
            aa.attacks_to_run = [name]
            for batch_round in tqdm(shards.rounds(batches(robust & ~attacked, batch_size)),
                                    desc=f"autoattack {name}", disable=not progress):
                clock, owned = time.time(), torch.zeros_like(robust)
                if shards.rank < len(batch_round):
                    index = batch_round[shards.rank]
                    # Contiguous: pyautoattack's zero-gradient check calls .view() on the input gradient, which
                    # fails for channels-last images (what torch.from_numpy(nhwc).permute(0, 3, 1, 2) gives).
                    x = images[index].contiguous()
                    _, predicted = aa.run_standard_evaluation(x, labels[index], batch_size=len(index))
                    robust[index] = predicted.cpu() == labels[index]
                    owned[index] = True
                robust = shards.gather(robust, owned)
                attacked[torch.cat(batch_round)] = True
                state["robust"], state["attacked"][name] = robust.tolist(), attacked.tolist()
                state["seconds"][name] = state["seconds"].get(name, 0.0) + time.time() - clock
                _write_state(path, state)
            if name not in state["per_attack"]:  # resumed, a finished sub-attack keeps what it left
                state["per_attack"][name] = {"robust_accuracy": percent(int(robust.sum()), len(robust)),
                                             "seconds": state["seconds"].get(name, 0.0)}
                _write_state(path, state)
    finally:
        aa.attacks_to_run = sub_attacks
    return robust, {name: AttackStep(**step) for name, step in state["per_attack"].items()}


def batches(flags: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The indices where flags is True, in order, in batches (how every attack here walks its points)."""
    index = flags.nonzero().flatten()
    return list(index.split(batch_size)) if len(index) else []


def _read_state(path: Path, key: dict[str, Any], candidates: torch.Tensor) -> dict[str, Any]:
    """A saved state, checked: it belongs to this evaluation, holds a flag per candidate in each list, and its
    robust points and accuracies lie within the candidates (the clean-correct points): a sub-attack only removes."""
    fresh = f"delete {path} to start AutoAttack over, or pass another --state-path"
    n = len(candidates)
    try:  # a regular file of bounded size: JSON flags take under 8 bytes each, in at most 7 lists
        state = json.loads(read_regular(path, TEXT_LIMIT + 64 * n, "state file"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"AutoAttack state file {path} is unreadable ({error}); {fresh}") from None
    if not isinstance(state, dict) or state.get("schema") != STATE_SCHEMA:
        raise UserError(f"{path} is not an AutoAttack state file of sglr_zoo ({STATE_SCHEMA}); {fresh}")
    if state.get("key") != key:
        raise UserError(f"state file {path} belongs to a different evaluation (model, data, eps or AutoAttack "
                        f"settings differ); {fresh}")

    def flags(value: Any) -> bool:
        return isinstance(value, list) and len(value) == n and all(isinstance(v, bool) for v in value)

    def numbers(value: Any) -> bool:  # finite and >= 0: results files hold no NaN
        return isinstance(value, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               and 0 <= v < math.inf for v in value.values())

    steps = state.get("per_attack")
    valid = (flags(state.get("robust")) and isinstance(state.get("attacked"), dict)
             and all(flags(v) for v in state["attacked"].values()) and numbers(state.get("seconds"))
             and isinstance(steps, dict) and all(isinstance(s, dict) and set(s) == {"robust_accuracy", "seconds"}
                                                 and numbers(s) for s in steps.values()))
    if not valid:
        raise UserError(f"AutoAttack state file {path} is corrupt (its per-example flags or timings do not fit "
                        f"{n} examples); {fresh}")
    robust = torch.tensor(state["robust"], dtype=torch.bool)
    ceiling, floor = percent(int(candidates.sum()), n), percent(int(robust.sum()), n)
    if (robust & ~candidates).any() or not all(floor <= s["robust_accuracy"] <= ceiling for s in steps.values()):
        raise UserError(f"AutoAttack state file {path} claims examples robust that the clean pass gets wrong, or "
                        f"accuracies outside [{floor:.2f}, {ceiling:.2f}]% (edited, or the clean predictions changed "
                        f"on another device); {fresh}")
    return state


def _write_state(path: Path | None, state: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(state).encode())  # a kill never leaves half a file
