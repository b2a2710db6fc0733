"""Wide ResNet for 32x32 images (Zagoruyko & Komodakis 2016; the WRN-34-10 of TRADES, MART and AWP)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from sglr_zoo.models.layers import ClassifierHead, InputNormalization, cifar_cfg, cifar_stages, rename_keys


class WideBasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = None if in_chs == out_chs else nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # As in the reference WRN: a projection shortcut takes the pre-activated input.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        out = F.dropout(out, self.drop_rate, self.training)
        return self.conv2(out) + shortcut


class WideResNet(ClassifierHead, nn.Module):
    """WRN-depth-widen with a 3x3 stem; takes [0, 1] images and normalises inside."""

    def __init__(
        self,
        depth: int = 34,
        widen: int = 10,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.num_classes = num_classes
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        block = functools.partial(WideBasicBlock, drop_rate=drop_rate)
        self.stages, self.feature_info = cifar_stages(block, widths[0], (n, n, n), widths[1:])
        self.bn = nn.BatchNorm2d(widths[3])
        self.num_features = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.stages(self.conv1(self.normalize(x)))))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: WideResNet) -> dict[str, torch.Tensor]:
    """Renames the common PyTorch WideResNet layout (`blockN.layer.M...`, `convShortcut`, final `bn1`: TRADES,
    MART, AWP, the SGLR authors' code, RobustBench's WideResNet) to ours; our own layout passes unchanged.

    `sub_block1` weights are dropped: TRADES-era checkpoints carry this block but no forward pass uses it.
    """
    rules = [(r"^block(\d+)\.layer\.", lambda m: f"stages.{int(m.group(1)) - 1}."), (r"\.convShortcut\.", ".shortcut."),
             (r"^bn1\.", "bn.")]
    return rename_keys(state_dict, rules, drop=("sub_block1.",))


def _create_wide_resnet(variant: str, pretrained: bool = False, **kwargs) -> WideResNet:
    return build_model_with_cfg(WideResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    "wrn34_10_cifar.untrained": cifar_cfg((8, 8)),
    "wrn28_10_cifar.untrained": cifar_cfg((8, 8)),
    "wrn_tiny_cifar.untrained": cifar_cfg((8, 8)),
})


@register_model
def wrn34_10_cifar(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-34-10 for CIFAR (46.2M parameters)."""
    return _create_wide_resnet("wrn34_10_cifar", pretrained, depth=34, widen=10, **kwargs)


@register_model
def wrn28_10_cifar(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10 for CIFAR (36.5M parameters)."""
    return _create_wide_resnet("wrn28_10_cifar", pretrained, depth=28, widen=10, **kwargs)


@register_model
def wrn_tiny_cifar(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-10-1: a tiny Wide ResNet for tests."""
    return _create_wide_resnet("wrn_tiny_cifar", pretrained, depth=10, widen=1, **kwargs)
