"""Build split datasets, per-model preprocessing and (distributed) DataLoaders."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from ..config import DataConfig
from ..errors import UserError
from ..engine import distributed as dist
from .datasets import (ImageDataset, channel_stats, collate, decode_into_memory, open_source,
                       stratified_subset, want_in_memory)
from .sources import Source
from .transforms import Preprocessing, eval_transform, train_transform


@dataclass
class Splits:
    train: Source
    val: Source | None
    native_size: int  # the training images' own (square-ish) size, from the first one

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
    if want_in_memory(train, cfg.in_memory):
        train = decode_into_memory(train, cfg.workers)
    if val is not None and want_in_memory(val, cfg.in_memory):
        val = decode_into_memory(val, cfg.workers)
    return Splits(train, val, native_size(train))


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


def train_dataset(cfg: DataConfig, source: Source, native: int, size: int) -> ImageDataset:
    tf = train_transform(size, native, cfg.crop, cfg.scale, cfg.padding, cfg.hflip, cfg.auto_augment)
    return ImageDataset(source, tf)


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
    ``(seed, epoch, rank)`` only, so a resumed run replays exactly the same batches."""

    def __init__(self, dataset: ImageDataset, batch_size: int, workers: int, seed: int,
                 pin_memory: bool = False) -> None:
        self.seed = seed
        self.dataset = dataset
        self.generator = torch.Generator()
        if dist.is_distributed():
            self.sampler: Sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        else:
            self.sampler = RandomSampler(dataset, generator=self.generator)
        if len(self.sampler) < batch_size:  # type: ignore[arg-type]
            raise UserError(f"the training split has {len(dataset)} images, fewer than one batch "
                            f"of {batch_size} per process; lower --batch-size")
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                 num_workers=workers, collate_fn=collate, drop_last=True,
                                 pin_memory=pin_memory, generator=self.generator,
                                 persistent_workers=False)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 100_003 + epoch * 1_009 + dist.rank())
        if isinstance(self.sampler, DistributedSampler):
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
