"""Real images for the checks of an export: parity images from the val split, calibration
images for int8 from the train split, both of the run's data (``data.root`` / ``data.val`` /
``data.train`` in the ``config.yaml`` beside the checkpoint) or of ``--data ROOT``.

Images are prepared exactly as evaluation prepares them (:class:`~.runtime.Preparer`: resize,
centre-crop, [0, 1] floats, not normalised) and drawn class by class from a seeded shuffle
(``stratified_subset``), so a few hundred images cover every class; from WebDataset shards,
which cannot be indexed, they are the first readable samples in shard order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.transforms import Preprocessing
from ..errors import UserError
from .runtime import ImageError, Preparer, read_rgb


@dataclass
class Images:
    """Prepared images (float32 (N, 3, S, S) in [0, 1]), their labels (-1: unknown) and
    where they came from ("val images of ROOT", "random inputs")."""

    x: np.ndarray
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.x)


def run_data(checkpoint: Path) -> dict:
    """The ``data`` section of the ``config.yaml`` beside ``checkpoint`` ({} when there is none
    or it cannot be read)."""
    path = checkpoint.parent / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        return (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError):
        return {}


def where(checkpoint: Path, data: str | None, split: str) -> tuple[str | None, str | None]:
    """(root, explicit split spec) to read ``split`` from: ``--data`` alone when given, else
    the run's recorded ``data.root`` and ``data.<split>``."""
    if data is not None:
        return data, None
    section = run_data(checkpoint)
    return section.get("root") or None, section.get(split) or None


def read_split(pp: Preprocessing, classes: list[str], root: str | None, explicit: str | None,
               split: str, n: int) -> Images | None:
    """Up to ``n`` readable images of ``split`` (see the module docstring); None when the split
    holds none. A split that cannot be opened raises :class:`UserError`."""
    from ..data.datasets import open_eval_split, shard_images, split_labels
    from ..data.shards import ShardSplit, is_wds
    from ..data.sources import open_source, stratified_subset

    spec = explicit or root or ""
    if is_wds(spec):
        source = open_eval_split(spec, split, list(classes))
    else:
        source = open_source(root or "", split, explicit=explicit, classes=list(classes))
    prep = Preparer(pp)
    images: list[np.ndarray] = []
    labels: list[int] = []
    if isinstance(source, ShardSplit):
        known = split_labels(source) if source.labeled else [-1] * len(source)
        for i, img in shard_images(source, n):
            images.append(prep(img))
            labels.append(known[i] if i < len(known) else -1)
    else:
        subset = stratified_subset(source, n, seed=0)
        for i in range(len(subset)):
            try:  # PIL for files: torchvision's decoders can crash on a corrupt PNG
                img = read_rgb(subset.paths[i]) if subset.paths else subset.load(i)
            except ImageError:
                continue
            if img is not None:
                images.append(prep(img))
                labels.append(int(subset.labels[i]))
    if not images:
        return None
    return Images(np.stack(images), np.asarray(labels, dtype=np.int64), f"{split} images of {root or explicit}")


def parity_inputs(pp: Preprocessing, classes: list[str], checkpoint: Path, data: str | None, n: int,
                  required: bool = False) -> Images:
    """Up to ``n`` val images of the run's data (or ``data``) with their labels; random
    inputs (labels -1) with a printed note when there are none, unless ``required``: then
    a :class:`UserError` (an int8 agreement measured on noise means nothing)."""
    root, val = where(checkpoint, data, "val")
    found = None
    if root or val:
        try:
            found = read_split(pp, classes, root, val, "val", n)
        except UserError as err:
            if data is not None:  # the user named this data: tell them, do not guess
                raise UserError(f"--data {data}: {err}") from None
            if required:
                raise UserError(f"the run's val data is unavailable ({err}); give --data ROOT "
                                "with a val split") from None
            print(f"note: the run's data ({err}) is unavailable; parity uses random inputs")
        else:
            if found is not None:
                return found
            if required:
                raise UserError(f"no readable val image in {val or root}; give --data ROOT with a val split")
            print(f"note: no readable val image in {val or root}; parity uses random inputs")
    elif required:
        raise UserError(f"no data recorded beside {checkpoint} (config.yaml data.root) and no --data: "
                        "give --data ROOT with train/ and val/ images")
    else:
        print(f"note: no data recorded beside {checkpoint} (config.yaml data.root) and no --data; "
              "parity uses random inputs")
    gen = torch.Generator().manual_seed(0)
    size = pp.image_size
    x = torch.rand(max(n, 2), 3, size, size, generator=gen).numpy()
    return Images(x, np.full(len(x), -1, dtype=np.int64), "random inputs")


def calibration_inputs(pp: Preprocessing, classes: list[str], checkpoint: Path, data: str | None,
                       n: int, least: int) -> Images:
    """Up to ``n`` training images for int8 calibration; a :class:`UserError` when fewer than
    ``least`` are readable (never random inputs: they would calibrate the wrong ranges)."""
    root, train = where(checkpoint, data, "train")
    hint = "give --data ROOT with a train/ split of the data the model was trained on"
    if not (root or train):
        raise UserError(f"int8 calibration needs training images: no data recorded beside {checkpoint} "
                        f"(config.yaml data.root) and no --data; {hint}")
    try:
        found = read_split(pp, classes, root, train, "train", n)
    except UserError as err:
        raise UserError(f"int8 calibration needs training images: {err}; {hint}") from None
    count = 0 if found is None else len(found)
    if count < least:
        raise UserError(f"int8 calibration needs at least {least} readable training images; "
                        f"{train or root} has {count}; {hint}")
    if count < n:
        print(f"note: calibrating on the {count} readable training images of {train or root} "
              f"(--calib-images {n})")
    return found
