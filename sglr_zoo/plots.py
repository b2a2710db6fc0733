"""Figures written next to runs and results, as PNG bytes (matplotlib's Figure: no pyplot, so a notebook keeps its
backend)."""

from __future__ import annotations

import io
from fractions import Fraction

from sglr_zoo.attack_names import AttackName
from sglr_zoo.results import EpsSweep


def eps_sweep_png(sweep: EpsSweep, title: str = "") -> bytes:
    """Accuracy against eps (in /255 for radii below 1), the expected robustness in the legend."""
    from matplotlib.figure import Figure

    radii = [Fraction(eps) for eps in sweep.eps]
    per_255 = radii[-1] <= 1
    fig = Figure(figsize=(5, 3.5))
    axes = fig.subplots()
    axes.plot([float(r * 255 if per_255 else r) for r in radii], sweep.accuracy, marker="o",
              label=f"{AttackName.parse(sweep.attack).label}: expected robustness {sweep.expected_robustness:.1f}%")
    axes.set(xlabel="eps (/255)" if per_255 else "eps", ylabel="accuracy (%)", ylim=(0, 100), title=title or None)
    axes.grid(alpha=0.3)
    axes.legend()
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()
