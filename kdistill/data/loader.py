"""Stage 3 of the data pipeline, how batches are formed: samplers (shuffled and replayable,
distributed, sharded for evaluation, labeled + unlabeled at a set ratio), collation, the
DataLoaders, batch-level mixup, and the list of the unreadable images a run skipped.

Items come from ``datasets`` (the stage below); this module never opens files itself.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import distributed as dist
from ..config import DataConfig
from ..errors import UserError
from ..utils import atomic_write_text
from .datasets import EpochItems, ImageDataset
from .streams import EvalStream, TrainStream, stream_parts


def collate(samples: list[dict]) -> dict:
    """Stack good samples (images, targets, indices and any extra tensors, e.g. a teacher's
    outputs or its own view); unreadable ones are listed under ``"skipped"`` (paths) and
    ``"skipped_why"`` (reasons). Labeled images (target >= 0) come first and
    ``"n_labeled"``, a Python int, counts them, so that nobody has to ask the device (a
    slice, not a boolean mask, picks them)."""
    good = sorted((s for s in samples if "skipped" not in s), key=lambda s: s["target"] < 0)
    bad = [s for s in samples if "skipped" in s]
    batch: dict = {"skipped": [s["skipped"] for s in bad],
                   "skipped_why": [s.get("reason") or "unreadable" for s in bad]}
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
        batch["n_labeled"] = sum(s["target"] >= 0 for s in good)
        batch["target"] = torch.tensor([s["target"] for s in good], dtype=torch.long)
        batch["index"] = torch.tensor([s["index"] for s in good], dtype=torch.long)
        for key in good[0].keys() - {"image", "target", "index"}:
            batch[key] = torch.stack([torch.as_tensor(s[key]) for s in good])
    return batch


class ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``, without padding: each image evaluated once."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(Sampler[tuple[int, int]]):
    """``(index, epoch)`` keys in a shuffled order that is a function of ``(seed, epoch)``
    only, drawn from a generator of its own at each ``iter``: rank ``rank`` takes every
    ``world``-th index of the first ``n // world * world`` (the order of torch's
    ``DistributedSampler(seed=seed, drop_last=True)``), so ranks see disjoint images."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g)[:len(self) * self.world]
        return iter([(i, self.epoch) for i in order[self.rank::self.world].tolist()])

    def __len__(self) -> int:
        return self.n // self.world


class MixedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``batch_size`` with ``round(batch_size * fraction)`` unlabeled images, over
    a :class:`~kdistill.data.datasets.MixedDataset` (labeled indices first).

    An epoch has ``(n_labeled + n_unlabeled) // (batch_size * world)`` batches per process,
    each side cycling through its own shuffled order; the order is a function of
    ``(seed, epoch)`` only, and process ``rank`` takes every ``world``-th batch, so DDP ranks
    see disjoint batches and a resumed run replays the same ones. Batches hold
    ``(index, epoch)`` keys, as :class:`EpochSampler` yields.
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
            yield [(i, self.epoch) for i in torch.cat([lab[b], unl[b]]).tolist()]

    def __len__(self) -> int:
        return self.batches


class EpochLoader:
    """A training DataLoader whose batches are a function of ``(seed, epoch, rank)`` only, so
    a resumed run replays exactly the batches of an uninterrupted one: the sampler draws
    each epoch's order from a generator of its own, and each item's augmentation is seeded
    from ``(seed, epoch, index)`` (:class:`~kdistill.data.datasets.EpochItems`), whatever
    the number of workers and whether they persist.

    With ``unlabeled_fraction`` (a :class:`~kdistill.data.datasets.MixedDataset`), every
    batch holds that share of unlabeled images; otherwise images are drawn uniformly from
    the whole dataset.

    ``persistent``: keep the worker processes from epoch to epoch (their start-up is paid
    once; on CUDA by default). ``dataset`` is the one given (indexed by ints).

    A dataset over WebDataset shards is read as a :class:`~kdistill.data.streams.TrainStream`
    instead (shards planned per ``(seed, epoch, rank, worker)``, the same steps on every
    rank); ``len`` is then its planned steps."""

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, seed: int,
                 pin_memory: bool = False, unlabeled_fraction: float | None = None,
                 persistent: bool = False) -> None:
        self.seed = seed
        self.dataset = dataset
        self.generator = torch.Generator()  # the DataLoader's own draws leave the global RNG alone
        common = dict(num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
                      generator=self.generator, persistent_workers=persistent and workers > 0)
        parts = stream_parts(dataset)
        if parts is not None:
            self.sampler = TrainStream(parts[0], parts[1], batch_size, seed, dist.rank(), dist.world_size(),
                                       workers, unlabeled_fraction, parts[2])
            if len(self.sampler) == 0:
                raise UserError(f"the training shards hold {sum(len(p.split) for p in parts[0])} images, fewer "
                                f"than one batch of {batch_size} per reader ({dist.world_size()} processes x "
                                f"{max(workers, 1)} workers); lower --batch-size or --workers")
            self.loader = DataLoader(self.sampler, batch_size=None, **common)
            return
        items = EpochItems(dataset, seed)
        if unlabeled_fraction is not None:
            self.sampler: Sampler = MixedBatchSampler(
                dataset.n_labeled, len(dataset.unlabeled), batch_size, unlabeled_fraction, seed,
                dist.rank(), dist.world_size())
            self.loader = DataLoader(items, batch_sampler=self.sampler, **common)
            return
        self.sampler = EpochSampler(len(dataset), seed, dist.rank(), dist.world_size())
        if len(self.sampler) < batch_size:  # type: ignore[arg-type]
            raise UserError(f"the training split has {len(dataset)} images, fewer than one batch "
                            f"of {batch_size} per process; lower --batch-size")
        self.loader = DataLoader(items, batch_size=batch_size, sampler=self.sampler,
                                 drop_last=True, **common)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 100_003 + epoch * 1_009 + dist.rank())
        if hasattr(self.dataset, "set_epoch"):  # replayable views, as made in this process
            self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def eval_loader(dataset: ImageDataset, batch_size: int, workers: int,
                pin_memory: bool = False, persistent: bool = False) -> DataLoader:
    """Each image once over the ranks, in order; ``persistent``: keep the workers between
    passes (the val pass of every epoch). Shards: an :class:`~kdistill.data.streams.EvalStream`
    (each sample once over ranks and workers, items keyed by their split index)."""
    parts = stream_parts(dataset)
    if parts is not None:
        stream = EvalStream(parts[0][0].split, parts[1], batch_size, dist.rank(), dist.world_size(),
                            workers, parts[2])
        return DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=collate,
                          pin_memory=pin_memory, persistent_workers=persistent and workers > 0)
    sampler = ShardSampler(len(dataset), dist.rank(), dist.world_size())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory,
                      persistent_workers=persistent and workers > 0)


def make_mixer(cfg: DataConfig, num_classes: int):
    """timm Mixup/CutMix on a device batch (returns soft targets), or None when disabled."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                 label_smoothing=cfg.label_smoothing, num_classes=num_classes)


# ------------------------------------------------------------------ unreadable images


def skipped_in(batch: dict) -> Iterator[tuple[str, str]]:
    """``(path, reason)`` of each unreadable image of a collated batch."""
    paths = batch.get("skipped", [])
    yield from zip(paths, batch.get("skipped_why") or ["unreadable"] * len(paths))


def dropped(data) -> list[tuple[str, str]]:
    """``(path, reason)`` of the images the sources of ``data`` (a loader or dataset, through
    ``.dataset`` wrappers) dropped when decoding into RAM: the loader never sees those."""
    while data is not None:
        if hasattr(data, "dropped"):
            return list(data.dropped)
        if not hasattr(data, "dataset"):
            break
        data = data.dataset
    return list(getattr(getattr(data, "source", None), "bad", None) or [])


class SkipLog:
    """The unreadable images of a run, each listed once in ``path`` (``RUN/skipped.txt``, one
    ``<path>\t<split>\t<reason>`` line per image), rewritten atomically by rank 0 when a new
    one turns up. :meth:`add` gathers every rank's images (call it on every rank)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, tuple[str, str]] = {}

    def start(self, resumed: bool) -> None:
        """A resumed run keeps the images listed before; a new one drops a stale list."""
        if not dist.is_main() or not self.path.is_file():
            return
        if not resumed:
            self.path.unlink()
            return
        for line in self.path.read_text().splitlines():
            path, split, why = (line.split("\t") + ["", ""])[:3]
            self.entries.setdefault(path, (split, why))

    def add(self, split: str, skipped: Iterable[tuple[str, str]]) -> int:
        """Record this rank's ``(path, reason)`` pairs of ``split``; -> how many distinct images
        they are over all ranks."""
        mine = {p: " ".join(why.split()) for p, why in skipped}
        # once per epoch or evaluation, on the host
        met = {p: why for part in dist.all_gather_object(mine) for p, why in part.items()}
        new = {p: (split, why) for p, why in met.items() if p not in self.entries}
        if new:
            self.entries.update(new)
            if dist.is_main():
                atomic_write_text(self.path, "".join(f"{p}\t{s}\t{w}\n" for p, (s, w) in self.entries.items()))
        return len(met)
