"""Loading models by name: zoo aliases, `hf-hub:` / `local-dir:` ids, model folders and run directories."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sglr_zoo.errors import UserError
from sglr_zoo.models import load_pretrained


def resolve_folder(path: Path) -> Path:
    """A model folder (config.json + model.safetensors), or a run directory's `best/` (else `last/`) export."""
    if (path / "config.json").is_file():
        return path
    for export in ("best", "last"):
        if (path / export / "config.json").is_file():
            return path / export
    raise UserError(f"{path} holds no model: expected config.json + model.safetensors, or a run directory "
                    "with best/ or last/ exports (written by `sglr-zoo train`)")


def load(name_or_id: str, *, device: str | torch.device | None = None) -> nn.Module:
    """Returns an eval-mode model taking [0, 1] images.

    Accepts `hf-hub:ORG/NAME[@rev]`, `local-dir:PATH`, or a plain path to a model folder or run directory.
    """
    if name_or_id.startswith(("hf-hub:", "local-dir:")):
        model = load_pretrained(name_or_id)
    elif Path(name_or_id).exists():
        model = load_pretrained(f"local-dir:{resolve_folder(Path(name_or_id))}")
    else:
        raise UserError(f"cannot load {name_or_id!r}: not a zoo name, an existing path, 'hf-hub:ORG/NAME' "
                        "or 'local-dir:PATH'. See `sglr-zoo list`")
    return model.to(device) if device is not None else model
