"""The unlabeled pool (and the evaluation sets to dedup against): image paths, streamed.

A pool is a folder, searched recursively at any depth (no class structure needed), or a
list file of PaddleClas ``path label`` lines or bare ``path`` lines (labels ignored, paths
relative to the list file's folder). Paths are kept in a :class:`PathTable` (one byte
buffer plus offsets, ~1/3 of the memory of a list of ``str`` and nothing for DataLoader
workers to copy on access); images are decoded only when a loader asks for them.
"""
from __future__ import annotations

import hashlib
import os
from array import array
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ..data.sources import IMAGE_EXTENSIONS, read_image
from ..errors import UserError
from .dedup import phash


class PathTable(Sequence[str]):
    """An append-only list of paths stored as UTF-8 bytes + end offsets, relative to ``base``."""

    def __init__(self, base: str = "") -> None:
        self.base = base
        self._data = bytearray()
        self._ends = array("q")

    def append(self, rel: str) -> None:
        self._data += rel.encode("utf-8", "surrogateescape")
        self._ends.append(len(self._data))

    def __len__(self) -> int:
        return len(self._ends)

    def relative(self, i: int) -> str:
        if i < 0:
            i += len(self)
        start = self._ends[i - 1] if i > 0 else 0
        return self._data[start:self._ends[i]].decode("utf-8", "surrogateescape")

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return os.path.join(self.base, self.relative(i))

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def digest(self) -> str:
        """A fingerprint of the list (to tell whether a resumed run sees the same pool)."""
        h = hashlib.sha1(self.base.encode("utf-8", "surrogateescape"))
        h.update(bytes(self._data))
        h.update(self._ends.tobytes())
        return h.hexdigest()


def scan_images(root: Path) -> PathTable:
    """Every image file under ``root`` (any depth; hidden files and folders skipped), in
    sorted directory order, without materialising a list of all names."""
    table = PathTable(str(root))
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for f in sorted(files):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                table.append(f if rel_dir == "." else os.path.join(rel_dir, f))
    return table


def parse_pool_line(line: str) -> str | None:
    """``path label [# comment]`` or ``path`` -> path; None for blank or comment lines."""
    if " #" in line:
        line = line.split(" #", 1)[0]
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = line.rsplit(maxsplit=1)
    if len(parts) == 2 and parts[1].lstrip("-").isdigit():
        return parts[0]
    return line


def read_pool_list(path: Path) -> PathTable:
    table = PathTable(str(path.parent))
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            p = parse_pool_line(line)
            if p is not None:
                table.append(p)
    return table


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
        pool = Pool(spec, read_pool_list(p), False)
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
