"""The CIFAR ResNet-18 of the SGLR authors' code (kuangliu style: 3x3 stem, no max-pool)."""

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


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(ClassifierHead, nn.Module):
    """ResNet with a 3x3 stride-1 stem and no max-pool; takes [0, 1] images and normalises inside."""

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
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.stages, self.feature_info = cifar_stages(BasicBlock, widths[0], layers, widths)
        self.num_features = self.feature_info[-1]["num_chs"]
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(F.relu(self.bn1(self.conv1(self.normalize(x)))))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: CifarResNet) -> dict[str, torch.Tensor]:
    """Renames the common PyTorch CIFAR ResNet layout (`layerN.M...`, `linear`: kuangliu's pytorch-cifar, the
    SGLR authors' code, RobustBench's ResNet18) to ours; our own layout passes unchanged."""
    return rename_keys(state_dict, [LAYER_TO_STAGE, LINEAR_TO_FC])


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    "resnet18_cifar.untrained": cifar_cfg((4, 4)),
    "resnet_tiny_cifar.untrained": cifar_cfg((4, 4)),
})


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-18 for CIFAR as in the SGLR authors' code (11.2M parameters)."""
    return _create_cifar_resnet("resnet18_cifar", pretrained, layers=(2, 2, 2, 2), **kwargs)


@register_model
def resnet_tiny_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """A tiny CIFAR ResNet for tests."""
    return _create_cifar_resnet("resnet_tiny_cifar", pretrained, layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), **kwargs)
