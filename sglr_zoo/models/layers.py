"""Shared parts of our CIFAR models: input normalisation inside the model (inputs in [0, 1]), the residual stages,
the classifier head."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
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


def cifar_stages(block: Callable[[int, int, int], nn.Module], in_chs: int, layers: Sequence[int],
                 widths: Sequence[int]) -> tuple[nn.Sequential, list[dict]]:
    """The residual stages of a CIFAR ResNet, `stages.i.b`, and timm's `feature_info` for them: stage i holds
    `layers[i]` blocks `block(in_chs, out_chs, stride)` of `widths[i]` channels, its first block halving the
    resolution in every stage but the first."""
    stages, feature_info = [], []
    for i, (depth, width) in enumerate(zip(layers, widths)):
        stages.append(nn.Sequential(*[block(in_chs if b == 0 else width, width, 2 if (i > 0 and b == 0) else 1)
                                      for b in range(depth)]))
        feature_info.append(dict(num_chs=width, reduction=2**i, module=f"stages.{i}"))
        in_chs = width
    return nn.Sequential(*stages), feature_info


class ClassifierHead:
    """timm's classifier API for our CIFAR models: global average pool, dropout, `self.fc`."""

    fc: nn.Linear
    num_features: int
    head_drop_rate: float = 0.0

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = F.dropout(x, self.head_drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def cifar_cfg(pool_size: tuple[int, int]) -> dict:
    """A pretrained_cfg for 32x32 inputs taken in [0, 1] (normalisation, if any, is inside the model)."""
    return {
        "num_classes": 10, "input_size": (3, 32, 32), "pool_size": pool_size, "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "first_conv": "conv1",
        "classifier": "fc",
    }


Rule = tuple[str, str | Callable[[re.Match], str]]  # (pattern, replacement) for re.sub on a state-dict key
LAYER_TO_STAGE: Rule = (r"^layer(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.")  # layerN. (from 1) -> stages.N-1.
LINEAR_TO_FC: Rule = (r"^linear\.", "fc.")


def rename_keys(state_dict: dict[str, torch.Tensor], rules: Sequence[Rule], drop: tuple[str, ...] = ()
                ) -> dict[str, torch.Tensor]:
    """A family's `checkpoint_filter_fn` (timm's hook): every key rewritten by `rules` in order; keys starting with
    a `drop` prefix (weights no forward pass uses) are left out."""
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith(drop):
            continue
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed
