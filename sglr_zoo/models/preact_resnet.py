"""PreAct ResNet for 32x32 images (He et al. 2016; the PreActResNet-18 of Rice et al. 2020 and AWP)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from sglr_zoo.models.layers import (
    LAYER_TO_STAGE,
    LINEAR_TO_FC,
    ClassifierHead,
    InputNormalization,
    cifar_cfg,
    cifar_stages,
    rename_keys,
)


class PreActBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(ClassifierHead, nn.Module):
    """PreAct ResNet with a 3x3 stem and no max-pool; takes [0, 1] images and normalises inside."""

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.head_drop_rate = drop_rate
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.stages, self.feature_info = cifar_stages(PreActBlock, widths[0], layers, widths)
        self.num_features = self.feature_info[-1]["num_chs"]
        self.bn = nn.BatchNorm2d(self.num_features)
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.stages(self.conv1(self.normalize(x)))))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: PreActResNet) -> dict[str, torch.Tensor]:
    """Renames the common PyTorch CIFAR PreActResNet layout (`layerN.M...`, `shortcut.0`, `linear`: kuangliu's
    pytorch-cifar, the SGLR authors' code, Rice et al.) to ours; our own layout passes unchanged.

    Only layouts with the final `bn` and a shortcut on the pre-activated input compute what ours computes;
    RobustBench's default PreActResNet (no final `bn`) fails the strict load on the missing `bn.weight`.
    """
    return rename_keys(state_dict, [LAYER_TO_STAGE, (r"\.shortcut\.0\.", ".shortcut."), LINEAR_TO_FC])


def _create_preact_resnet(variant: str, pretrained: bool = False, **kwargs) -> PreActResNet:
    return build_model_with_cfg(PreActResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    "preactresnet18_cifar.untrained": cifar_cfg((4, 4)),
    "preactresnet10_slim_cifar.untrained": cifar_cfg((4, 4)),
    "preactresnet10_quarter_cifar.untrained": cifar_cfg((4, 4)),
    "preactresnet_tiny_cifar.untrained": cifar_cfg((4, 4)),
})


@register_model
def preactresnet18_cifar(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreActResNet-18 for CIFAR (11.2M parameters)."""
    return _create_preact_resnet("preactresnet18_cifar", pretrained, layers=(2, 2, 2, 2), **kwargs)


@register_model
def preactresnet10_slim_cifar(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreActResNet-10 at half width (1.2M parameters): the CPU quickstart model."""
    return _create_preact_resnet(
        "preactresnet10_slim_cifar", pretrained, layers=(1, 1, 1, 1), widths=(32, 64, 128, 256), **kwargs)


@register_model
def preactresnet10_quarter_cifar(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreActResNet-10 at quarter width (0.31M parameters): about 2.5x the slim one's throughput on a CPU."""
    return _create_preact_resnet(
        "preactresnet10_quarter_cifar", pretrained, layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), **kwargs)


@register_model
def preactresnet_tiny_cifar(pretrained: bool = False, **kwargs) -> PreActResNet:
    """A tiny PreAct ResNet for tests."""
    return _create_preact_resnet(
        "preactresnet_tiny_cifar", pretrained, layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), **kwargs)
