"""The unlabeled pool (and the evaluation sets to dedup against), read shard by shard.

A pool is cut into *shards*, the unit of work and of resume: for WebDataset shards
(``wds:DIR``: its ``unlabeled`` split, else ``train``; or ``wds:PATTERN``) one tar each,
read whole by one DataLoader worker; for a folder (searched recursively, no class structure
needed) or a list file (PaddleClas ``path label`` or bare ``path`` lines, labels ignored)
``chunk`` consecutive paths of its :class:`~kdistill.data.sources.PathTable`; for any other
source that :func:`kdistill.data.sources.open_source` opens (dedup's reference images),
``chunk`` consecutive images of it. A shard yields :class:`Item`\\ s; images are decoded by
the worker that reads them (:class:`ShardStream`), so nothing per pool image stays in the
main process but the folder's path table (~100 bytes an image, shared with the workers).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..data import shards as wds
from ..data.sources import PathTable, Source, read_paths, scan_images
from ..errors import UserError
from ..images import read_image, read_images
from .dedup import phash

SHARD_SPLITS = ("unlabeled", "train")  # the split of wds:DIR a pool is read from
REFERENCE_SPLITS = ("val", "test")  # of a data root given to --dedup-against


@dataclass
class Item:
    """One pool image: its index in the pool (ties and order), its key (a path, or the
    sample's ``__key__`` in its tar) and what to decode (a path, bytes or a decoded image)."""

    index: int
    key: str
    data: str | bytes | torch.Tensor | None
    error: str = ""  # why the sample is unusable before decoding (no image member)


class Pool:
    """Images by index, cut into shards of consecutive indices."""

    spec: str = ""
    is_shards = False

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def num_shards(self) -> int:
        raise NotImplementedError

    def shard_size(self, shard: int) -> int:
        raise NotImplementedError

    def items(self, shard: int) -> Iterator[Item]:
        """The items of ``shard`` in index order; a ``ShardError`` where a tar breaks off."""
        raise NotImplementedError

    def fingerprint(self) -> str | dict:
        """What a resumed run must find unchanged."""
        raise NotImplementedError

    def describe(self, shard: int, key: str) -> str:
        """A pool image named for reports (a path; ``tar#key`` for shards)."""
        return key

    def shard_name(self, shard: int) -> str:
        return f"{self.spec} shard {shard}"

    def folder_label(self, key: str) -> str | None:
        """The top-level sub-folder of an image in a folder pool (its class, if the pool is
        an ImageFolder), else None. Used only to report selection precision."""
        return None


class PathPool(Pool):
    """A folder (recursive) or a list file: shards of ``chunk`` consecutive paths."""

    def __init__(self, spec: str, paths: PathTable, is_folder: bool, chunk: int = 4096) -> None:
        self.spec, self.paths, self.is_folder, self.chunk = spec, paths, is_folder, chunk

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.paths) / self.chunk)

    def bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.chunk, min(len(self.paths), (shard + 1) * self.chunk)

    def shard_size(self, shard: int) -> int:
        start, end = self.bounds(shard)
        return end - start

    def items(self, shard: int) -> Iterator[Item]:
        for i in range(*self.bounds(shard)):
            path = self.paths[i]
            yield Item(i, path, path)

    def fingerprint(self) -> str:
        return self.paths.digest()

    def folder_label(self, key: str) -> str | None:
        if not self.is_folder:
            return None
        parts = Path(os.path.relpath(key, self.paths.base)).parts
        return parts[0] if len(parts) > 1 else None


class ShardPool(Pool):
    """WebDataset shards: one tar per shard."""

    is_shards = True

    def __init__(self, spec: str, split: wds.ShardSplit) -> None:
        self.spec, self.split = spec, split

    def __len__(self) -> int:
        return len(self.split)

    @property
    def num_shards(self) -> int:
        return len(self.split.urls)

    def shard_size(self, shard: int) -> int:
        return self.split.lengths[shard]

    def items(self, shard: int) -> Iterator[Item]:
        for s in self.split.samples(shard):
            yield Item(s.index, s.key, s.data, s.error)

    def fingerprint(self) -> dict:
        return {"split": self.split.name, **self.split.fingerprint()}

    def describe(self, shard: int, key: str) -> str:
        return f"{self.split.urls[shard]}#{key}"

    def shard_name(self, shard: int) -> str:
        return self.split.urls[shard]


class SourcePool(Pool):
    """Any other :class:`~kdistill.data.sources.Source` (e.g. a Hugging Face split), read
    through ``Source.read``: shards of ``chunk`` consecutive images."""

    def __init__(self, spec: str, source: Source, chunk: int = 4096) -> None:
        self.spec, self.source, self.chunk = spec, source, chunk

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.source) / self.chunk)

    def shard_size(self, shard: int) -> int:
        return min(len(self.source), (shard + 1) * self.chunk) - shard * self.chunk

    def items(self, shard: int) -> Iterator[Item]:
        for i in range(shard * self.chunk, shard * self.chunk + self.shard_size(shard)):
            img, why = self.source.read(i)
            yield Item(i, self.source.describe(i), img, why)

    def fingerprint(self) -> dict:
        return {"source": self.spec, "size": len(self.source)}


def open_pool(spec: str, what: str = "pool", chunk: int = 4096) -> Pool:
    """``wds:DIR`` / ``wds:PATTERN``, a folder (recursive) or a list file; UserError if
    missing or without images."""
    if wds.is_wds(spec):
        split = next((s for s in (wds.open_wds(spec, name, labeled=False) for name in SHARD_SPLITS)
                      if s is not None), None)
        if split is None:
            raise UserError(f"{what} '{spec}' has no {' or '.join(SHARD_SPLITS)} shards "
                            "(expected DIR/unlabeled-*.tar or DIR/train-*.tar, or give wds:PATTERN)")
        pool: Pool = ShardPool(spec, split)
    else:
        p = Path(spec)
        if p.is_dir():
            pool = PathPool(spec, scan_images(p), True, chunk)
        elif p.is_file():
            pool = PathPool(spec, read_paths(p), False, chunk)
        else:
            raise UserError(f"{what} '{spec}' does not exist (give a folder of images, a list file or wds:DIR)")
    if len(pool) == 0:
        raise UserError(f"{what} '{spec}' has no images")
    return pool


def open_reference(spec: str, chunk: int = 4096) -> list[Pool]:
    """The evaluation images of one ``--dedup-against`` value: a folder or list file as a
    pool; ``wds:DIR`` its val and test splits (``wds:PATTERN``: those tars); anything else
    through :func:`~kdistill.data.sources.open_source` (its val and test splits)."""
    what = "--dedup-against"
    if not wds.is_wds(spec) and Path(spec).exists():
        return [open_pool(spec, what, chunk)]
    if wds.is_wds(spec):
        splits = [s for s in (wds.open_wds(spec, name, labeled=False) for name in REFERENCE_SPLITS)
                  if s is not None]
        if not splits:
            raise UserError(f"{what} '{spec}' has no val or test shards (give wds:DIR of kdistill pack, "
                            "or wds:PATTERN of the evaluation tars)")
        return [ShardPool(spec, s) for s in splits]
    from ..data.sources import open_source

    if ":" not in spec:  # a plain path that does not exist
        raise UserError(f"{what} '{spec}' does not exist (give a folder of images, a list file, "
                        "wds:DIR or a data source such as hf:DIR)")
    sources = [open_source(spec, name, required=False) for name in REFERENCE_SPLITS]
    pools = [SourcePool(spec, s, chunk) for s in sources if s is not None and len(s)]
    if not pools:
        raise UserError(f"{what} '{spec}' has no val or test images")
    return pools


# ------------------------------------------------------------------ decoding


def center_crop(img: torch.Tensor, frac: float) -> torch.Tensor:
    """The central ``frac`` x ``frac`` part of a (..., H, W) image."""
    if frac >= 1.0:
        return img
    h, w = img.shape[-2:]
    ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[..., top:top + ch, left:left + cw]


def decode(item: Item) -> torch.Tensor:
    """The item's image as uint8 (3, H, W); raises on anything unreadable."""
    if item.error:
        raise ValueError(item.error)
    if isinstance(item.data, torch.Tensor):
        return item.data.expand(3, -1, -1) if item.data.shape[0] == 1 else item.data
    if item.data is None:
        raise ValueError("not a readable image")
    return read_image(item.data)


def decode_all(items: Sequence[Item]) -> list[torch.Tensor | Exception]:
    """:func:`decode` of many items (each one's image, or the error it raised), the encoded
    ones through :func:`~kdistill.images.read_images` (JPEGs in one decoder call)."""
    out: list = [None] * len(items)
    encoded = [i for i, it in enumerate(items) if not it.error and isinstance(it.data, (str, bytes))]
    for i, img in zip(encoded, read_images([items[i].data for i in encoded])):
        out[i] = img
    for i, it in enumerate(items):
        if out[i] is None:
            try:
                out[i] = decode(it)
            except Exception as err:  # noqa: BLE001 - any failure means "skip this image"
                out[i] = err
    return out


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:200]


def first_images(pool: Pool, transform: Callable[[torch.Tensor], torch.Tensor], n: int = 32
                 ) -> torch.Tensor | None:
    """The first ``n`` readable images of the pool, transformed and stacked (or None)."""
    images: list[torch.Tensor] = []
    for shard in range(pool.num_shards):
        try:
            for item in pool.items(shard):
                try:
                    images.append(transform(decode(item)))
                except Exception:  # noqa: BLE001 - unreadable: not a check image
                    continue
                if len(images) == n:
                    return torch.stack(images)
        except wds.ShardError:
            continue
    return torch.stack(images) if images else None


class ShardStream(IterableDataset):
    """Batches of the given shards, each batch from one shard only: worker ``w`` of ``W``
    reads shards ``shards[w::W]``, whole and in order. A batch holds the next ``batch_size``
    samples of its shard, decoded together (n images: those that are not skipped) and is
    ``{"shard", "index" (n,),
    "keys" (n), "image" uint8 (n, 3, S, S), "phash" int64 (n, len(crops)), "skipped"
    [(key, reason)], "seen", "last"}``; the last batch of a shard (``last``, possibly without
    images) also carries ``"broken"``: why the tar broke off ("" when it did not) and
    ``"missing"``: how many of its samples were never read."""

    def __init__(self, pool: Pool, shards: Sequence[int], transform: Callable[[torch.Tensor], torch.Tensor],
                 batch_size: int, crops: Sequence[float] = (1.0,)) -> None:
        self.pool, self.shards, self.transform = pool, list(shards), transform
        self.batch_size, self.crops = batch_size, tuple(crops)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[w::n]:
            yield from self.shard_batches(shard)

    def shard_batches(self, shard: int) -> Iterator[dict]:
        items: list[Item] = []
        total, broken = 0, ""
        try:
            for item in self.pool.items(shard):
                total += 1
                items.append(item)
                if len(items) == self.batch_size:
                    yield self._batch(shard, items, False)
                    items = []
        except wds.ShardError as err:  # reported by the main process (workers' stderr may be lost)
            broken = err.reason
        last = self._batch(shard, items, True)
        last["broken"], last["missing"] = broken, max(0, self.pool.shard_size(shard) - total)
        yield last

    def _prepare(self, imgs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformed images and their hashes (one per crop), stacked; one call per crop
        for the whole batch where the images share a size (per-image calls cost several
        times the work on small images)."""
        if len({tuple(i.shape) for i in imgs}) == 1:
            x = torch.stack(imgs)
            return self.transform(x), torch.stack([phash(center_crop(x, f)) for f in self.crops], 1)
        return (torch.stack([self.transform(i) for i in imgs]),
                torch.stack([torch.cat([phash(center_crop(i, f).unsqueeze(0)) for f in self.crops]) for i in imgs]))

    def _batch(self, shard: int, items: list[Item], last: bool) -> dict:
        decoded, skipped = [], []
        for item, img in zip(items, decode_all(items)):
            if isinstance(img, torch.Tensor):
                decoded.append((item, img))
            else:
                skipped.append((item.key, item.error or _reason(img)))
        good, bad = decoded, []
        if decoded:
            try:
                images, hashes = self._prepare([img for _, img in decoded])
            except Exception:  # noqa: BLE001 - find the image(s) that fail, skip only those
                good, images, hashes = [], [], []
                for item, img in decoded:
                    try:
                        one, h = self._prepare([img])
                    except Exception as err:  # noqa: BLE001
                        bad.append((item.key, _reason(err)))
                        continue
                    good.append((item, img))
                    images.append(one[0])
                    hashes.append(h[0])
                images, hashes = (torch.stack(images), torch.stack(hashes)) if good else (None, None)
        batch: dict = {"shard": shard, "skipped": [*skipped, *bad], "seen": len(items), "last": last,
                       "keys": [it.key for it, _ in good],
                       "index": torch.tensor([it.index for it, _ in good], dtype=torch.long)}
        if good:
            batch["image"], batch["phash"] = images, hashes
        return batch


def read_bytes(item: Item) -> bytes | None:
    """The encoded bytes of an item (a file's contents, or a tar member's), for copying."""
    if isinstance(item.data, bytes):
        return item.data
    if isinstance(item.data, str):
        with open(item.data, "rb") as fh:
            return fh.read()
    return None


def collate_pool(samples: list[dict]) -> dict:
    """Per-image dicts (``{"image", "phash", "index"}`` or ``{"skipped", "reason", "index"}``)
    -> one batch as the mining loop takes it (for callers that decode items themselves)."""
    good = [s for s in samples if "skipped" not in s]
    batch: dict = {"first": samples[0]["index"] if samples else -1,
                   "skipped": [(s["index"], s["skipped"], s["reason"]) for s in samples if "skipped" in s]}
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
        batch["phash"] = torch.stack([s["phash"] for s in good])
        batch["index"] = torch.tensor([s["index"] for s in good], dtype=torch.long)
    return batch
