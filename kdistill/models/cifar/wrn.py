"""Wide ResNets (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016), WRN-d-k for CIFAR.

Pre-activation wide basic blocks in three stages of widths 16k, 32k, 64k, n = (d-4)/6 blocks each,
as benchmarked by CRD (Tian et al., ICLR 2020).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..zoo import register_model
from .resnet import CifarNet


class WideBlock(nn.Module):
    """BN-ReLU-3x3-BN-ReLU-3x3 plus shortcut; a 1x1 conv of the pre-activated input when the shape
    changes, the raw input otherwise."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
                         if stride != 1 or in_ch != out_ch else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(CifarNet):
    """WRN-``depth``-``widen``: 3x3 stem (16 ch), three stages at strides 1, 2, 2, final BN-ReLU."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__(num_classes, drop_rate)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        in_ch = 16
        for i, base in enumerate((16, 32, 64), start=1):
            width, stride = base * widen, 1 if i == 1 else 2
            blocks = [WideBlock(in_ch if j == 0 else width, width, stride if j == 0 else 1)
                      for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_ch = width
        self.bn = nn.BatchNorm2d(in_ch)
        self._finish(in_ch, [f"layer{i}.{n - 1}" for i in (1, 2, 3)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return F.relu(self.bn(x))


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-16-1 (Zagoruyko & Komodakis 2016)."""
    return WideResNet(16, 1, num_classes, in_chans, drop_rate)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-16-2 (Zagoruyko & Komodakis 2016)."""
    return WideResNet(16, 2, num_classes, in_chans, drop_rate)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-40-1 (Zagoruyko & Komodakis 2016)."""
    return WideResNet(40, 1, num_classes, in_chans, drop_rate)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-40-2 (Zagoruyko & Komodakis 2016)."""
    return WideResNet(40, 2, num_classes, in_chans, drop_rate)
