"""The unlabeled pool (and the evaluation sets to dedup against), streamed in units.

A pool is one of

* a folder, searched recursively at any depth (no class structure needed), or a list file
  of PaddleClas ``path label`` lines or bare ``path`` lines (labels ignored, paths relative
  to the list file's folder), listed by ``data.sources`` as for training (hidden files
  skipped): :class:`Pool`, paths kept in a compact :class:`~kdistill.data.sources.PathTable`;
* ``hf:`` / ``parquet:`` data (random access through its Arrow files): :class:`ReaderPool`;
* ``wds:`` shards: :class:`~kdistill.mining.tars.ShardPool` (``mining/tars.py``).

A random-access pool is scored in virtual shards of ``shard_size`` consecutive images, a
``wds:`` pool tar by tar; each such *unit* is the unit of resume. Every pool's loader yields
the same batches (:func:`collate_items`): the unit, whether it is the unit's last batch,
and the readable images (decoded, transformed and pHashed in the DataLoader workers) with
their pool index, name and pool label (-1 when none; labels only feed the precision report).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.sources import PathTable, read_paths, scan_images, unreadable_reason
from ..errors import UserError
from ..images import read_image
from .dedup import phash

Transform = Callable[[torch.Tensor], torch.Tensor]


def center_crop(img: torch.Tensor, frac: float) -> torch.Tensor:
    """The central ``frac`` x ``frac`` part of a (..., H, W) image."""
    if frac >= 1.0:
        return img
    h, w = img.shape[-2:]
    ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[..., top:top + ch, left:left + cw]


def make_item(img: torch.Tensor | None, why: str, index: int, name: str, label: int,
              transform: Transform, crops: Sequence[float]) -> dict:
    """One decoded image -> ``{"image", "phash" (len(crops),), "index", "label", "name"}``
    (pHashes of the whole image and of its centre ``crops``), or ``{"skipped": name,
    "reason", "index"}`` when it could not be read or transformed."""
    if img is not None:
        try:
            hashes = torch.cat([phash(center_crop(img, f).unsqueeze(0)) for f in crops])
            return {"image": transform(img), "phash": hashes, "index": index, "label": label, "name": name}
        except Exception as err:  # noqa: BLE001 - an image the transform cannot take: skip it
            why = unreadable_reason(err)
    return {"skipped": name, "reason": why[:200], "index": index}


def collate_items(items: list[dict], shard: int, final: bool, error: str = "") -> dict:
    """Items of one unit -> a batch: ``shard``, ``final`` (the unit's last batch), ``error``
    (why the unit ended early, on its last batch), ``count`` (samples read), ``skipped``
    ``[(index, name, reason)]`` and, when any is readable, ``image``, ``phash``, ``index``,
    ``label`` and ``names``."""
    good = [s for s in items if "skipped" not in s]
    batch: dict = {"shard": shard, "final": final, "error": error, "count": len(items),
                   "skipped": [(s["index"], s["skipped"], s["reason"]) for s in items if "skipped" in s]}
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
        batch["phash"] = torch.stack([s["phash"] for s in good])
        batch["index"] = torch.tensor([s["index"] for s in good], dtype=torch.long)
        batch["label"] = torch.tensor([s["label"] for s in good], dtype=torch.long)
        batch["names"] = [s["name"] for s in good]
    return batch


# ------------------------------------------------------------------ random-access pools


class Pool:
    """The images of a folder or list file, by index."""

    kind = "files"

    def __init__(self, spec: str, paths: PathTable, is_folder: bool) -> None:
        self.spec = spec
        self.paths = paths
        self.is_folder = is_folder

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return self.paths[i]

    def label(self, i: int) -> int:
        return -1

    def read(self, i: int) -> tuple[torch.Tensor | None, str]:
        try:
            return read_image(self.paths[i]), ""
        except Exception as err:  # noqa: BLE001 - any decode failure means "skip this file"
            return None, unreadable_reason(err)

    def digest(self) -> str:
        return self.paths.digest()

    def folder_label(self, path: str) -> str | None:
        """The top-level sub-folder of an image in a folder pool (its class, if the pool is
        an ImageFolder), else None. Used only to report selection precision."""
        if not self.is_folder:
            return None
        rel = os.path.relpath(path, self.paths.base)
        parts = Path(rel).parts
        return parts[0] if len(parts) > 1 else None

    def class_name(self, name: str, label: int) -> str | None:
        """The pool's own class of a candidate (precision report only), or None."""
        return self.folder_label(name)

    # -- units: virtual shards of ``shard_size`` consecutive images

    def units(self, shard_size: int) -> int:
        return math.ceil(len(self) / shard_size)

    def unit_name(self, shard: int, shard_size: int) -> str:
        return f"images {shard * shard_size}-{min(len(self), (shard + 1) * shard_size) - 1}"

    def unit_size(self, shard: int, shard_size: int) -> int:
        return min(len(self), (shard + 1) * shard_size) - shard * shard_size

    def loader(self, units: Sequence[int], shard_size: int, transform: Transform, batch_size: int,
               workers: int, pin: bool, crops: Sequence[float] = (1.0,)) -> DataLoader:
        sampler = ShardBatches(units, shard_size, len(self), batch_size)
        return DataLoader(PoolImages(self, transform, crops), batch_sampler=sampler, num_workers=workers,
                          collate_fn=ShardCollate(shard_size, len(self)), pin_memory=pin)

    def first_images(self, transform: Transform, n: int = 32) -> torch.Tensor | None:
        from ..data.datasets import first_images

        return first_images(PoolImages(self, transform), n)


class ReaderPool(Pool):
    """An ``hf:`` / ``parquet:`` split (random access through its Arrow files): images by
    row, its labels (as class names) only for the precision report."""

    kind = "arrow"

    def __init__(self, spec: str, source) -> None:
        self.spec, self.source, self.is_folder = spec, source, False
        self.classes = list(source.classes)
        self.labels = np.asarray(source.labels, dtype=np.int32)  # 4 bytes per image

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return self.source.describe(i)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def read(self, i: int) -> tuple[torch.Tensor | None, str]:
        return self.source.read(i)

    def raw(self, i: int) -> tuple[bytes | None, str]:
        return self.source.reader.raw(i)

    def digest(self) -> str:
        return self.source.reader.fingerprint()

    def class_name(self, name: str, label: int) -> str | None:
        return self.classes[label] if 0 <= label < len(self.classes) else None


class PoolImages(Dataset):
    """Item ``i`` of a random-access pool (:func:`make_item`); a plain sequence of paths is
    read as files."""

    def __init__(self, pool: Pool | Sequence[str], transform: Transform, crops: Sequence[float] = (1.0,)) -> None:
        if not isinstance(pool, Pool):
            table = PathTable("")
            for p in pool:
                table.append(os.fspath(p))
            pool = Pool("", table, False)
        self.pool, self.transform, self.crops = pool, transform, tuple(crops)

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, i: int) -> dict:
        img, why = self.pool.read(i)
        return make_item(img, why, i, self.pool.name(i), self.pool.label(i), self.transform, self.crops)


class ShardCollate:
    """Collate for :class:`ShardBatches`: a batch's unit is its first index's virtual shard,
    and it is the unit's last batch when it holds the shard's last index."""

    def __init__(self, shard_size: int, n: int) -> None:
        self.shard_size, self.n = shard_size, n

    def __call__(self, items: list[dict]) -> dict:
        shard = items[0]["index"] // self.shard_size
        end = min(self.n, (shard + 1) * self.shard_size)
        return collate_items(items, shard, items[-1]["index"] == end - 1)


class ShardBatches(Sampler[list[int]]):
    """Batches of consecutive indices that never cross a shard boundary, shard by shard."""

    def __init__(self, shards: Sequence[int], shard_size: int, n: int, batch_size: int) -> None:
        self.shards, self.shard_size, self.n, self.batch_size = list(shards), shard_size, n, batch_size

    def bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min(self.n, (shard + 1) * self.shard_size)

    def __iter__(self) -> Iterator[list[int]]:
        for s in self.shards:
            start, end = self.bounds(s)
            for b in range(start, end, self.batch_size):
                yield list(range(b, min(b + self.batch_size, end)))

    def __len__(self) -> int:
        return sum(-(-(e - s) // self.batch_size) for s, e in map(self.bounds, self.shards))


# ------------------------------------------------------------------ opening


def open_pool(spec: str, what: str = "pool", image_key: str | None = None):
    """A folder (recursive), a list file, ``wds:`` shards or ``hf:`` / ``parquet:`` data;
    UserError if missing or without images."""
    from ..data.shards import is_wds

    if is_wds(spec):
        from .tars import open_shard_pool

        return open_shard_pool(spec, what, image_key)
    if spec.startswith(("hf:", "parquet:")):
        return _arrow_pools(spec, what, image_key, ("unlabeled", "train"))[0]
    p = Path(spec)
    if p.is_dir():
        pool = Pool(spec, scan_images(p), True)
    elif p.is_file():
        pool = Pool(spec, read_paths(p), False)
    else:
        raise UserError(f"{what} '{spec}' does not exist (give a folder of images, a list file, wds:DIR "
                        "or hf:DIR)")
    if len(pool) == 0:
        raise UserError(f"{what} '{spec}' has no images")
    return pool


def open_eval_sets(spec: str, image_key: str | None = None) -> list:
    """The images of one ``--dedup-against``: a folder, list file, ``wds:PATTERN`` or
    ``parquet:GLOB`` as they are; a ``wds:DIR`` / ``hf:DIR`` / ``parquet:DIR`` root gives its
    ``val`` and ``test`` splits (those it has)."""
    from ..data.shards import is_wds

    what = "--dedup-against"
    if is_wds(spec):
        from .tars import open_shard_evals

        return open_shard_evals(spec, what, image_key)
    if spec.startswith(("hf:", "parquet:")):
        return _arrow_pools(spec, what, image_key, ("val", "test"), every=True)
    return [open_pool(spec, what)]


def _arrow_pools(spec: str, what: str, image_key: str | None, splits: Sequence[str],
                 every: bool = False) -> list[ReaderPool]:
    """Splits of ``hf:DIR`` / ``parquet:DIR``: the first of ``splits`` it has (``every``: all
    of them it has); a ``parquet:`` glob is read as it is."""
    from ..data.arrow import open_arrow
    from ..data.sources import Source

    def pool(name: str, per_split: bool, required: bool) -> ReaderPool | None:
        found = open_arrow(spec, name, image_key=image_key, per_split=per_split, required=required)
        if found is None:
            return None
        return ReaderPool(f"{spec} ({name})", Source(name, found.classes, found.labels, reader=found.reader))

    body = spec.split(":", 1)[1]
    if spec.startswith("parquet:") and not os.path.isdir(body):
        found = [pool(splits[0], True, True)]
    else:
        found = []
        for name in splits:
            s = pool(name, False, False)
            if s is not None:
                found.append(s)
                if not every:
                    break
    if not found:
        raise UserError(f"{what} '{spec}' has no {' or '.join(splits)} split; give the split itself "
                        "(parquet:GLOB, or a save_to_disk folder of that split)")
    for s in found:
        if len(s) == 0:
            raise UserError(f"{what} '{spec}' has no images")
    return found
