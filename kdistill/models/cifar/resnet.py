"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2).

Depth 6n+2 with three stages of BasicBlocks, as benchmarked by CRD (Tian et al., ICLR 2020),
including CRD's wide ``x4`` variants. This module also holds :class:`CifarNet`, the head shared by
every network of the zoo, and the :func:`conv_bn` building block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..zoo import register_model


def conv_bn(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    """Bias-free conv with 'same' padding -> BatchNorm [-> ReLU]."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convs with zero bias; BatchNorm weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CifarNet(nn.Module):
    """Common skeleton: ``forward_features`` (subclass) then ``forward_head`` (GAP, dropout, fc).

    A subclass builds its body, then calls :meth:`_finish` with the width of its last feature map
    and ``feature_modules``: the dotted names of each stage's last block, shallow to deep, whose
    outputs feature-distillation methods capture with forward hooks.
    """

    num_classes: int
    feature_modules: list[str]

    def __init__(self, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate

    def _finish(self, num_features: int, feature_modules: list[str]) -> None:
        self.num_features = num_features
        self.fc = nn.Linear(num_features, self.num_classes)
        names = {name for name, _ in self.named_modules()}
        missing = [n for n in feature_modules if n not in names]
        if missing:
            raise ValueError(f"{type(self).__name__}: unknown feature modules {missing}")
        self.feature_modules = list(feature_modules)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (B, C, H, W), before pooling."""
        raise NotImplementedError

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """Global average pool, dropout (``drop_rate`` > 0), linear classifier."""
        x = torch.flatten(F.adaptive_avg_pool2d(feats, 1), 1)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised ``num_classes``-way one."""
        old = self.fc
        self.num_classes = num_classes
        self.fc = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)


class BasicBlock(nn.Module):
    """Post-activation residual block: 3x3-BN-ReLU-3x3-BN + shortcut, ReLU.

    The shortcut is a 1x1 conv + BN when the stride or width changes (CRD's option B).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_ch, out_ch, 3, stride)
        self.conv2 = conv_bn(out_ch, out_ch, 3, act=False)
        self.shortcut: nn.Module = (conv_bn(in_ch, out_ch, 1, stride, act=False)
                                    if stride != 1 or in_ch != out_ch else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(CifarNet):
    """3x3 stem of ``widths[0]`` channels, then three stages of n = (depth-2)/6 blocks of widths
    ``widths[1:]`` at strides 1, 2, 2."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 10,
                 in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__(num_classes, drop_rate)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.stem = conv_bn(in_chans, widths[0])
        in_ch = widths[0]
        for i, width in enumerate(widths[1:], start=1):
            stride = 1 if i == 1 else 2
            blocks = [BasicBlock(in_ch if j == 0 else width, width, stride if j == 0 else 1)
                      for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_ch = width
        self._finish(widths[-1], [f"layer{i}.{n - 1}" for i in (1, 2, 3)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


_PLAIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)  # CRD's "x4": 4x the stage widths, 2x the stem width


@register_model("resnet8")
def resnet8(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """ResNet-8 for CIFAR (He et al. 2016)."""
    return ResNet(8, _PLAIN, num_classes, in_chans, drop_rate)


@register_model("resnet14")
def resnet14(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """ResNet-14 for CIFAR (He et al. 2016)."""
    return ResNet(14, _PLAIN, num_classes, in_chans, drop_rate)


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """ResNet-20 for CIFAR (He et al. 2016)."""
    return ResNet(20, _PLAIN, num_classes, in_chans, drop_rate)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """ResNet-32 for CIFAR (He et al. 2016)."""
    return ResNet(32, _PLAIN, num_classes, in_chans, drop_rate)


@register_model("resnet44")
def resnet44(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """ResNet-44 for CIFAR (He et al. 2016)."""
    return ResNet(44, _PLAIN, num_classes, in_chans, drop_rate)


@register_model("resnet56")
def resnet56(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """ResNet-56 for CIFAR (He et al. 2016)."""
    return ResNet(56, _PLAIN, num_classes, in_chans, drop_rate)


@register_model("resnet110")
def resnet110(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """ResNet-110 for CIFAR (He et al. 2016)."""
    return ResNet(110, _PLAIN, num_classes, in_chans, drop_rate)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """ResNet-8x4, CRD's wide ResNet-8 (Tian et al. 2020)."""
    return ResNet(8, _WIDE, num_classes, in_chans, drop_rate)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """ResNet-32x4, CRD's wide ResNet-32 (Tian et al. 2020)."""
    return ResNet(32, _WIDE, num_classes, in_chans, drop_rate)
