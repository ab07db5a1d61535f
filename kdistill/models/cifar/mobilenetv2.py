"""MobileNetV2 for CIFAR (Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018), as in CRD (Tian et al., ICLR 2020).

CIFAR strides: the stem keeps stride 2 but the second block group runs at stride 1, so a 32 px
input ends at 2x2 (ImageNet strides would give 1x1). ``mobilenetv2`` is CRD's ``mobile_half``
(width 0.5). Like CRD, every block has its 1x1 expansion conv, also at expansion 1.
"""
from __future__ import annotations

import torch
from torch import nn

from ..zoo import register_model
from .resnet import CifarNet, conv_bn

#: (expansion t, output channels c, blocks n, first stride s) per block group
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 linear projection-BN; identity shortcut
    when the shape is kept."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_shortcut = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            conv_bn(in_ch, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_ch, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class MobileNetV2(CifarNet):
    """Stem (3x3, stride 2), seven inverted-residual groups ``blocks[i]``, 1x1 conv to 1280."""

    def __init__(self, width_mult: float = 1.0, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__(num_classes, drop_rate)
        in_ch = int(32 * width_mult)
        self.stem = conv_bn(in_chans, in_ch, 3, stride=2)
        groups = []
        for t, c, n, s in SETTINGS:
            out_ch = int(c * width_mult)
            groups.append(nn.Sequential(*[
                InvertedResidual(in_ch if j == 0 else out_ch, out_ch, s if j == 0 else 1, t)
                for j in range(n)]))
            in_ch = out_ch
        self.blocks = nn.Sequential(*groups)
        last_ch = max(1280, 8 * round(1280 * width_mult / 8))
        self.conv_head = conv_bn(in_ch, last_ch, 1)
        # a stage = the groups at one resolution; its last block ends the last such group
        ends = [i for i in range(len(SETTINGS)) if i + 1 == len(SETTINGS) or SETTINGS[i + 1][3] > 1]
        self._finish(last_ch, [f"blocks.{i}.{SETTINGS[i][2] - 1}" for i in ends])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.blocks(self.stem(x)))


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """MobileNetV2 at width 0.5 (CRD's ``mobile_half``)."""
    return MobileNetV2(0.5, num_classes, in_chans, drop_rate)


@register_model("mobilenetv2_w1")
def mobilenetv2_w1(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """MobileNetV2 at width 1.0 with CIFAR strides."""
    return MobileNetV2(1.0, num_classes, in_chans, drop_rate)
