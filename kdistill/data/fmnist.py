"""Fashion-MNIST as uint8 arrays: from the Debian package ``dataset-fashion-mnist``
(/usr/share/datasets/fashion-mnist), else downloaded once through torchvision.

A stage below ``sources`` (like ``shards`` and ``arrow``): it imports no other
``kdistill.data`` module; ``sources.fashion_mnist`` wraps the arrays in a ``Source``.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from ..errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle-boot"]
FASHION_MNIST_VAL = 5000  # the last 5,000 official training images form val/


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    d = FASHION_MNIST_DIR
    files = {s: (d / f"{p}-images-idx3-ubyte.gz", d / f"{p}-labels-idx1-ubyte.gz")
             for s, p in (("train", "train"), ("test", "t10k"))}
    if all(f.is_file() for pair in files.values() for f in pair):
        return {s: (_read_idx(i), _read_idx(lbl)) for s, (i, lbl) in files.items()}
    from torchvision.datasets import FashionMNIST

    cache = Path(os.environ.get("KDISTILL_CACHE", Path.home() / ".cache" / "kdistill"))
    try:
        out = {}
        for split, train in (("train", True), ("test", False)):
            ds = FashionMNIST(str(cache / "fashion-mnist"), train=train, download=True)
            out[split] = (ds.data.numpy(), ds.targets.numpy())
        return out
    except Exception as err:  # noqa: BLE001
        raise UserError("Fashion-MNIST not found under /usr/share/datasets/fashion-mnist and the "
                        f"download failed ({err}); run `apt-get install dataset-fashion-mnist`")


def fashion_mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)``: train = the first 55,000 official
    training images, val = the last 5,000, test = the official test set."""
    if split not in ("train", "val", "test"):
        raise UserError(f"fashion-mnist has no '{split}' split (train, val, test)")
    images, labels = _fashion_mnist_arrays()["test" if split == "test" else "train"]
    if split == "train":
        images, labels = images[:-FASHION_MNIST_VAL], labels[:-FASHION_MNIST_VAL]
    elif split == "val":
        images, labels = images[-FASHION_MNIST_VAL:], labels[-FASHION_MNIST_VAL:]
    return images, labels.astype(np.int64)
