"""Resolve a data ROOT into split sources, decode small images into RAM, wrap as Datasets."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from .sources import Source, fashion_mnist, open_split

IN_MEMORY_AUTO_BYTES = 3 * 2**30  # decode into RAM when the split fits in this


def split_spec(root: str, split: str, explicit: str | None = None) -> str | None:
    """Where ``split`` lives: explicit path, ``ROOT/<split>``, a ``ROOT/<split>_list.txt`` or
    the sibling of a list-file ROOT with 'train' replaced by the split name."""
    if explicit:
        return explicit
    p = Path(root)
    if p.is_dir():
        for cand in (p / split, p / f"{split}_list.txt", p / f"{split}.txt"):
            if cand.exists():
                return str(cand)
        return None
    if p.is_file():
        if split == "train":
            return str(p)
        if "train" in p.name:
            sib = p.with_name(p.name.replace("train", split))
            if sib.exists():
                return str(sib)
    return None


def open_source(root: str, split: str, explicit: str | None = None,
                classes: list[str] | None = None, class_map: str | None = None,
                required: bool = True) -> Source | None:
    """Open one split of ROOT (folder, list file or 'fashion-mnist')."""
    if root == "fashion-mnist" and not explicit:
        if split not in ("train", "val", "test"):
            raise UserError(f"fashion-mnist has no '{split}' split (train, val, test)")
        return fashion_mnist(split)
    if not explicit and not Path(root).exists():
        raise UserError(f"data root '{root}' does not exist (give a folder with train/ and val/, "
                        "a list file, or 'fashion-mnist')")
    spec = split_spec(root, split, explicit)
    if spec is None:
        if required:
            raise UserError(f"data root '{root}' has no '{split}' split "
                            f"(expected {root}/{split}/<class>/<image> or {split}_list.txt)")
        return None
    return open_split(spec, split, classes, class_map)


def stratified_subset(source: Source, n: int, seed: int = 0) -> Source:
    """At most ``n`` images, drawn class by class in turn from a seeded shuffle."""
    if n >= len(source):
        return source
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(source.labels):
        by_class.setdefault(y, []).append(i)
    for idx in by_class.values():
        rng.shuffle(idx)
    picked: list[int] = []
    queues = [by_class[c] for c in sorted(by_class)]
    depth = 0
    while len(picked) < n:
        for q in queues:
            if depth < len(q) and len(picked) < n:
                picked.append(q[depth])
        depth += 1
    return source.subset(sorted(picked))


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
        raise UserError(f"none of the {len(source)} images of split '{source.name}' could be read")
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
        from .sources import read_image

        try:  # numpy, not a tensor: tensors cross processes as one file descriptor each
            return i, read_image(self.source.paths[i]).numpy(), ""
        except Exception as err:  # noqa: BLE001
            return i, None, f"{type(err).__name__}: {err}".splitlines()[0][:200]


def want_in_memory(source: Source, mode: str) -> bool:
    if source.in_memory or mode == "no":
        return False
    if mode == "yes":
        return True
    for i in range(min(len(source), 8)):  # estimate from the first readable image
        img = source.load(i)
        if img is not None:
            return img.numel() * len(source) <= IN_MEMORY_AUTO_BYTES
    return False


def channel_stats(source: Source, max_images: int = 5000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of pixel values in [0, 1] over up to ``max_images`` images."""
    idx = list(range(len(source)))
    random.Random(0).shuffle(idx)
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i in idx[:max_images]:
        img = source.load(i)
        if img is None:
            continue
        x = img.to(torch.float64).div_(255).flatten(1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    if count == 0:
        raise UserError(f"no readable image in split '{source.name}' to compute statistics from")
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


class ImageDataset(Dataset):
    """Yields ``{"image": uint8 CHW after transform, "target": int, "index": int}`` or, for an
    unreadable file, ``{"skipped": path}`` (the collate function drops and counts those)."""

    def __init__(self, source: Source, transform: Callable | None = None) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    def __getitem__(self, i: int) -> dict:
        img = self.source.load(i)
        if img is None:
            return {"skipped": self.source.describe(i)}
        if self.transform is not None:
            img = self.transform(img)
        return {"image": img, "target": self.source.labels[i], "index": i}


def collate(samples: list[dict]) -> dict:
    """Stack good samples (images, targets, indices and any extra tensors, e.g. a teacher's
    outputs or its own view); unreadable ones are listed under ``"skipped"``."""
    good = [s for s in samples if "skipped" not in s]
    batch: dict = {"skipped": [s["skipped"] for s in samples if "skipped" in s]}
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
        batch["target"] = torch.tensor([s["target"] for s in good], dtype=torch.long)
        batch["index"] = torch.tensor([s["index"] for s in good], dtype=torch.long)
        for key in good[0].keys() - {"image", "target", "index"}:
            batch[key] = torch.stack([torch.as_tensor(s[key]) for s in good])
    return batch
