"""Build split datasets, per-model preprocessing and (distributed) DataLoaders."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from .. import distributed as dist
from ..config import DataConfig
from ..errors import UserError
from .datasets import (ImageDataset, channel_stats, collate, decode_into_memory, open_source,
                       stratified_subset, want_in_memory)
from .mixed import MixedBatchSampler, MixedDataset
from .sources import UNLABELED, Source, open_unlabeled
from .transforms import Preprocessing, eval_transform, train_transform


@dataclass
class Splits:
    train: Source
    val: Source | None
    native_size: int  # the training images' own (square-ish) size, from the first one
    unlabeled: Source | None = None

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def open_splits(cfg: DataConfig, need_val: bool = True) -> Splits:
    train = open_source(cfg.root, "train", cfg.train, class_map=cfg.class_map)
    val = open_source(cfg.root, "val", cfg.val, train.classes, cfg.class_map, required=need_val)
    if cfg.max_train_images:
        train = stratified_subset(train, cfg.max_train_images)
    if val is not None and cfg.max_val_images:
        val = stratified_subset(val, cfg.max_val_images)
    if cfg.ignore_labels:
        train = Source(train.name, train.classes, [UNLABELED] * len(train), train.paths, train.array, train.bad)
    unlabeled = open_unlabeled(cfg.unlabeled, train.classes) if cfg.unlabeled else None
    train, val, unlabeled = (decode_into_memory(s, cfg.workers) if s is not None and want_in_memory(s, cfg.in_memory)
                             else s for s in (train, val, unlabeled))
    return Splits(train, val, native_size(train), unlabeled)


def native_size(source: Source) -> int:
    for i in range(min(len(source), 16)):
        img = source.load(i)
        if img is not None:
            return int(min(img.shape[-2:]))
    raise UserError(f"none of the first images of split '{source.name}' can be read")


def resolve_preprocessing(cfg: DataConfig, splits: Splits,
                          model_default: Preprocessing | None) -> Preprocessing:
    """Image size: config, else the pretrained model's, else the images' own. Mean/std:
    config, else the pretrained model's, else statistics of the training images."""
    size = cfg.image_size or (model_default.image_size if model_default else splits.native_size)
    if cfg.mean is not None and cfg.std is not None:
        mean, std = cfg.mean, cfg.std
    elif model_default is not None:
        mean, std = model_default.mean, model_default.std
    else:
        mean, std = channel_stats(splits.train)
    crop_pct = cfg.eval_crop_pct if cfg.eval_crop_pct != 1.0 or model_default is None else model_default.crop_pct
    return Preprocessing(size, list(mean), list(std), crop_pct)


def train_dataset(cfg: DataConfig, source: Source, native: int, size: int,
                  unlabeled: Source | None = None) -> Dataset:
    """The augmented training set; with ``unlabeled``, a :class:`MixedDataset` (labeled
    first) whose unlabeled images get the same augmentation."""
    tf = train_transform(size, native, cfg.crop, cfg.scale, cfg.padding, cfg.hflip, cfg.auto_augment)
    if unlabeled is None:
        return ImageDataset(source, tf)
    return MixedDataset(ImageDataset(source, tf), ImageDataset(unlabeled, tf))


def eval_dataset(source: Source, pp: Preprocessing) -> ImageDataset:
    return ImageDataset(source, eval_transform(pp.image_size, pp.crop_pct))


class ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``, without padding: each image evaluated once."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochLoader:
    """A training DataLoader whose shuffling and worker seeds are a function of
    ``(seed, epoch, rank)`` only, so a resumed run replays exactly the same batches.

    With ``unlabeled_fraction`` (a :class:`MixedDataset`), every batch holds that share of
    unlabeled images; otherwise images are drawn uniformly from the whole dataset."""

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, seed: int,
                 pin_memory: bool = False, unlabeled_fraction: float | None = None) -> None:
        self.seed = seed
        self.dataset = dataset
        self.generator = torch.Generator()
        common = dict(num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
                      generator=self.generator, persistent_workers=False)
        if unlabeled_fraction is not None:
            self.sampler: Sampler = MixedBatchSampler(
                dataset.n_labeled, len(dataset.unlabeled), batch_size, unlabeled_fraction, seed,
                dist.rank(), dist.world_size())
            self.loader = DataLoader(dataset, batch_sampler=self.sampler, **common)
            return
        if dist.is_distributed():
            self.sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        else:
            self.sampler = RandomSampler(dataset, generator=self.generator)
        if len(self.sampler) < batch_size:  # type: ignore[arg-type]
            raise UserError(f"the training split has {len(dataset)} images, fewer than one batch "
                            f"of {batch_size} per process; lower --batch-size")
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                 drop_last=True, **common)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 100_003 + epoch * 1_009 + dist.rank())
        if hasattr(self.dataset, "set_epoch"):  # replayable views: one view per epoch
            self.dataset.set_epoch(epoch)
        if isinstance(self.sampler, (DistributedSampler, MixedBatchSampler)):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def eval_loader(dataset: ImageDataset, batch_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    sampler = ShardSampler(len(dataset), dist.rank(), dist.world_size())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory)


def make_mixer(cfg: DataConfig, num_classes: int):
    """timm Mixup/CutMix on a device batch (returns soft targets), or None when disabled."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                 label_smoothing=cfg.label_smoothing, num_classes=num_classes)
