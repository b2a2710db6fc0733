"""The grammar of attack names (`clean`, `pgd20`, `cw20`, `autoattack`), parsed once into a typed spec that
recipes, the evaluator, its sanity checks, cards and the trainer share (no torch import)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

CHOICES = "clean, pgd<steps> (e.g. pgd20), cw<steps> (e.g. cw20), autoattack"


@dataclass(frozen=True)
class AttackName:
    """One attack the evaluator runs: `kind` and, for PGD on the cross-entropy or the CW margin, its `steps`."""

    kind: Literal["clean", "pgd", "cw", "autoattack"]
    steps: int = 0

    @classmethod
    def parse(cls, name: str) -> AttackName:
        """The spec of `name`; ValueError naming the choices when it is none."""
        if name in ("clean", "autoattack"):
            return cls(name)
        match = re.fullmatch(r"(pgd|cw)([1-9][0-9]*)", str(name))
        if match is None:
            raise ValueError(f"unknown attack {name!r}; choose from {CHOICES}")
        return cls(match[1], int(match[2]))

    @classmethod
    def is_valid(cls, name: str) -> bool:
        try:
            cls.parse(name)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"{self.kind}{self.steps}" if self.steps else self.kind

    @property
    def label(self) -> str:
        """How cards and tables name it: `PGD-20`, `CW-20`, `AutoAttack`, `clean`."""
        labels = {"pgd": f"PGD-{self.steps}", "cw": f"CW-{self.steps}", "autoattack": "AutoAttack"}
        return labels.get(self.kind, "clean")

    @property
    def passes(self) -> int | None:
        """Forward-backward passes per example (a clean pass, then one per step); None for AutoAttack, whose cost
        depends on how many points survive each sub-attack."""
        return None if self.kind == "autoattack" else self.steps + 1 if self.steps else 1
