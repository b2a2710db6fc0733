"""Deprecated home of sharing trained models; each concept now has its own module:

- `sglr_zoo.source`: reading a run or model folder back (`ModelSource`, `collect`);
- `sglr_zoo.cards`: the model card's facts, labels and citation, and its rendering (`render_card`, `write_card`,
  `write_zoo_cards`);
- `sglr_zoo.export`: Hub-ready folders and RobustBench entries (`export_folder`, `robustbench_entry`,
  `export_robustbench`);
- `sglr_zoo.push`: uploads to the Hub (`push`, `Upload`);
- `sglr_zoo.bundle`: zoo bundles and their upload (`bundle`, `Bundle`, `push_zoo`).

`from sglr_zoo.hub import NAME` still works for every name this module held, with a DeprecationWarning that
names the new home.
"""

from __future__ import annotations

import warnings
from typing import Any

import sglr_zoo.bundle
import sglr_zoo.cards
import sglr_zoo.export
import sglr_zoo.push
import sglr_zoo.source

_MOVED = [
    (sglr_zoo.source, ("ModelSource", "collect")),
    (sglr_zoo.cards, ("ARCH_LABELS", "ATTACK_LABELS", "CARD_TEMPLATE", "CITATION", "DATASETS", "LICENSE", "METHODS",
             "PAPER_EPOCHS", "SGLR_PAPER", "THREAT_LABELS", "render_card", "write_card", "write_zoo_cards")),
    (sglr_zoo.export, ("RECORD_LIMITS", "export_folder", "export_robustbench", "robustbench_entry")),
    (sglr_zoo.push, ("Upload", "push")),
    (sglr_zoo.bundle, ("CHECK_ATTACKS", "MAX_BUNDLE_MB", "Bundle", "bundle", "push_zoo")),
]
_HOMES = {name: module for module, names in _MOVED for name in names}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'sglr_zoo.hub' has no attribute {name!r}")
    home = _HOMES[name].__name__
    warnings.warn(f"sglr_zoo.hub.{name} is deprecated: import it from {home}", DeprecationWarning, stacklevel=2)
    return getattr(_HOMES[name], name)
