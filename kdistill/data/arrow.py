"""Hugging Face ``datasets`` sources: ``hf:DIR`` (a ``save_to_disk`` Dataset or DatasetDict),
``hf:OWNER/NAME`` (a Hub dataset, where there is internet or a cached copy) and
``parquet:GLOB`` (Parquet files, converted once by ``datasets`` into its Arrow cache).

The tables are memory-mapped Arrow files read one row at a time: :class:`ArrowReader`
returns row ``i``'s image as a uint8 (3, H, W) tensor and pickles as file names, so each
DataLoader worker maps the files itself (nothing is copied into the workers). Class names
come from the label column's ``ClassLabel`` feature (else string labels, sorted, or integer
labels 0..max). ``DIR#SPLIT`` picks a split by its own name (``hf:DIR#validation``).

A stage below ``sources`` (like ``shards``): it imports no other ``kdistill.data`` module and
returns plain :class:`ArrowSplit` records that ``sources`` turns into a ``Source``.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError
from ..images import UnreadableImage, read_image
from ..utils import first_line

HF, PARQUET = "hf:", "parquet:"
PREFIXES = (HF, PARQUET)
IMAGE_COLUMN, LABEL_COLUMN = "image", "label"
#: a kdistill split -> the split names a DatasetDict or a Parquet layout may give it, in order
SPLIT_ALIASES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",),
                 "unlabeled": ("unlabeled", "unlabelled", "train")}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_arrow_spec(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(PREFIXES)


def aliases(split: str) -> tuple[str, ...]:
    return SPLIT_ALIASES.get(split, (split,))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No ``datasets`` progress bars while kdistill opens a table (its own log says what runs)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()


# ------------------------------------------------------------------ reading rows


@dataclass
class Segment:
    """Rows ``start..start+rows`` of the table come from ``where`` (a Parquet file or a
    dataset split) of ``size`` bytes."""

    where: str
    start: int
    rows: int
    size: int = 0


class ArrowReader:
    """Row-wise random access to the image column of memory-mapped Arrow ``files``.

    ``rows`` maps item ``i`` to a table row (None: the identity); ``kind`` is ``encoded``
    (``datasets.Image`` cells ``{"bytes", "path"}`` or raw bytes, decoded with
    :func:`kdistill.images.read_image`) or ``array`` (uint8 pixels, HWC or CHW). The table
    is opened on first use in each process; pickling keeps only file names and ``rows``.
    """

    def __init__(self, files: list[str], column: str, kind: str, segments: list[Segment],
                 rows: np.ndarray | None = None, dataset=None) -> None:
        self.files, self.column, self.kind = list(files), column, kind
        self.segments = segments
        self.rows = rows
        self._ds = self._format(dataset) if dataset is not None else None  # kept when it has no files
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.files:
            state["_ds"], state["_pid"] = None, None
        return state

    def _format(self, ds):
        from datasets import Image

        ds = ds.select_columns([self.column])
        if self.kind == "array":
            return ds.with_format("numpy")
        if isinstance(ds.features[self.column], Image):
            ds = ds.cast_column(self.column, Image(decode=False))
        return ds

    def _dataset(self):
        if self._ds is None or (self.files and self._pid != os.getpid()):
            from datasets import Dataset, concatenate_datasets

            with _quiet():
                parts = [Dataset.from_file(f) for f in self.files]
                ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
            self._ds, self._pid = self._format(ds), os.getpid()
        return self._ds

    def row(self, i: int) -> int:
        return int(self.rows[i]) if self.rows is not None else int(i)

    def image(self, i: int) -> torch.Tensor:
        """Item ``i`` as a uint8 (3, H, W) tensor; :class:`UnreadableImage` when it is not one."""
        value = self._dataset()[self.row(i)][self.column]
        return decode_array(value) if self.kind == "array" else decode_cell(value)

    def describe(self, i: int) -> str:
        """Where item ``i`` is: ``<file or split> row <n>`` (the row within that file)."""
        r = self.row(i)
        for seg in reversed(self.segments):
            if r >= seg.start:
                return f"{seg.where} row {r - seg.start}"
        return f"row {r}"

    def subset(self, indices: list[int]) -> "ArrowReader":
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.rows[idx] if self.rows is not None else idx
        out = ArrowReader.__new__(ArrowReader)
        out.__dict__.update(self.__dict__)
        out.rows = rows
        return out

    def digest(self) -> str:
        """A fingerprint of what is read (column, row counts and sizes of the files, rows; not
        their folder, so a moved dataset keeps it)."""
        h = hashlib.sha256(json.dumps([self.column, self.kind, [(s.rows, s.size) for s in self.segments]]).encode())
        if self.rows is not None:
            h.update(np.ascontiguousarray(self.rows, dtype=np.int64).tobytes())
        return h.hexdigest()


def decode_cell(value) -> torch.Tensor:
    """An encoded image cell: ``{"bytes": ..., "path": ...}`` (``datasets.Image``) or bytes."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return read_image(data)
        if path:
            return read_image(path)
        raise UnreadableImage("the image cell holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return read_image(bytes(value))
    raise UnreadableImage(f"the image cell holds {type(value).__name__}, not an encoded image")


def decode_array(value) -> torch.Tensor:
    """A pixel array cell (H, W), (H, W, C) or (C, H, W) of 0..255 -> uint8 (3, H, W)."""
    if value is None:
        raise UnreadableImage("the image cell is empty")
    arr = np.asarray(value)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):  # HWC (also when ambiguous, e.g. 3x3x3: as PIL stores it)
        arr = arr.transpose(2, 0, 1)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3, 4) or arr.shape[1] * arr.shape[2] == 0:
        raise UnreadableImage(f"the image array has shape {tuple(np.shape(value))}, not (H, W[, C])")
    if arr.min() < 0 or arr.max() > 255:
        raise UnreadableImage("the image array has values outside 0..255")
    arr = arr[:3] if arr.shape[0] == 4 else arr
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.uint8))
    return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t


# ------------------------------------------------------------------ opening a split


def parse(spec: str) -> tuple[str, str, str | None]:
    """``hf:DIR#SPLIT`` -> ("hf:", "DIR", "SPLIT"); ``parquet:GLOB`` -> ("parquet:", GLOB, None)."""
    prefix = HF if spec.startswith(HF) else PARQUET
    body = spec[len(prefix):]
    if prefix == HF and "#" in body and not Path(body).exists():
        body, split = body.rsplit("#", 1)
        return prefix, body, split or None
    return prefix, body, None


def _hub_error(name: str, err: BaseException) -> UserError:
    from datasets import config

    offline = config.HF_HUB_OFFLINE or any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                                           for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    state = "the Hub is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)" if offline else "it cannot be loaded"
    return UserError(f"'hf:{name}' is not a local folder and {state} ({type(err).__name__}: {first_line(err)}); "
                     "check the name and the network, or save it with save_to_disk and pass hf:DIR")


def _local_splits(path: Path) -> list[str] | None:
    """The split names of a saved DatasetDict, None for a single saved Dataset."""
    if (path / "dataset_dict.json").is_file():
        try:
            return list(json.loads((path / "dataset_dict.json").read_text())["splits"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"'{path / 'dataset_dict.json'}' is corrupt; save the dataset again "
                            "with save_to_disk") from None
    if (path / "state.json").is_file():
        return None
    raise UserError(f"'{path}' is not a dataset saved with save_to_disk (no dataset_dict.json or "
                    "state.json in it); pass hf:DIR of a DatasetDict or parquet:GLOB")


def _hub_splits(name: str) -> list[str]:
    from datasets import get_dataset_split_names

    if not _HUB_NAME.match(name):
        raise UserError(f"hf dataset '{name}' does not exist (a folder from save_to_disk or a Hub "
                        "name owner/name)")
    try:
        with _quiet():
            return list(get_dataset_split_names(name))
    except Exception as err:  # noqa: BLE001 - offline, unknown name, gated: all "cannot load"
        raise _hub_error(name, err) from None


def hf_splits(body: str) -> list[str] | None:
    """The splits of ``hf:BODY`` (a local folder, else a Hub name); None: one unnamed split."""
    return _local_splits(Path(body)) if Path(body).exists() else _hub_splits(body)


def pick_split(available: list[str] | None, split: str, chosen: str | None = None) -> str | None:
    """The dataset's split for kdistill's ``split`` (``chosen`` if given); None if it has none."""
    if available is None:
        return "" if chosen is None else None
    if chosen is not None:
        return chosen if chosen in available else None
    return next((a for a in aliases(split) if a in available), None)


def parquet_files(pattern: str) -> list[str]:
    """Files of ``parquet:PATTERN``: a glob (``**`` allowed), a file, or a folder (every
    ``*.parquet`` under it)."""
    if Path(pattern).is_dir():
        pattern = str(Path(pattern) / "**" / "*.parquet")
    return sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))


def split_glob(root: str, split: str) -> str | None:
    """The files of ``split`` of ``parquet:ROOT``: a folder is a split layout
    (``<split>-*.parquet``, ``<split>/*.parquet``, ``data/<split>-*.parquet``, as the Hub stores
    them; a folder without val or test files is all train); a glob is the train split, and names
    the others with 'train' replaced by their name (``train-*.parquet`` -> ``validation-*.parquet``),
    as list files do."""
    p = Path(root)
    if p.is_dir():
        globs = [str(p / g.format(a)) for a in aliases(split)
                 for g in ("{}-*.parquet", "{}.parquet", "{}/*.parquet", "data/{}-*.parquet")]
        if split == "train" and not any(split_glob(root, s) for s in ("val", "test")):
            globs.append(root)
    elif split == "train":
        globs = [root]
    else:
        globs = [str(p.with_name(p.name.replace("train", a))) for a in aliases(split)] if "train" in p.name else []
    return next((g for g in globs if parquet_files(g)), None)


def split_spec(root: str, split: str) -> str | None:
    """The spec of ``split`` of an ``hf:``/``parquet:`` ROOT, or None when it has none."""
    prefix, body, chosen = parse(root)
    if prefix == PARQUET:
        found = split_glob(body, split)
        return None if found is None else PARQUET + found
    found = pick_split(hf_splits(body), split, chosen if split == "train" else None)
    if found is None:
        return None
    return HF + body + (f"#{found}" if found else "")


def missing_split(root: str, split: str) -> UserError:
    prefix, body, chosen = parse(root)
    if prefix == PARQUET and not parquet_files(body):
        return _no_match(body)
    if prefix == PARQUET:
        return UserError(f"data root '{root}' has no {split} Parquet files (looked for "
                         f"{'/'.join(aliases(split))} files beside or under '{body}'); pass them with "
                         f"-o data.{split}=parquet:GLOB")
    return _no_split(body, chosen if chosen and split == "train" else split, hf_splits(body), f"-o data.{split}=")


def _no_split(body: str, wanted: str, available: list[str] | None, how: str = "") -> UserError:
    return UserError(f"hf dataset '{body}' has no '{wanted}' split (its splits: {', '.join(available or ['one'])}); "
                     f"name one with {how}hf:{body}#SPLIT")


def _no_match(pattern: str) -> UserError:
    return UserError(f"parquet:{pattern} matches no file; check the path (quote a glob so the shell "
                     "leaves it to kdistill)")


def open_arrow(spec: str, name: str, classes: list[str] | None = None, label_names: list[str] | None = None,
               image_key: str | None = None, label_key: str | None = None,
               labeled: bool = True) -> tuple[list[str], list[int], ArrowReader]:
    """``(classes, labels, reader)`` of split ``name`` of ``spec``; ``classes``: the training
    classes labels must belong to (matched by name when the column has names); ``label_names``:
    names for integer labels (a class map); ``labeled=False``: no label column, labels -1."""
    image_key, label_key = image_key or IMAGE_COLUMN, label_key or LABEL_COLUMN
    prefix, body, chosen = parse(spec)
    with _quiet():
        if prefix == PARQUET:
            ds, segments, where = _open_parquet(body, image_key, label_key if labeled else None)
        else:
            ds, segments, where = _open_hf(body, name, chosen)
    missing = [k for k in (image_key, label_key if labeled else None) if k and k not in ds.column_names]
    if missing:
        raise UserError(f"{where} has no column '{missing[0]}' (its columns: {', '.join(ds.column_names)}); "
                        f"set -o data.{'image' if missing[0] == image_key else 'label'}_key=COLUMN")
    kind = image_kind(ds.features[image_key], where, image_key)
    files = [f["filename"] for f in ds.cache_files]
    reader = ArrowReader(files, image_key, kind, segments, dataset=ds)
    if labeled:
        classes, labels = read_labels(ds, label_key, reader, classes, label_names)
    else:
        classes, labels = list(classes or []), [-1] * len(ds)
    return classes, labels, reader


def _open_hf(body: str, name: str, chosen: str | None):
    import datasets

    path = Path(body)
    available = hf_splits(body)
    split = pick_split(available, name, chosen)
    if split is None:
        raise _no_split(body, chosen or name, available)
    if path.exists():
        try:
            ds = datasets.load_from_disk(str(path / split) if split else str(path))
        except Exception as err:  # noqa: BLE001 - a damaged save: say which, not a traceback
            raise UserError(f"cannot read the dataset saved in '{path / split}' ({type(err).__name__}: "
                            f"{first_line(err)}); save it again with save_to_disk") from None
        where = f"hf dataset '{path}'" + (f" split '{split}'" if split else "")
    else:
        try:
            ds = datasets.load_dataset(body, split=split)
        except Exception as err:  # noqa: BLE001 - offline, unknown, gated: all "cannot load"
            raise _hub_error(body, err) from None
        where = f"Hub dataset '{body}' split '{split}'"
    if ds._indices is not None:  # a saved selection: make the rows plain so workers can map the files
        ds = ds.flatten_indices()
    size = sum(os.path.getsize(f["filename"]) for f in ds.cache_files if os.path.isfile(f["filename"]))
    return ds, [Segment(where, 0, len(ds), size)], where


def _open_parquet(pattern: str, image_key: str, label_key: str | None):
    import datasets
    import pyarrow.parquet as pq

    files = parquet_files(pattern)
    if not files:
        raise _no_match(pattern)
    segments, start = [], 0
    for f in files:
        try:
            meta = pq.ParquetFile(f).metadata
        except Exception as err:  # noqa: BLE001 - not Parquet, truncated
            raise UserError(f"'{f}' is not a readable Parquet file ({type(err).__name__}: {first_line(err)}); "
                            "remove it or fix the glob") from None
        names = meta.schema.to_arrow_schema().names
        for key, what in ((image_key, "image"), (label_key, "label")):
            if key and key not in names:
                raise UserError(f"parquet file '{f}' has no {what} column '{key}' (its columns: "
                                f"{', '.join(names)}); set -o data.{what}_key=COLUMN")
        segments.append(Segment(f, start, meta.num_rows, os.path.getsize(f)))
        start += meta.num_rows
    columns = [image_key] + ([label_key] if label_key else [])
    try:
        ds = datasets.Dataset.from_parquet(files, columns=columns)
    except Exception as err:  # noqa: BLE001 - schemas that differ between files, a file that breaks mid-read
        raise UserError(f"cannot read parquet:{pattern} ({type(err).__name__}: {first_line(err)}); "
                        "its files must share one schema") from None
    if len(ds) != start:
        raise UserError(f"parquet:{pattern}: read {len(ds)} rows but the files' metadata says {start}; "
                        "clear the datasets cache (HF_DATASETS_CACHE) and retry")
    return ds, segments, f"parquet:{pattern}"


def image_kind(feature, where: str, column: str) -> str:
    """``encoded`` (Image feature, bytes, or a bytes/path struct) or ``array`` (uint8 pixels)."""
    from datasets import Image, Value

    if (isinstance(feature, Image) or (isinstance(feature, dict) and "bytes" in feature)
            or (isinstance(feature, Value) and feature.dtype in ("binary", "large_binary"))):
        return "encoded"
    leaf, depth = feature, 0
    while hasattr(leaf, "feature"):
        leaf, depth = leaf.feature, depth + 1
    dtype = getattr(leaf, "dtype", None)
    shape = getattr(feature, "shape", None)
    if dtype in ("uint8", "int16", "int32", "int64", "uint16") and (depth in (2, 3) or shape is not None):
        return "array"
    raise UserError(f"{where}: column '{column}' holds {feature!r}, not images (need the datasets Image "
                    "feature, encoded bytes, or uint8 pixel arrays); set -o data.image_key=COLUMN")


def read_labels(ds, key: str, reader: ArrowReader, classes: list[str] | None,
                label_names: list[str] | None) -> tuple[list[str], list[int]]:
    """Class list and integer labels of column ``key``: ClassLabel names, else string labels
    (sorted), else integers (``label_names`` or 0..max). With ``classes`` (the training set's),
    named labels are matched by name. A missing label, or one outside the class list, is a
    :class:`UserError` naming its file and row."""
    from datasets import ClassLabel

    column = ds.data.column(key)
    if column.null_count:
        row = int(np.flatnonzero(np.asarray(column.is_null()))[0])
        raise UserError(f"{reader.describe(row)} has no label; fill column '{key}' or drop the row")
    values = column.to_numpy(zero_copy_only=False)
    names = ds.features[key].names if isinstance(ds.features[key], ClassLabel) else None
    if values.dtype.kind in "iu":
        values = values.astype(np.int64)
        listed = names or classes or label_names or [str(i) for i in range(int(values.max(initial=-1)) + 1)]
        bad = np.flatnonzero((values < 0) | (values >= len(listed)))
        if len(bad):
            r = int(bad[0])
            raise UserError(f"label {int(values[r])} of {reader.describe(r)} is outside the class list "
                            f"({len(listed)} classes: {_short(listed)}); fix the label or the ClassLabel "
                            "names / data.class_map")
        if names is None or classes is None or list(names) == list(classes):
            return list(classes or listed), values.tolist()
        values = np.asarray(names, dtype=object)[values]  # named classes, maybe in another order
    elif values.dtype.kind not in "OUS":
        raise UserError(f"{reader.describe(0)}: label column '{key}' holds {values.dtype} values, not "
                        "integers or class names; set -o data.label_key=COLUMN")
    found, inverse = np.unique(values.astype(str), return_inverse=True)
    classes = list(found) if classes is None else list(classes)
    lookup = {c: i for i, c in enumerate(classes)}
    for j, name in enumerate(found.tolist()):
        if name not in lookup:
            r = int(np.flatnonzero(inverse == j)[0])
            raise UserError(f"label '{name}' of {reader.describe(r)} is not in the class list "
                            f"({len(classes)} classes: {_short(classes)}); fix column '{key}' or the classes")
    return classes, np.asarray([lookup[n] for n in found.tolist()], dtype=np.int64)[inverse].tolist()


def _short(names: list, n: int = 5) -> str:
    names = [str(x) for x in names]
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
