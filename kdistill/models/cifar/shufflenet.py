"""ShuffleNet V1 (Zhang et al., CVPR 2018) and V2 (Ma et al., ECCV 2018) for CIFAR, in the
variants CRD (Tian et al., ICLR 2020) benchmarks: 32 px input, three stride-2 stages (32->16->8->4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..zoo import register_model
from .resnet import CifarNet, conv_bn


class ChannelShuffle(nn.Module):
    """Interleave the channels of ``groups`` groups (ShuffleNet's channel shuffle)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Unit(nn.Module):
    """Group 1x1 conv, shuffle, 3x3 depthwise, group 1x1 conv, plus shortcut.

    At stride 2 the shortcut is a 3x3 average pool concatenated to the branch, so the branch
    produces ``out_ch - in_ch`` channels. ``first_groups`` is 1 right after the narrow stem, where
    the paper skips group convolution. The ReLU after the depthwise conv follows CRD.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int,
                 first_groups: int) -> None:
        super().__init__()
        branch_ch = out_ch - in_ch if stride == 2 else out_ch
        mid = branch_ch // 4
        self.stride = stride
        self.branch = nn.Sequential(
            conv_bn(in_ch, mid, 1, groups=first_groups),
            ChannelShuffle(first_groups),
            conv_bn(mid, mid, 3, stride, groups=mid),
            conv_bn(mid, branch_ch, 1, groups=groups, act=False),
        )
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, short = self.branch(x), self.shortcut(x)
        return F.relu(torch.cat([out, short], 1) if self.stride == 2 else out + short)


class ShuffleV2Unit(nn.Module):
    """Stride 1: split the channels in half, transform one half, concatenate, shuffle."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        half = ch // 2
        self.branch = nn.Sequential(conv_bn(half, half, 1),
                                    conv_bn(half, half, 3, groups=half, act=False),
                                    conv_bn(half, half, 1))
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, change = x.chunk(2, dim=1)
        return self.shuffle(torch.cat([keep, self.branch(change)], 1))


class ShuffleV2Down(nn.Module):
    """Stride 2: both branches see the whole input and give ``out_ch / 2`` channels each."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        self.left = nn.Sequential(conv_bn(in_ch, in_ch, 3, 2, groups=in_ch, act=False),
                                  conv_bn(in_ch, mid, 1))
        self.right = nn.Sequential(conv_bn(in_ch, mid, 1),
                                   conv_bn(mid, mid, 3, 2, groups=mid, act=False),
                                   conv_bn(mid, mid, 1))
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNet(CifarNet):
    """Stem conv to 24 channels, three stride-2 stages ``layer1..3``, optional 1x1 head conv."""

    def __init__(self, version: int, widths: tuple[int, int, int], blocks: tuple[int, int, int],
                 num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
                 groups: int = 3, head_ch: int = 0) -> None:
        super().__init__(num_classes, drop_rate)
        # CRD's V1 stem is a 1x1 conv, its V2 stem a 3x3 conv (both stride 1, then BN-ReLU)
        self.stem = conv_bn(in_chans, 24, 1 if version == 1 else 3)
        in_ch = 24
        for i, (width, n) in enumerate(zip(widths, blocks), start=1):
            if version == 1:
                units = [ShuffleV1Unit(in_ch if j == 0 else width, width, 2 if j == 0 else 1,
                                       groups, 1 if in_ch == 24 and j == 0 else groups)
                         for j in range(n)]
            else:  # a downsampling unit, then n stride-1 units
                units = [ShuffleV2Down(in_ch, width)] + [ShuffleV2Unit(width) for _ in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*units))
            in_ch = width
        names = [f"layer{i}.{len(getattr(self, f'layer{i}')) - 1}" for i in (1, 2, 3)]
        self.conv_head = conv_bn(in_ch, head_ch, 1) if head_ch else nn.Identity()
        self._finish(head_ch or in_ch, names)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.layer3(self.layer2(self.layer1(self.stem(x)))))


@register_model("shufflenetv1")
def shufflenetv1(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """ShuffleNet V1, groups 3, widths 240/480/960, 4/8/4 units (CRD's ``ShuffleV1``)."""
    return ShuffleNet(1, (240, 480, 960), (4, 8, 4), num_classes, in_chans, drop_rate, groups=3)


@register_model("shufflenetv2")
def shufflenetv2(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """ShuffleNet V2 1x: widths 116/232/464, 3/7/3 stride-1 units, 1024-ch head (CRD's
    ``ShuffleV2``)."""
    return ShuffleNet(2, (116, 232, 464), (3, 7, 3), num_classes, in_chans, drop_rate, head_ch=1024)
