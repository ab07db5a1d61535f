"""Replayable augmented views for distillation (function matching, soft-label caches).

A view of image ``i`` is a small parameter vector (pad, crop box, flip, and for mixup the
partner image and lambda) drawn from a generator seeded by ``(seed, view, i, stream)`` only.
Applying the same parameters to the same image gives bit-identical pixels, so a teacher's
outputs can be stored per view and replayed later (FKD, Shen & Xing 2022), and teacher and
student can be given the same or independent crops on purpose (Beyer et al. 2022).

Modes (``distill.view``):

* ``consistent``: teacher and student see the same crop (each resized to its own input size).
* ``independent``: the teacher gets its own, independently drawn crop of the same image.
* ``funmatch``: the same crop, plus mixup with ``lambda ~ U[0, 1]`` against a random partner
  image (its own view); both models see the mixed image; there is no label.
* ``fixed`` (handled by :class:`WithTeacherOutputs`): the teacher's outputs on the centre crop
  are computed once and reused for every augmented student view.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from ..errors import UserError
from .shards import ShardSplit
from .sources import UNLABELED, Source
from .transforms import SMALL_IMAGE, to_unit

# parameter vector layout
PAD, TOP, LEFT, H, W, FLIP, PARTNER, LAM = range(8)
N_PARAMS = 8
NO_PARTNER = -1.0


@dataclass
class ViewSpec:
    """How views are drawn: crop mode ('rrc' Inception-style or 'pad' CIFAR-style), its
    scale / aspect-ratio ranges or padding, flip probability and mixup."""

    size: int
    crop: str = "rrc"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    padding: int = 4
    hflip: float = 0.5
    mix: bool = False

    @classmethod
    def from_data(cls, dc, size: int, native: int, mix: bool = False) -> "ViewSpec":
        crop = dc.crop if dc.crop != "auto" else ("pad" if native <= SMALL_IMAGE else "rrc")
        if crop not in ("rrc", "pad"):
            crop = "pad" if native <= SMALL_IMAGE else "rrc"
        return cls(size, crop, tuple(dc.scale), (3 / 4, 4 / 3), dc.padding, dc.hflip, mix)

    def to_dict(self) -> dict:
        return {"size": self.size, "crop": self.crop, "scale": list(self.scale),
                "ratio": list(self.ratio), "padding": self.padding, "hflip": self.hflip, "mix": self.mix}


def view_generator(seed: int, view: int, index: int, stream: int = 0) -> torch.Generator:
    key = ((seed * 1_000_003 + view) * 10_000_019 + index) * 7 + stream
    return torch.Generator().manual_seed(key % (2**63 - 1))


def sample_view(spec: ViewSpec, height: int, width: int, g: torch.Generator, n_images: int) -> torch.Tensor:
    """One parameter vector for an image of ``height`` x ``width`` (float32: what a cache
    stores, so replay uses exactly the values the teacher saw)."""
    p = torch.zeros(N_PARAMS, dtype=torch.float32)
    u = lambda: float(torch.rand((), generator=g, dtype=torch.float64))  # noqa: E731
    if spec.crop == "pad":
        pad = spec.padding
        p[PAD], p[H], p[W] = pad, height, width
        p[TOP] = int(u() * (2 * pad + 1))
        p[LEFT] = int(u() * (2 * pad + 1))
    else:
        p[[TOP, LEFT, H, W]] = torch.tensor(_inception_box(spec, height, width, u), dtype=torch.float32)
    p[FLIP] = float(u() < spec.hflip)
    p[PARTNER], p[LAM] = NO_PARTNER, 1.0
    if spec.mix and n_images > 1:
        p[PARTNER] = int(u() * n_images)
        p[LAM] = u()
    return p


def _inception_box(spec: ViewSpec, height: int, width: int, u) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box: area in ``scale``, log-uniform aspect ratio, 10 tries, then
    the centre crop clamped to ``ratio``."""
    area = height * width
    log_r = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target = area * (spec.scale[0] + u() * (spec.scale[1] - spec.scale[0]))
        aspect = math.exp(log_r[0] + u() * (log_r[1] - log_r[0]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u() * (height - h + 1))
            left = int(u() * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        h, w = height, int(round(height * spec.ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def apply_view(img: torch.Tensor, p: torch.Tensor, size: int) -> torch.Tensor:
    """The crop of uint8 ``img`` (3, H, W) described by ``p``, at ``size`` x ``size`` (uint8)."""
    pad = int(p[PAD])
    if pad:
        img = TF.pad(img, [pad, pad, pad, pad], fill=0)
    top, left, h, w = (int(p[k]) for k in (TOP, LEFT, H, W))
    out = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    return TF.horizontal_flip(out) if p[FLIP] > 0 else out


def mix(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * a + (1 - lam) * b`` of two uint8 images, as a [0, 1] float image (not rounded
    back to uint8; the models' :class:`Preprocess` takes either)."""
    return to_unit(a).mul(lam).add_(to_unit(b), alpha=1.0 - lam)


class ViewDataset(Dataset):
    """Training images as replayable views; ``set_epoch(e)`` selects view ``e`` (in training,
    ``datasets.EpochItems`` calls it from each item's key, in the process that makes it).

    ``params`` (a callable ``(view, index) -> tensor``) replays stored views (a soft-label
    cache) instead of drawing new ones; ``extras`` adds per-(view, index) entries (e.g. the
    cached teacher outputs) to each sample.
    """

    def __init__(self, source: Source, spec: ViewSpec, seed: int = 0, independent: bool = False,
                 params=None, extras=None, views: int | None = None, with_params: bool = False) -> None:
        if isinstance(source, ShardSplit):
            raise UserError("replayable views (distill.view consistent with a soft-label cache, independent, "
                            "funmatch) read images by index, which streamed wds shards cannot; use "
                            "distill.view=consistent or fixed, or train from a folder")
        self.source, self.spec, self.seed = source, spec, seed
        self.with_params = with_params
        self.independent = independent
        self.params_fn, self.extras = params, extras
        self.views = views  # replay: epoch e uses view e % views
        self.view = 0

    def __len__(self) -> int:
        return len(self.source)

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.views if self.views else epoch

    def params(self, index: int, img: torch.Tensor, stream: int = 0) -> torch.Tensor:
        if self.params_fn is not None and stream == 0:
            return self.params_fn(self.view, index)
        g = view_generator(self.seed, self.view, index, stream)
        return sample_view(self.spec, img.shape[-2], img.shape[-1], g, len(self.source))

    def render(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(image, params) of image ``index`` in the current view; None if unreadable."""
        img = self.source.load(index)
        if img is None:
            return None
        p = self.params(index, img)
        out = apply_view(img, p, self.spec.size)
        partner = int(p[PARTNER])
        if partner >= 0:
            other = self.source.load(partner)
            if other is not None:
                q = self.params(partner, other)
                return mix(out, apply_view(other, q, self.spec.size), float(p[LAM])), p
            return to_unit(out), p
        return out, p

    def __getitem__(self, i: int) -> dict:
        rendered = self.render(i)
        if rendered is None:
            return {"skipped": self.source.describe(i)}
        image, p = rendered
        target = UNLABELED if int(p[PARTNER]) >= 0 else self.source.labels[i]
        sample = {"image": image, "target": target, "index": i}
        if self.independent:
            img = self.source.load(i)
            sample["image_t"] = apply_view(img, self.params(i, img, stream=1), self.spec.size)
        if self.extras is not None:
            sample.update(self.extras(self.view, i))
        if self.with_params:
            sample["params"] = p
        return sample


class WithTeacherOutputs(Dataset):
    """Adds ``t_logits = table[index]`` (precomputed teacher outputs) to each sample."""

    def __init__(self, dataset: Dataset, table: torch.Tensor) -> None:
        self.dataset, self.table = dataset, table
        self.source = getattr(dataset, "source", None)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    def __getitem__(self, i: int) -> dict:
        sample = self.dataset[i]
        if "index" in sample:
            sample["t_logits"] = self.table[sample["index"]]
        return sample
