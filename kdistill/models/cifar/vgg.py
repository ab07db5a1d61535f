"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015), in the layout CRD (Tian et al., ICLR 2020) benchmarks.

Five groups of 3x3 conv-BN-ReLU; 2x2 max-pools follow groups 1-3 only, so a 32 px input is seen at
32/16/8/4/4 px (CRD adds a fourth pool only for 64 px inputs), then global average pooling and a
single linear layer. Convs carry no bias (redundant before BN); CRD's biased convs add one
parameter per conv channel (1,472 for vgg8, 2,944 for vgg13), too few to change the rounded counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..zoo import register_model
from .resnet import CifarNet, conv_bn

#: output widths of the convs of each of the five groups
CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}
POOL_AFTER = (0, 1, 2)


class VGG(CifarNet):
    """Stem-less VGG: ``stages[i]`` is a Sequential of conv-BN-ReLU units."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__(num_classes, drop_rate)
        stages, in_ch = [], in_chans
        for widths in cfg:
            units = []
            for width in widths:
                units.append(conv_bn(in_ch, width))
                in_ch = width
            stages.append(nn.Sequential(*units))
        self.stages = nn.ModuleList(stages)
        self._finish(in_ch, [f"stages.{i}.{len(w) - 1}" for i, w in enumerate(cfg)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in POOL_AFTER:
                x = F.max_pool2d(x, 2)
        return x


@register_model("vgg8")
def vgg8(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """VGG-8 with BN: one conv per group (CRD)."""
    return VGG(CONFIGS["vgg8"], num_classes, in_chans, drop_rate)


@register_model("vgg13")
def vgg13(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """VGG-13 with BN (Simonyan & Zisserman configuration B)."""
    return VGG(CONFIGS["vgg13"], num_classes, in_chans, drop_rate)
