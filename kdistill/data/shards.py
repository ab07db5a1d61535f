"""WebDataset shards (``wds:DIR``, ``wds:PATTERN``): which tar files hold a split, how many
samples each holds, reading one tar's samples, and writing shards with their ``_info.json``.

The ``webdataset`` package only reads and writes the tars here; which process reads which
shard, and in what order, is planned by kdistill (``data.streams``), because webdataset's
own splitting is a fixed slice per rank/worker without sample counts.

``_info.json`` (written by ``kdistill pack``) has the shape timm's ``ReaderWds`` reads,
plus kdistill's keys::

    {"name": ..., "classes": [...], "image_key": "jpg", "label_key": "cls",
     "splits": {"train": {"name": "train", "num_samples": N, "filenames": [...],
                          "shard_lengths": [...], "class_counts": [...]}}}

A sample's ``index`` is its position in the split: the samples of the shards before it
(from ``shard_lengths``) plus its position inside its tar, so it is stable from run to run
and keys per-image state (the teacher table, the soft-label cache) as a file path would.
"""
from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import UserError
from ..utils import atomic_path, atomic_write_text, first_line

PREFIX = "wds:"
INFO_FILE = "_info.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LABEL_KEY = "cls"
SPLIT_NAMES = ("train", "val", "test", "unlabeled")


def is_wds(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(PREFIX)


def image_keys(key: str | None) -> tuple[str, ...]:
    """``data.image_key`` (``jpg;png``: the first one a sample has) as a tuple of extensions."""
    if not key:
        return IMAGE_KEYS
    return tuple(k.strip().lower().lstrip(".") for k in key.replace(",", ";").split(";") if k.strip())


class ShardError(Exception):
    """A shard that cannot be read from some point on (truncated, not a tar, unreadable)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


@dataclass
class Sample:
    """One sample of a shard: the encoded image (None when the sample has none), its label
    (None without a label member), its ``__key__`` and its index in the split."""

    key: str
    index: int
    data: bytes | None
    label: int | None
    error: str = ""  # why the sample is unusable (no image member, bad label); "" when fine


@dataclass
class ShardSplit:
    """The shards of one split: tar paths, samples per shard, classes."""

    name: str
    classes: list[str]
    urls: list[str]
    lengths: list[int]
    image_keys: tuple[str, ...] = IMAGE_KEYS
    label_key: str | None = LABEL_KEY
    class_counts: list[int] | None = None  # samples per class, when _info.json has them
    origin: str = ""  # the spec, for messages
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = [0, *accumulate(self.lengths)][:-1]

    def __len__(self) -> int:
        return sum(self.lengths)

    @property
    def labeled(self) -> bool:
        return self.label_key is not None

    def samples(self, shard: int) -> Iterator[Sample]:
        """The samples of shard ``shard`` in tar order; a :class:`ShardError` when the tar
        breaks off (what was read before is yielded first)."""
        yield from read_shard(self.urls[shard], self.offsets[shard], self.image_keys,
                              self.label_key, len(self.classes) if self.classes else None)

    def fingerprint(self) -> dict:
        """Shard file names and their sample counts (a resumed run must read the same data)."""
        return {"shards": [os.path.basename(u) for u in self.urls], "lengths": list(self.lengths)}

    def where(self) -> str:
        return f"{len(self.urls)} shards from '{self.origin}' (the first is '{self.urls[0]}')"


# ------------------------------------------------------------------ reading


def _decode_label(raw: bytes, url: str, key: str) -> int:
    try:
        return int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"sample '{key}' has a label that is not an integer: {raw[:20]!r}") from None


def read_shard(url: str, offset: int, keys: Sequence[str], label_key: str | None,
               num_classes: int | None) -> Iterator[Sample]:
    """Samples of one tar, grouped by ``__key__`` (webdataset's tar iterator + grouping).

    A duplicate ``__key__`` inside the tar, or the tar breaking off, raises
    :class:`ShardError` after the samples before it; a sample without an image or with a bad
    label is yielded with its ``error`` set (skipped and counted by the caller)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    seen: set[str] = set()
    position = 0
    try:
        with open(url, "rb") as fh:
            for raw in group_by_keys(tar_file_expander([{"url": url, "stream": fh}])):
                key = raw["__key__"]
                if key in seen:
                    raise ShardError(url, f"duplicate __key__ '{key}' (each sample needs its own key; "
                                          "repack the shard with kdistill pack)")
                seen.add(key)
                yield _sample(raw, key, offset + position, keys, label_key, num_classes, url)
                position += 1
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        # webdataset appends the stream and url to the error's args: keep the message
        what = err.args[0] if err.args and isinstance(err.args[0], str) else first_line(err)
        raise ShardError(url, f"not a readable tar after {position} samples ({what})") from None


def _sample(raw: dict, key: str, index: int, keys: Sequence[str], label_key: str | None,
            num_classes: int | None, url: str) -> Sample:
    data = next((raw[k] for k in keys if k in raw), None)
    label, error = None, ""
    if data is None:
        error = f"sample '{key}' has no image member ({'/'.join(keys)}); members: {sorted(k for k in raw if not k.startswith('__'))}"
    if label_key is not None:
        if label_key not in raw:
            error = error or f"sample '{key}' has no '{label_key}' member (set data.label_key)"
        else:
            try:
                label = _decode_label(raw[label_key], url, key)
            except ValueError as err:
                error = error or str(err)
            else:
                if label < 0 or (num_classes is not None and label >= num_classes):
                    error = error or f"sample '{key}' has label {label}, outside the {num_classes} classes"
    return Sample(key, index, data, label, error)


def count_shard(url: str, label_key: str | None, num_classes: int | None = None) -> tuple[int, list[int]]:
    """``(samples, per-class counts)`` of one tar, reading only the label members (a tar is
    read sequentially once; for shards without ``_info.json``)."""
    counts: dict[int, int] = {}
    n = 0
    for s in read_shard(url, 0, (), label_key, num_classes):
        n += 1
        if s.label is not None:
            counts[s.label] = counts.get(s.label, 0) + 1
    width = max(counts, default=-1) + 1
    return n, [counts.get(c, 0) for c in range(width)]


def _unreadable(err: ShardError) -> UserError:
    return UserError(f"shard '{err.url}' is {err.reason}; rewrite it (kdistill pack) or leave it out "
                     "of the pattern")


def check_shard(url: str, keys: Sequence[str], label_key: str | None, num_classes: int | None) -> None:
    """Read one whole shard and raise a :class:`UserError` naming it if it is not a tar,
    is truncated, repeats a key, or a sample lacks its image / label or has a bad label."""
    try:
        for s in read_shard(url, 0, keys, label_key, num_classes):
            if s.error:
                raise UserError(f"shard '{url}': {s.error}; fix the shard or set "
                                "data.image_key / data.label_key")
    except ShardError as err:
        raise _unreadable(err) from None


# ------------------------------------------------------------------ opening a split


def read_info(folder: str | Path) -> dict | None:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"'{path}' is not valid JSON ({first_line(err)}); rewrite it with kdistill pack") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise UserError(f"'{path}' has no 'splits' mapping; rewrite it with kdistill pack")
    return info


def expand(pattern: str) -> list[str]:
    """Brace patterns (``train-{000000..000099}.tar``) and globs, expanded, sorted as given."""
    from braceexpand import braceexpand

    urls: list[str] = []
    for part in braceexpand(pattern):
        urls += sorted(glob.glob(part)) if glob.has_magic(part) else [part]
    return urls


def open_wds(spec: str, split: str, classes: list[str] | None = None, image_key: str | None = None,
             label_key: str | None = LABEL_KEY, labeled: bool = True) -> ShardSplit | None:
    """Split ``split`` of ``wds:DIR`` (``DIR/_info.json``, else ``DIR/<split>-*.tar``) or
    ``wds:PATTERN`` (that split's tars). None when ``DIR`` has no such split.

    Sample counts come from ``_info.json`` (beside the tars); without it every tar is read
    once to count. The first shard is read whole, so a shard set with the wrong keys or
    labels fails here with one line rather than mid-epoch."""
    body = spec[len(PREFIX):] if is_wds(spec) else spec
    folder = Path(body)
    info = None
    if folder.is_dir():
        info = read_info(folder)
        if info is not None:
            entry = info["splits"].get(split)
            if entry is None:
                return None
            urls = [str(folder / f) for f in entry["filenames"]]
            lengths = [int(n) for n in entry["shard_lengths"]]
        else:
            urls, lengths = expand(str(folder / f"{split}-*.tar")), []
            if not urls:
                return None
    else:
        urls, lengths = expand(body), []
        info = read_info(Path(body).parent)
        if info is not None and urls:  # counts of the matched tars from the folder's _info.json
            known = {}
            for entry in info["splits"].values():
                known.update(zip(entry["filenames"], entry["shard_lengths"]))
            names = [os.path.basename(u) for u in urls]
            if all(n in known for n in names):
                lengths = [int(known[n]) for n in names]
    if not urls:
        raise UserError(f"{split} shards '{spec}' match no file; check the pattern "
                        "(e.g. wds:DIR/train-{000000..000099}.tar) or give wds:DIR")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise UserError(f"{split} shard '{missing[0]}' does not exist ({len(missing)} of {len(urls)} "
                        "listed shards are missing); fix the pattern or _info.json")
    info = info or {}
    keys = image_keys(image_key or info.get("image_key"))
    entry = info["splits"].get(split) if info.get("splits") else None
    if entry is not None and "class_counts" not in entry and (split == "unlabeled" or not info.get("classes")):
        labeled = False  # packed without labels (an unlabeled pool): no cls member to read
    lkey = (label_key or info.get("label_key") or LABEL_KEY) if labeled else None
    if classes is None:
        classes = info.get("classes")
    class_counts = None
    if lengths and info:
        entry = info["splits"].get(split) or {}
        if entry.get("filenames") == [os.path.basename(u) for u in urls]:
            class_counts = entry.get("class_counts")
    if not lengths:  # no _info.json: count once
        try:
            counted = [count_shard(u, lkey) for u in urls]
        except ShardError as err:
            raise _unreadable(err) from None
        lengths = [n for n, _ in counted]
        width = max((len(c) for _, c in counted), default=0)
        class_counts = [sum(c[i] for _, c in counted if i < len(c)) for i in range(width)] if lkey else None
        if classes is None and lkey:
            classes = [str(i) for i in range(width)]
    if classes is None:
        classes = []
    check_shard(urls[0], keys, lkey, len(classes) if classes and lkey else None)
    return ShardSplit(split, list(classes), urls, lengths, keys, lkey, class_counts, spec)


# ------------------------------------------------------------------ writing


class ShardWriter:
    """Writes samples into ``DIR/<split>-NNNNNN.tar`` of ``shard_size`` samples each, every
    tar atomically (a killed writer leaves no half tar under a shard's name), and records
    each shard's length and class counts for ``_info.json``. ``first`` numbers the first tar
    (a writer that resumes continues the numbering)."""

    def __init__(self, folder: str | Path, split: str, shard_size: int, image_ext: str = "jpg",
                 first: int = 0) -> None:
        self.folder, self.split, self.shard_size, self.ext = Path(folder), split, shard_size, image_ext
        self.folder.mkdir(parents=True, exist_ok=True)
        self.filenames: list[str] = []
        self.lengths: list[int] = []
        self.class_counts: dict[int, int] = {}
        self.next = first
        self._buffer: list[tuple[str, bytes, int | None, str]] = []

    def write(self, key: str, data: bytes, label: int | None = None, ext: str | None = None) -> None:
        self._buffer.append((key, data, label, ext or self.ext))
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as one tar (nothing when the buffer is empty)."""
        if not self._buffer:
            return
        from webdataset import TarWriter

        name = f"{self.split}-{self.next:06d}.tar"
        with atomic_path(self.folder / name) as tmp, open(tmp, "wb") as fh:
            writer = TarWriter(fh, encoder=False, mtime=0)  # an int: a float mtime adds a PAX header (~1 KiB) per member
            for key, data, label, ext in self._buffer:
                sample = {"__key__": key, ext: data}
                if label is not None:
                    sample[LABEL_KEY] = str(label).encode()
                    self.class_counts[label] = self.class_counts.get(label, 0) + 1
                writer.write(sample)
            writer.close()
        self.filenames.append(name)
        self.lengths.append(len(self._buffer))
        self.next += 1
        self._buffer = []

    def close(self) -> dict:
        """Flush and return this split's ``_info.json`` entry."""
        self.flush()
        return split_entry(self.split, self.filenames, self.lengths, self.class_counts)


def split_entry(split: str, filenames: list[str], lengths: list[int],
                class_counts: dict[int, int] | None = None, num_classes: int | None = None) -> dict:
    entry = {"name": split, "num_samples": sum(lengths), "filenames": list(filenames),
             "shard_lengths": list(lengths)}
    if class_counts:
        width = num_classes or max(class_counts) + 1
        entry["class_counts"] = [class_counts.get(c, 0) for c in range(width)]
    return entry


def write_info(folder: str | Path, splits: dict[str, dict], classes: list[str] | None,
               name: str = "", image_key: str = "jpg") -> Path:
    """Write (or update: other splits are kept) ``folder/_info.json`` atomically."""
    folder = Path(folder)
    info = read_info(folder) or {"name": name or folder.name, "splits": {}}
    info["splits"].update(splits)
    if classes is not None:
        info["classes"] = list(classes)
    info["image_key"], info["label_key"] = image_key, LABEL_KEY
    path = folder / INFO_FILE
    atomic_write_text(path, json.dumps(info, indent=1) + "\n")
    return path


def encode_sample_bytes(img) -> bytes:
    """A uint8 (3, H, W) tensor as JPEG bytes at quality 95 (what ``pack`` stores for
    decoded sources such as Fashion-MNIST)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
    return buf.getvalue()
