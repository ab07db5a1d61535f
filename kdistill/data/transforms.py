"""Augmentation (torchvision transforms v2 on uint8 tensors), its seeding per item, and
per-model preprocessing.

Loaders yield uint8 crops at the training resolution; each model then applies its own
:class:`Preprocess` on the device (scale to [0, 1], resize if it runs at another
resolution, normalise with its mean/std). Teacher and student therefore see the very same
crop, each at its own resolution and normalisation.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

SMALL_IMAGE = 64  # at or below this size, 'auto' crop means pad-and-crop (CIFAR style)


@dataclass
class Preprocessing:
    """What a model expects: recorded in every checkpoint so eval/export need nothing else."""

    image_size: int
    mean: list[float]
    std: list[float]
    crop_pct: float = 1.0  # evaluation: resize to image_size / crop_pct, centre-crop

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "crop_pct": self.crop_pct}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["image_size"]), [float(v) for v in d["mean"]], [float(v) for v in d["std"]],
                   float(d.get("crop_pct", 1.0)))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Pixel scaling, decided here alone: uint8 0..255 -> float [0, 1]; floats are taken to
    be [0, 1] already. Batches stay uint8 until a model's :class:`Preprocess` (or a batch
    mixer, which needs floats) calls this."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


class Preprocess(nn.Module):
    """uint8 or [0, 1] float (B, 3, H, W) -> normalised float at the model's resolution."""

    def __init__(self, pp: Preprocessing, channels_last: bool = False) -> None:
        super().__init__()
        self.size = pp.image_size
        self.channels_last = channels_last
        self.register_buffer("mean", torch.tensor(pp.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pp.std).view(1, 3, 1, 1), persistent=False)

    def resized(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] float at the model's resolution, not normalised (an exported graph's input)."""
        x = to_unit(x)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.size)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (self.resized(x) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class ResizeCenterCrop(nn.Module):
    """Resize the short side to ``size / crop_pct`` and centre-crop ``size`` (no-op if already
    ``size`` x ``size`` and ``crop_pct == 1``)."""

    def __init__(self, size: int, crop_pct: float = 1.0) -> None:
        super().__init__()
        self.size = size
        self.resize = int(math.floor(size / crop_pct))
        self.ops = v2.Compose([v2.Resize(self.resize, antialias=True), v2.CenterCrop(size)])

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[-2:] == (self.size, self.size) and self.resize == self.size:
            return img
        return self.ops(img)


def train_transform(size: int, native: int, crop: str = "auto", scale=(0.08, 1.0), padding: int = 4,
                    hflip: float = 0.5, auto_augment: str = "none") -> v2.Compose:
    """uint8 CHW -> augmented uint8 CHW at ``size``; ``native`` is the images' own size."""
    if crop == "auto":
        crop = "pad" if native <= SMALL_IMAGE else "rrc"
    ops: list[nn.Module] = []
    if crop == "rrc":
        ops.append(v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True))
    else:
        if native != size:
            ops.append(ResizeCenterCrop(size))
        if crop == "pad" and padding > 0:
            ops.append(v2.RandomCrop(size, padding=padding))
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if auto_augment == "autoaugment":
        policy = v2.AutoAugmentPolicy.CIFAR10 if size <= SMALL_IMAGE else v2.AutoAugmentPolicy.IMAGENET
        ops.append(v2.AutoAugment(policy))
    elif auto_augment == "randaugment":
        ops.append(v2.RandAugment())
    elif auto_augment == "trivialaugment":
        ops.append(v2.TrivialAugmentWide())
    return v2.Compose(ops)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index``'s augmentation in ``epoch``: a hash of the three (63 bits),
    so that nearby keys share no random stream."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_rngs(seed: int) -> None:
    """Seed the streams transforms draw from: torch's CPU generator, ``random``, NumPy's."""
    import numpy as np

    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def kept_rngs():
    """Outside a DataLoader worker, restore those streams after the block, so that dropout
    or mixup in the training process do not depend on where items were made."""
    import numpy as np
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:
        yield
        return
    saved = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.default_generator.set_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


def eval_transform(size: int, crop_pct: float = 1.0) -> nn.Module:
    return ResizeCenterCrop(size, crop_pct)


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Test-time views of a [0, 1] batch: identity, horizontal flip, and four copies shifted
    diagonally by ``d = max(1, round(side / 16))`` pixels (2 px at 32 px), zero-filled, as
    pad-and-crop training shifts them. Translations, not zoomed corner crops: on CIFAR-10
    (resnet56, val) zoomed crops of the centre crop scored 6-8 points below the plain image
    each and pulled the average down by 1.8 points, shifts by 2 px lift it by 1.1."""
    h, w = x.shape[-2:]
    d = max(1, round(min(h, w) / 16))
    padded = F.pad(x, (d, d, d, d))
    shifts = [padded[..., d + dy:d + dy + h, d + dx:d + dx + w] for dy in (-d, d) for dx in (-d, d)]
    return [x, x.flip(-1), *shifts]
