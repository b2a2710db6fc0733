"""Input normalisation inside the model, so every model takes images in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class InputNormalization(nn.Module):
    """(x - mean) / std with non-persistent buffers (RobustBench's pattern); identity when mean/std are None."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.enabled = mean is not None
        mean = mean if mean is not None else (0.0, 0.0, 0.0)
        std = std if std is not None else (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.enabled else x


class Normalized(nn.Module):
    """Wraps a stock timm model that expects normalised inputs so that it takes [0, 1] images."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.model = model
        self.pretrained_cfg = getattr(model, "pretrained_cfg", {})
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))
