"""Labeled + unlabeled training data (SSLD): one dataset, batches at a set unlabeled ratio.

Unlabeled images carry the target ``UNLABELED`` (-1); label-free loss terms use every
image, label terms (``ce``) only the labeled ones.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, Sampler

from .datasets import ImageDataset


class MixedDataset(Dataset):
    """``labeled`` then ``unlabeled``: index ``i >= len(labeled)`` is unlabeled image
    ``i - len(labeled)``; the sample's ``index`` is the global one."""

    def __init__(self, labeled: ImageDataset, unlabeled: ImageDataset) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled
        self.n_labeled = len(labeled)
        self.source = labeled.source  # for reporting unreadable files

    def __len__(self) -> int:
        return self.n_labeled + len(self.unlabeled)

    @property
    def classes(self) -> list[str]:
        return self.labeled.classes

    def __getitem__(self, i: int) -> dict:
        if i < self.n_labeled:
            return self.labeled[i]
        sample = self.unlabeled[i - self.n_labeled]
        if "index" in sample:
            sample["index"] = i
        return sample


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` with ``round(batch_size * fraction)`` unlabeled images.

    An epoch has ``(n_labeled + n_unlabeled) // (batch_size * world)`` batches per process,
    each side cycling through its own shuffled order; the order is a function of
    ``(seed, epoch)`` only, and process ``rank`` takes every ``world``-th batch, so DDP ranks
    see disjoint batches and a resumed run replays the same ones.
    """

    def __init__(self, n_labeled: int, n_unlabeled: int, batch_size: int, fraction: float,
                 seed: int, rank: int = 0, world: int = 1) -> None:
        self.n_l, self.n_u = n_labeled, n_unlabeled
        self.b_u = min(max(round(batch_size * fraction), 1 if fraction > 0 else 0), batch_size)
        self.b_l = batch_size - self.b_u
        if (self.b_l and not n_labeled) or (self.b_u and not n_unlabeled):
            raise ValueError("a side of the mix is empty")
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch = 0
        self.batches = max((n_labeled + n_unlabeled) // (batch_size * world), 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _stream(self, n: int, offset: int, count: int, g: torch.Generator) -> torch.Tensor:
        reps = math.ceil(count / n) if n else 0
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)]) if reps else torch.empty(0, dtype=torch.long)
        return order[:count] + offset

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch * 1_009)
        total = self.batches * self.world
        lab = self._stream(self.n_l, 0, total * self.b_l, g).view(total, self.b_l)
        unl = self._stream(self.n_u, self.n_l, total * self.b_u, g).view(total, self.b_u)
        for b in range(self.rank, total, self.world):
            yield torch.cat([lab[b], unl[b]]).tolist()

    def __len__(self) -> int:
        return self.batches
