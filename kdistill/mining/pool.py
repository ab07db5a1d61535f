"""The unlabeled pool (and the evaluation sets to dedup against): image paths, streamed.

A pool is a folder, searched recursively at any depth (no class structure needed), or a
list file of PaddleClas ``path label`` lines or bare ``path`` lines (labels ignored, paths
relative to the list file's folder), listed by ``data.sources`` as for training (hidden
files skipped). Paths are kept in a :class:`~kdistill.data.sources.PathTable`; images are
decoded only when a loader asks for them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ..data.sources import PathTable, read_paths, scan_images
from ..errors import UserError
from ..images import read_image
from .dedup import phash


class Pool:
    """The images of a folder or list file, by index."""

    def __init__(self, spec: str, paths: PathTable, is_folder: bool) -> None:
        self.spec = spec
        self.paths = paths
        self.is_folder = is_folder

    def __len__(self) -> int:
        return len(self.paths)

    def folder_label(self, path: str) -> str | None:
        """The top-level sub-folder of an image in a folder pool (its class, if the pool is
        an ImageFolder), else None. Used only to report selection precision."""
        if not self.is_folder:
            return None
        rel = os.path.relpath(path, self.paths.base)
        parts = Path(rel).parts
        return parts[0] if len(parts) > 1 else None


def open_pool(spec: str, what: str = "pool") -> Pool:
    """A folder (recursive) or a list file; UserError if missing or without images."""
    p = Path(spec)
    if p.is_dir():
        pool = Pool(spec, scan_images(p), True)
    elif p.is_file():
        pool = Pool(spec, read_paths(p), False)
    else:
        raise UserError(f"{what} '{spec}' does not exist (give a folder of images or a list file)")
    if len(pool) == 0:
        raise UserError(f"{what} '{spec}' has no images")
    return pool


# ------------------------------------------------------------------ loading


def center_crop(img: torch.Tensor, frac: float) -> torch.Tensor:
    """The central ``frac`` x ``frac`` part of a (..., H, W) image."""
    if frac >= 1.0:
        return img
    h, w = img.shape[-2:]
    ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[..., top:top + ch, left:left + cw]


class PoolImages(Dataset):
    """``{"image": uint8 (3, S, S) after ``transform``, "phash": int64 (len(crops),),
    "index"}`` per path, or ``{"skipped": path, "reason", "index"}`` for unreadable files.
    The pHashes are taken on the whole decoded image and on its centre ``crops``."""

    def __init__(self, paths: Sequence[str], transform: Callable[[torch.Tensor], torch.Tensor],
                 crops: Sequence[float] = (1.0,)) -> None:
        self.paths = paths
        self.transform = transform
        self.crops = tuple(crops)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            img = read_image(path)
            hashes = torch.cat([phash(center_crop(img, f).unsqueeze(0)) for f in self.crops])
            return {"image": self.transform(img), "phash": hashes, "index": i}
        except Exception as err:  # noqa: BLE001 - any decode failure means "skip this file"
            return {"skipped": path, "reason": f"{type(err).__name__}: {err}".splitlines()[0][:200],
                    "index": i}


def collate_pool(samples: list[dict]) -> dict:
    good = [s for s in samples if "skipped" not in s]
    batch: dict = {"first": samples[0]["index"] if samples else -1,
                   "skipped": [(s["index"], s["skipped"], s["reason"]) for s in samples if "skipped" in s]}
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
        batch["phash"] = torch.stack([s["phash"] for s in good])
        batch["index"] = torch.tensor([s["index"] for s in good], dtype=torch.long)
    return batch


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
