"""Where a training run is (`RunState`): saved as JSON with every checkpoint and validated when read back."""

from __future__ import annotations

import hashlib
import json
import math
import re

from sglr_zoo.checkpoint import STATE
from sglr_zoo.data import ImageSet
from sglr_zoo.monitoring import GUARD_COLUMN, MONITOR_COLUMN, TRAIN_COLUMNS
from sglr_zoo.schedule import Plan

SUMS = ("loss", "adv_correct", "grad_norm", "examples", "steps")  # an epoch's training sums, over all processes
# A rollback of sglr_zoo.guard, field by field; restored_step is None where no check had passed since the start or
# the resume (nothing to restore: the attack alone fell back).
GUARD_EVENT = {"step": "count", "epoch": "count", "accuracy": "number", "best": "number",
               "restored_step": "count or None", "fallback_steps": "count"}


class RunState:
    """Where the run is: the last epoch trained in, whole or up to `epoch_step` where run.max_steps stopped the run
    inside it (with the sums of those steps, `epoch_sums`), the optimizer steps since the start of the run (across
    resumes: what run.max_steps counts), the best validation epoch, the metrics history, the training data's
    fingerprint, the run's plans (`schedule.Plan`s as dicts; older checkpoints hold none) and the catastrophic-
    overfitting guard's record (sglr_zoo.guard): its best check's accuracy (-1: none yet), its latest check
    (`{"step", "accuracy"}`, or {}) and its rollbacks (GUARD_EVENT dicts)."""

    def __init__(self) -> None:
        self.epoch, self.epoch_step, self.global_step, self.best_epoch, self.best_val_pgd = 0, 0, 0, 0, -1.0
        self.epoch_sums: dict[str, float] = {}
        self.history: list[dict] = []
        self.data_sha256: str | None = None
        self.plans: list[dict] = []
        self.guard_best = -1.0
        self.guard_check: dict = {}
        self.guard_events: list[dict] = []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "epoch_step": self.epoch_step, "epoch_sums": self.epoch_sums,
                "global_step": self.global_step, "best_epoch": self.best_epoch, "best_val_pgd": self.best_val_pgd,
                "history": self.history, "data_sha256": self.data_sha256, "plans": self.plans,
                "guard_best": self.guard_best, "guard_check": self.guard_check, "guard_events": self.guard_events}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()`'s output; raises ValueError naming the first value that is not what it must be:
        the history goes into metrics.csv, so its rows hold finite numbers under metric column names, nothing else."""
        state = {"epoch_step": 0, "epoch_sums": {}, "data_sha256": None, "plans": [], "guard_best": -1.0,
                 "guard_check": {}, "guard_events": [], **state}  # what an older checkpoint lacks
        for key in ("epoch", "epoch_step", "global_step", "best_epoch"):
            _check(key, state[key], _is_count(state[key]), "a count")
        _check("best_val_pgd", state["best_val_pgd"], _is_number(state["best_val_pgd"]), "a finite number")
        sha256, sums, history = state["data_sha256"], state["epoch_sums"], state["history"]
        _check("data_sha256", sha256, sha256 is None or isinstance(sha256, str)
               and re.fullmatch(r"[0-9a-f]{64}", sha256) is not None, "a sha256")
        _check("epoch_sums", sums, isinstance(sums, dict) and set(sums) <= {*SUMS, "seconds"}
               and all(map(_is_number, sums.values())), f"finite numbers named {', '.join(SUMS)} or seconds")
        _check("history", history, isinstance(history, list), "a list of rows")
        for number, row in enumerate(history, 1):
            _check(f"history row {number}", row, isinstance(row, dict) and _is_count(row.get("epoch")),
                   "a row with an epoch")
            for key, value in row.items():
                _check(f"history row {number}'s column", key, key in TRAIN_COLUMNS or MONITOR_COLUMN.fullmatch(key)
                       is not None or GUARD_COLUMN.fullmatch(key) is not None, "a metrics.csv column")
                _check(f"history row {number}'s {key}", value, _is_number(value), "a finite number")
        _check("plans", state["plans"], isinstance(state["plans"], list) and all(map(_is_plan, state["plans"])),
               "a list of plans")
        _check("guard_best", state["guard_best"], _is_number(state["guard_best"]), "a finite number")
        check = state["guard_check"]
        _check("guard_check", check, check == {} or _is_record(check, {"step": "count", "accuracy": "number"}),
               "{} or a step and an accuracy")
        events = state["guard_events"]
        _check("guard_events", events, isinstance(events, list) and all(_is_record(e, GUARD_EVENT) for e in events),
               f"a list of rollbacks ({', '.join(GUARD_EVENT)})")
        self.epoch, self.epoch_step, self.global_step = state["epoch"], state["epoch_step"], state["global_step"]
        self.best_epoch, self.best_val_pgd = state["best_epoch"], float(state["best_val_pgd"])
        self.epoch_sums, self.history, self.data_sha256 = dict(sums), list(history), sha256
        self.plans = list(state["plans"])
        self.guard_best, self.guard_check = float(state["guard_best"]), dict(check)
        self.guard_events = [dict(event) for event in events]


def data_fingerprint(data: ImageSet) -> str:
    """sha256 of a split's class names, images and labels: a resumed run checks that it trains on the same data."""
    digest = hashlib.sha256(json.dumps([data.class_names, list(data.images.shape)]).encode())
    for tensor in (data.images, data.labels):
        digest.update(tensor.contiguous().numpy())
    return digest.hexdigest()


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _is_number(value: object) -> bool:
    """A finite int or float; an int too large for a float is none (it could not be plotted)."""
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        return False


def _is_record(value: object, fields: dict[str, str]) -> bool:
    """A dict of exactly `fields`, each what its kind says: "count", "number" or "count or None"."""
    kinds = {"count": _is_count, "number": _is_number, "count or None": lambda v: v is None or _is_count(v)}
    return isinstance(value, dict) and set(value) == set(fields) and all(kinds[kind](value[key])
                                                                         for key, kind in fields.items())


def _check(name: str, value: object, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{STATE}: {name} is {value!r:.60}, not {what}")  # the checkpointer names the checkpoint



def _is_plan(value: object) -> bool:
    try:
        Plan.from_dict(value)
    except ValueError:
        return False
    return True
