"""Stage 2 of the data pipeline, how an item is made: the splits a config opens (decoded
once into RAM when small), the preprocessing they resolve to, and the Datasets that turn
an index into ``{"image", "target", "index"}``.

Files come from ``sources`` (the stage below), WebDataset shards from ``shards``
(``wds:`` specs open as a :class:`~kdistill.data.shards.ShardSplit`, which is streamed by
``streams``, never indexed nor decoded into RAM); batches are formed by ``loader`` (the
stage above), which this module does not import. ``views`` (replayable views) and
``softlabels`` (a cache of teacher outputs per view) make items at this level too.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from ..errors import UserError
from ..images import read_image
from .shards import ShardError, ShardSplit, is_wds, open_wds
from .sources import UNLABELED, Source, open_source, open_unlabeled, stratified_subset, unreadable_reason
from .transforms import Preprocessing, eval_transform, item_seed, kept_rngs, seed_rngs, train_transform

IN_MEMORY_AUTO_BYTES = 3 * 2**30  # decode into RAM when the split fits in this


# ------------------------------------------------------------------ the splits of a config


@dataclass
class Splits:
    """A config's splits: file :class:`Source` s, or :class:`ShardSplit` s for ``wds:`` data
    (streamed, never decoded into RAM)."""

    train: Source | ShardSplit
    val: Source | ShardSplit | None
    native_size: int  # the training images' own (square-ish) size, from the first one
    unlabeled: Source | ShardSplit | None = None

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def open_split(cfg: DataConfig, split: str, classes: list[str] | None = None,
               required: bool = True) -> Source | ShardSplit | None:
    """Split ``split`` of ``cfg`` (``cfg.<split>``, else from ``cfg.root``): WebDataset shards
    for a ``wds:`` spec, else a folder, list file or Fashion-MNIST."""
    explicit = getattr(cfg, split, None)
    spec = explicit or cfg.root
    if is_wds(spec):
        opened = open_wds(spec, split, classes, cfg.image_key, cfg.label_key)
        if opened is None and required:
            raise UserError(f"'{spec}' has no {split} shards ({split}-*.tar or an entry in _info.json); "
                            f"pass them with -o data.{split}=wds:PATTERN")
        return opened
    return open_source(cfg.root, split, explicit, classes, cfg.class_map, required=required,
                       image_key=cfg.image_key, label_key=cfg.label_key)


def open_eval_split(root: str, split: str, classes: list[str], image_key: str | None = None,
                    label_key: str | None = None) -> Source | ShardSplit:
    """The split ``kdistill eval`` / ``report`` / export parity read: shards for ``wds:``."""
    if is_wds(root):
        opened = open_wds(root, split, classes, image_key, label_key or "cls")
        if opened is None:
            raise UserError(f"'{root}' has no {split} shards ({split}-*.tar or an entry in _info.json)")
        return opened
    return open_source(root, split, classes=classes, image_key=image_key, label_key=label_key)


def open_unlabeled_split(spec: str, classes: list[str], cfg: DataConfig | None = None) -> Source | ShardSplit:
    """``data.unlabeled``: a folder or list file, or ``wds:DIR`` (its split 'unlabeled', else
    'train'; labels ignored) or ``wds:PATTERN``."""
    if not is_wds(spec):
        return open_unlabeled(spec, classes, image_key=cfg.image_key if cfg else None)
    keys = dict(image_key=cfg.image_key if cfg else None, labeled=False)
    opened = open_wds(spec, "unlabeled", classes, **keys) or open_wds(spec, "train", classes, **keys)
    if opened is None:
        raise UserError(f"unlabeled shards '{spec}' hold no unlabeled-*.tar nor train-*.tar")
    return opened


def open_splits(cfg: DataConfig, need_val: bool = True) -> Splits:
    """The train / val (/ unlabeled) sources of ``cfg``: subsets, ``ignore_labels`` (every
    training target ``UNLABELED``) and decoding into RAM applied."""
    train = open_split(cfg, "train")
    val = open_split(cfg, "val", train.classes, required=need_val)
    if cfg.max_train_images:
        train = _subset(train, cfg.max_train_images, "data.max_train_images")
    if val is not None and cfg.max_val_images:
        val = _subset(val, cfg.max_val_images, "data.max_val_images")
    if val is not None:
        first_readable(val)  # a val list whose paths all miss fails here, not as NaN accuracy
    if cfg.ignore_labels:
        train = (dataclasses.replace(train, label_key=None) if isinstance(train, ShardSplit)
                 else dataclasses.replace(train, labels=[UNLABELED] * len(train)))
    unlabeled = open_unlabeled_split(cfg.unlabeled, train.classes, cfg) if cfg.unlabeled else None
    workers = cfg.num_workers(torch.cuda.is_available())
    train, val, unlabeled = (decode_into_memory(s, workers) if s is not None and want_in_memory(s, cfg.in_memory)
                             else s for s in (train, val, unlabeled))
    return Splits(train, val, native_size(train), unlabeled)


def _subset(source: Source | ShardSplit, n: int, key: str) -> Source | ShardSplit:
    if isinstance(source, ShardSplit):
        if n >= len(source):
            return source
        raise UserError(f"{key}={n} picks images at random, which shards cannot do; name fewer shards "
                        "instead (-o data.train=wds:DIR/train-{000000..000009}.tar)")
    return stratified_subset(source, n)


def shard_images(split: ShardSplit, n: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(index, uint8 image)`` of the first ``n`` readable samples of ``split``, in shard
    order (broken shards and unreadable samples are passed over)."""
    count = 0
    for k in range(len(split.urls)):
        try:
            for sample in split.samples(k):
                if sample.error or sample.data is None:
                    continue
                try:
                    img = read_image(sample.data)
                except Exception:  # noqa: BLE001
                    continue
                yield sample.index, img
                count += 1
                if n is not None and count >= n:
                    return
        except ShardError:
            continue


class IndexedShards:
    """A few images of a shard split by index, as a :class:`Source` gives them (``load``,
    ``describe``, ``labels``, ``classes``): each ``load`` reads the image's tar up to it, so
    this is for a handful of images (the report's grid), never for training."""

    def __init__(self, split: ShardSplit) -> None:
        self.split, self.classes = split, split.classes
        self.labels = split_labels(split)

    def __len__(self) -> int:
        return len(self.split)

    def _sample(self, i: int):
        k = bisect.bisect_right(self.split.offsets, i) - 1
        try:
            return next((s for s in self.split.samples(k) if s.index == i), None)
        except ShardError:
            return None

    def load(self, i: int) -> torch.Tensor | None:
        sample = self._sample(i)
        if sample is None or sample.error or sample.data is None:
            return None
        try:
            return read_image(sample.data)
        except Exception:  # noqa: BLE001  (PIL raises many kinds on corrupt bytes)
            return None

    def describe(self, i: int) -> str:
        k = bisect.bisect_right(self.split.offsets, i) - 1
        return f"{self.split.urls[k]}[{i - self.split.offsets[k]}]"


def split_labels(source: Source | ShardSplit) -> list[int]:
    """Every image's label in index order (shards: read once, label members only; an
    unreadable sample or one past a truncation gets ``UNLABELED``)."""
    if not isinstance(source, ShardSplit):
        return list(source.labels)
    labels = [UNLABELED] * len(source)
    for k in range(len(source.urls)):
        try:
            for sample in source.samples(k):
                if sample.label is not None and sample.index < len(labels):
                    labels[sample.index] = sample.label
        except ShardError:
            continue
    return labels


def native_size(source: Source | ShardSplit) -> int:
    return int(min(first_readable(source).shape[-2:]))


def first_readable(source: Source | ShardSplit, n: int = 16) -> torch.Tensor:
    """The first readable one of the first ``n`` images, else a :class:`UserError` that says
    where they were looked for and why the first failed."""
    if isinstance(source, ShardSplit):
        for _, img in shard_images(source, 1):
            return img
        raise UserError(f"no image of split '{source.name}' can be read: {source.where()}; check "
                        "data.image_key and the shards")
    why = ""
    for i in range(min(len(source), n)):
        img, reason = source.read(i)
        if img is not None:
            return img
        why = why or reason
    raise UserError(f"none of the first {min(len(source), n)} images of split '{source.name}' can be "
                    f"read: {source.where(why)}")


def want_in_memory(source: Source | ShardSplit, mode: str) -> bool:
    if isinstance(source, ShardSplit):  # streamed: data that needs shards does not fit in RAM
        return False
    if source.in_memory or mode == "no":
        return False
    if mode == "yes":
        return True
    for i in range(min(len(source), 8)):  # estimate from the first readable image
        img = source.load(i)
        if img is not None:
            return img.numel() * len(source) <= IN_MEMORY_AUTO_BYTES
    return False


def decode_into_memory(source: Source, workers: int = 2) -> Source:
    """Decode every file once into uint8 tensors; unreadable files are dropped and recorded."""
    if source.in_memory:
        return source
    loader = DataLoader(_RawFiles(source), batch_size=256, num_workers=workers,
                        collate_fn=lambda b: b)
    images, keep, bad = [], [], list(source.bad)
    for batch in loader:
        for i, img, err in batch:
            if img is None:
                bad.append((source.paths[i], err))
            else:
                images.append(torch.from_numpy(img))
                keep.append(i)
    if not keep:
        raise UserError(f"none of the {len(source)} images of split '{source.name}' could be read: "
                        f"{source.where(next(iter(bad[len(source.bad):]), ('', ''))[1])}")
    shapes = {tuple(im.shape) for im in images}
    array = torch.stack(images) if len(shapes) == 1 else images
    out = source.subset(keep)
    out.array, out.bad = array, bad
    return out


class _RawFiles(Dataset):
    def __init__(self, source: Source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:  # numpy, not a tensor: tensors cross processes as one file descriptor each
            return i, read_image(self.source.paths[i]).numpy(), ""
        except Exception as err:  # noqa: BLE001
            return i, None, unreadable_reason(err)


# ------------------------------------------------------------------ preprocessing


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


def channel_stats(source: Source, max_images: int = 5000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of pixel values in [0, 1] over up to ``max_images`` images (a
    seeded random choice; for shards, the first ones in shard order)."""
    if isinstance(source, ShardSplit):
        images: Iterator = (img for _, img in shard_images(source, max_images))
    else:
        idx = list(range(len(source)))
        random.Random(0).shuffle(idx)
        images = (source.load(i) for i in idx[:max_images])
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for img in images:
        if img is None:
            continue
        x = img.to(torch.float64).div_(255).flatten(1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    if count == 0:
        raise UserError(f"no readable image in split '{source.name}' to compute statistics from: "
                        f"{source.where()}")
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


# ------------------------------------------------------------------ items


class ImageDataset(Dataset):
    """Yields ``{"image": uint8 CHW after transform, "target": int, "index": int}`` or, for an
    unreadable file, ``{"skipped": path, "reason": why}`` (the collate function drops and
    lists those); ``dropped``: ``(path, reason)`` of the files dropped when decoding into RAM.
    Over a :class:`ShardSplit` it only names the shards and the transform: ``streams`` reads
    them (``loader.EpochLoader`` and ``loader.eval_loader`` choose it)."""

    def __init__(self, source: Source, transform: Callable | None = None) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def dropped(self) -> list[tuple[str, str]]:
        return list(getattr(self.source, "bad", []))

    def __getitem__(self, i: int) -> dict:
        if isinstance(self.source, ShardSplit):
            raise TypeError("shards are streamed (data.streams), not indexed")
        img, why = self.source.read(i)
        if img is None:
            return {"skipped": self.source.describe(i), "reason": why}
        if self.transform is not None:
            img = self.transform(img)
        return {"image": img, "target": self.source.labels[i], "index": i}


class MixedDataset(Dataset):
    """Labeled + unlabeled training data (SSLD): ``labeled`` then ``unlabeled``; index
    ``i >= len(labeled)`` is unlabeled image ``i - len(labeled)`` (target ``UNLABELED``:
    label-free loss terms use every image, label terms only the labeled ones); the sample's
    ``index`` is the global one. ``loader.MixedBatchSampler`` sets the unlabeled share."""

    def __init__(self, labeled: ImageDataset, unlabeled: ImageDataset) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled
        self.n_labeled = len(labeled)
        self.source = labeled.source  # for reporting unreadable files

    def __len__(self) -> int:
        return self.n_labeled + len(self.unlabeled)

    @property
    def classes(self) -> list[str]:
        return self.labeled.classes

    @property
    def dropped(self) -> list[tuple[str, str]]:
        return self.labeled.dropped + self.unlabeled.dropped

    def __getitem__(self, i: int) -> dict:
        if i < self.n_labeled:
            return self.labeled[i]
        sample = self.unlabeled[i - self.n_labeled]
        if "index" in sample:
            sample["index"] = i
        return sample


class EpochItems(Dataset):
    """``dataset`` indexed by the ``(index, epoch)`` keys of the training samplers: each
    item's augmentation is seeded from ``(seed, epoch, index)`` alone, and a dataset with
    ``set_epoch`` (replayable views) is moved to ``epoch`` first, in whichever process makes
    the item. Worker count and persistence then never change a batch, and a resumed run
    remakes the items of an uninterrupted one."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict]:
        """A batch's items (the random streams kept once per batch: saving NumPy's costs ~0.3 ms)."""
        items = []
        with kept_rngs():
            for index, epoch in keys:
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(epoch)
                seed_rngs(item_seed(self.seed, epoch, index))
                items.append(self.dataset[index])
        return items


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


def first_images(ds: Dataset, n: int = 32) -> torch.Tensor | None:
    """The first ``n`` readable images of ``ds`` (items with an ``image``), stacked, or None
    when none is readable (e.g. a batch to check a compiled teacher on)."""
    if isinstance(getattr(ds, "source", None), ShardSplit) and isinstance(ds, ImageDataset):
        tf = ds.transform or (lambda x: x)
        images = [tf(img) for _, img in shard_images(ds.source, n)]
        return torch.stack(images) if images else None
    readable = (item["image"] for item in (ds[i] for i in range(len(ds))) if "image" in item)
    images = list(itertools.islice(readable, n))
    return torch.stack(images) if images else None
