"""The on-disk layout of a training run: the one place that spells its paths (no torch import).

    RUN/
      recipe.yaml        the resolved recipe (fully expanded)
      run.json           provenance: versions, seed, processes, precision, checksums (paths relative to RUN)
      metrics.csv        one row per epoch
      curves.png         train vs test robust accuracy and the gradient norm per epoch
      checkpoints/       epoch_NNNN/ (complete) and .partial_epoch_NNNN/ (being written)
      best/, last/       model exports (model.safetensors + config.json, timm's layout) and their results.json
      .lock              held while a process trains here
      finished.json      written last: the run is complete
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

EXPORTS = ("best", "last")
CHECKPOINT_PATTERN = re.compile(r"epoch_(\d{4,})")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory; creating a RunDir touches nothing on disk."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def run_info(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def finished(self) -> Path:
        return self.root / "finished.json"

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}"

    def partial_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f".partial_epoch_{epoch:04d}"

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first (half-written ones are never named epoch_NNNN)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.fullmatch(p.name)]
        return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.fullmatch(p.name).group(1)))

    def export(self, which: str) -> Path:
        """The `best/` or `last/` model folder."""
        if which not in EXPORTS:
            raise ValueError(f"which must be one of {EXPORTS}, not {which!r}")
        return self.root / which

    def results(self, which: str) -> Path:
        """The final evaluation's results next to an export's weights."""
        return self.export(which) / "results.json"

    def exports(self) -> list[str]:
        """The exports present (holding config.json), best first."""
        return [which for which in EXPORTS if (self.export(which) / "config.json").is_file()]

    def is_run(self) -> bool:
        """True when this looks like a run directory written by the trainer."""
        return self.recipe.is_file() or self.checkpoints.is_dir() or bool(self.exports())

    def relative(self, path: str | Path) -> str:
        """`path` relative to the run directory when inside it, else its file name only (no local paths leak)."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return path.name
