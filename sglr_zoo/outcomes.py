"""Per-example outcomes of an evaluation, kept beside its results JSON: which of the first n images each attack left
correctly classified, so that two models or two runs are compared on the same images with a paired test (no torch
import).

    RESULTS.outcomes.json   (beside RESULTS.json)
      schema          "sglr_zoo.outcomes/1"
      n_examples      n
      weights_sha256  the evaluated weights' fingerprint, as in the results
      data_sha256     the evaluated images' and labels' fingerprint
      correct         {attack: n bits as hex; example i is bit i % 8 of byte i // 8; 1 = still correct after it}

The evaluator rewrites the file after each attack, so a stopped evaluation keeps the attacks it finished.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from sglr_zoo.errors import UserError
from sglr_zoo.files import TEXT_LIMIT, read_regular, write_atomic

SCHEMA = "sglr_zoo.outcomes/1"


@dataclass
class Outcomes:
    """Per attack, per example: correct after the attack (clean: correct at all)."""

    n_examples: int
    weights_sha256: str | None = None
    data_sha256: str | None = None
    correct: dict[str, list[bool]] = field(default_factory=dict)

    @staticmethod
    def beside(results_path: str | Path) -> Path:
        """Where the outcomes of the results at `results_path` live: `x.json` -> `x.outcomes.json`."""
        path = Path(results_path)
        return path.with_name(f"{path.stem}.outcomes.json")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        correct = {name: _pack(flags) for name, flags in self.correct.items()}
        data = {"schema": SCHEMA, "n_examples": self.n_examples, "weights_sha256": self.weights_sha256,
                "data_sha256": self.data_sha256, "correct": correct}
        write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Outcomes:
        """Reads a file written by `save`; UserError naming the file when it is not one."""
        try:
            data = json.loads(read_regular(path, TEXT_LIMIT, "outcomes file"))
        except FileNotFoundError:
            raise UserError(f"{path}: not found (an evaluation with --out X.json writes X.outcomes.json)") from None
        except (OSError, ValueError, RecursionError) as error:
            raise UserError(f"{path}: not an outcomes file ({error})") from None
        n = data.get("n_examples") if isinstance(data, dict) else None
        if not (isinstance(data, dict) and data.get("schema") == SCHEMA and isinstance(n, int) and n > 0
                and isinstance(data.get("correct"), dict)
                and all(isinstance(data.get(k), (str, type(None))) for k in ("weights_sha256", "data_sha256"))):
            raise UserError(f"{path}: not a {SCHEMA} file")
        try:
            correct = {str(name): _unpack(bits, n) for name, bits in data["correct"].items()}
        except (TypeError, ValueError) as error:
            raise UserError(f"{path}: {error}") from None
        return cls(n, data["weights_sha256"], data["data_sha256"], correct)

    def accuracy(self, attack: str) -> float:
        return 100 * sum(self.correct[attack]) / self.n_examples


def _pack(flags: list[bool]) -> str:
    packed = bytearray((len(flags) + 7) // 8)
    for i, flag in enumerate(flags):
        packed[i // 8] |= bool(flag) << (i % 8)
    return packed.hex()


def _unpack(bits: object, n: int) -> list[bool]:
    if not isinstance(bits, str) or len(bits) != 2 * ((n + 7) // 8):
        raise ValueError(f"an attack's outcomes must be {(n + 7) // 8} bytes of hex for {n} examples")
    packed = bytes.fromhex(bits)
    flags = [bool(packed[i // 8] >> (i % 8) & 1) for i in range(n)]
    if n % 8 and packed[-1] >> (n % 8):
        raise ValueError("an attack's outcomes set bits past the last example")
    return flags


@dataclass(frozen=True)
class PairedTest:
    """McNemar's exact test of two evaluations of one attack on the same images: only the images on which they
    disagree count."""

    attack: str
    n_examples: int
    accuracy_a: float
    accuracy_b: float
    only_a: int  # images A gets right and B does not
    only_b: int
    p_value: float  # two-sided, exact (binomial with p = 1/2 over the disagreements)

    def describe(self) -> str:
        return (f"{self.attack} on {self.n_examples} images: A {self.accuracy_a:.2f}%, B {self.accuracy_b:.2f}% "
                f"({self.accuracy_b - self.accuracy_a:+.2f} points); only A correct on {self.only_a}, only B on "
                f"{self.only_b}; McNemar's exact p = {self.p_value:.3g}")


def paired_test(a: Outcomes, b: Outcomes, attack: str) -> PairedTest:
    """Compares `attack`'s outcomes of two evaluations; UserError unless both ran it on the same images."""
    if a.n_examples != b.n_examples or (a.data_sha256 and b.data_sha256 and a.data_sha256 != b.data_sha256):
        raise UserError("the two evaluations are not on the same images (their n_examples or data_sha256 differ): "
                        "evaluate both on the same split and n")
    missing = [name for name, outcomes in (("A", a), ("B", b)) if attack not in outcomes.correct]
    if missing:
        both = sorted(a.correct.keys() & b.correct.keys())
        raise UserError(f"{' and '.join(missing)} did not run {attack}; both ran {', '.join(both) or 'nothing'}")
    pairs = list(zip(a.correct[attack], b.correct[attack], strict=True))
    only_a = sum(x and not y for x, y in pairs)
    only_b = sum(y and not x for x, y in pairs)
    return PairedTest(attack, a.n_examples, a.accuracy(attack), b.accuracy(attack), only_a, only_b,
                      mcnemar_p(only_a, only_b))


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: twice the smaller binomial tail over the disagreements, at most 1."""
    disagreements = only_a + only_b
    if disagreements == 0:
        return 1.0
    tail = sum(math.comb(disagreements, k) for k in range(min(only_a, only_b) + 1)) / 2 ** disagreements
    return min(1.0, 2 * tail)
