"""Stage 1 of the data pipeline, which files: ImageFolder trees, PaddleClas list files,
unlabeled folders, Fashion-MNIST, Hugging Face ``datasets`` tables (``hf:DIR``,
``parquet:GLOB``: rows read from memory-mapped Arrow files by ``arrow``), and the split of a
data ROOT each comes from.

A source maps an index to ``(uint8 CHW RGB tensor | None, label)``: ``None`` marks an
unreadable file (:meth:`Source.read` says why), which loaders skip and count instead of
failing. Items and batches are made above this module (``datasets``, then ``loader``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..errors import UserError
from ..images import UnreadableImage, read_image
from ..utils import first_line
from .arrow import ArrowReader, is_arrow_spec, open_arrow
from .arrow import missing_split as arrow_missing_split
from .arrow import split_spec as arrow_split_spec
from .fmnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_VAL, fashion_mnist_split  # noqa: F401
from .shards import IMAGE_KEYS, LABEL_KEY

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass
class Source:
    """Labelled images of one split: file ``paths`` (decoded lazily), a decoded ``array``, or
    a ``reader`` giving item ``i`` from a memory-mapped table (``hf:``/``parquet:``; its
    ``describe``/``digest`` stand in for paths, and ``paths`` stays empty)."""

    name: str
    classes: list[str]
    labels: list[int]
    paths: list[str] = field(default_factory=list)
    array: torch.Tensor | list[torch.Tensor] | None = None  # decoded images (N, C, H, W)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) dropped at load
    origin: str = ""  # where the paths come from, for error messages (a list file and its base)
    reader: ArrowReader | None = None  # random access by row (picklable: workers map the files)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        """Nothing to decode into RAM: decoded arrays, or a memory-mapped table read by row."""
        return self.array is not None or self.reader is not None

    def load(self, i: int) -> torch.Tensor | None:
        return self.read(i)[0]

    def read(self, i: int) -> tuple[torch.Tensor | None, str]:
        """``(image, "")``, or ``(None, reason)`` for an unreadable file."""
        if self.array is not None:
            img = self.array[i]
            return (img.expand(3, -1, -1) if img.shape[0] == 1 else img), ""
        try:
            return (self.reader.image(i) if self.reader is not None else read_image(self.paths[i])), ""
        except Exception as err:  # noqa: BLE001 - any decode failure means "skip this file"
            return None, unreadable_reason(err)

    def describe(self, i: int) -> str:
        if self.reader is not None and self.array is None:
            return self.reader.describe(i)
        return self.paths[i] if self.paths else f"{self.name}[{i}]"

    def where(self, why: str = "") -> str:
        """The first image's path (and ``why`` it failed) and where paths come from, for an error."""
        first = f"the first is '{os.path.abspath(self.paths[0])}'" if self.paths else f"split '{self.name}'"
        if self.reader is not None and self.array is None and len(self):
            first = f"the first is {self.reader.describe(0)}"
        first += f" ({why})" if why else ""
        return f"{first}; {self.origin}" if self.origin else first

    def subset(self, indices: list[int]) -> "Source":
        arr = None
        if isinstance(self.array, torch.Tensor):
            arr = self.array[torch.as_tensor(indices, dtype=torch.long)]
        elif self.array is not None:
            arr = [self.array[i] for i in indices]
        return Source(self.name, self.classes, [self.labels[i] for i in indices],
                      [self.paths[i] for i in indices] if self.paths else [], arr, self.bad, self.origin,
                      self.reader.subset(indices) if self.reader is not None else None)


def unreadable_reason(err: BaseException) -> str:
    """One line saying why a file could not be decoded (its error's first line)."""
    text = first_line(err)
    return text if isinstance(err, UnreadableImage) else f"{type(err).__name__}: {text}"


# ------------------------------------------------------------------ ImageFolder / list files


def scan_folder(root: Path, name: str, classes: list[str] | None = None) -> Source:
    """``root/<class>/<image>`` (recursive inside each class folder)."""
    if not root.is_dir():
        raise UserError(f"data folder '{root}' does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"'{root}' has no class folders; expected {root}/<class>/<image>")
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise UserError(f"'{root}' has classes not in the training set: {', '.join(extra[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for cls in found:
        files = sorted(os.path.join(root / cls, rel) for rel in walk_images(root / cls))
        if not files:
            raise UserError(f"class folder '{root / cls}' has no images; remove it or add images")
        paths += files
        labels += [index[cls]] * len(files)
    return Source(name, classes, labels, paths)


def read_class_map(path: str) -> list[str]:
    """PaddleClas ``class_id_map_file``: lines ``<id> <name>``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"class map '{path}' does not exist")
    names: dict[int, str] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise UserError(f"class map '{path}' line {n}: expected '<id> <name>'")
        names[int(parts[0])] = parts[1].strip()
    if sorted(names) != list(range(len(names))):
        raise UserError(f"class map '{path}' must number classes 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def _split_list_line(line: str) -> tuple[str, int | None, str] | None:
    """``path [label] [# comment]`` -> (path, label or None, comment); None for blank or
    comment lines."""
    comment = ""
    if " #" in line:
        line, comment = line.split(" #", 1)
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = line.rsplit(maxsplit=1)
    if len(parts) == 2 and parts[1].lstrip("-").isdigit():
        return parts[0], int(parts[1]), comment.strip()
    return line, None, comment.strip()


def parse_list_line(line: str) -> tuple[str, int, str] | None:
    """``path label [# comment]`` -> (path, label, comment); None for blank/comment lines."""
    row = _split_list_line(line)
    if row is not None and row[1] is None:
        raise ValueError("expected 'path label'")
    return row  # type: ignore[return-value]


def parse_path_line(line: str) -> str | None:
    """``path label [# comment]`` or ``path`` -> path; None for blank or comment lines."""
    row = _split_list_line(line)
    return None if row is None else row[0]


def read_list(path: Path, name: str, classes: list[str] | None = None,
              class_map: str | None = None) -> Source:
    """PaddleClas list file: ``<path> <label>`` per line, paths relative to the file."""
    if not path.is_file():
        raise UserError(f"list file '{path}' does not exist")
    paths, labels = [], []
    base = path.parent
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = parse_list_line(line)
        except ValueError:
            raise UserError(f"list file '{path}' line {n}: expected '<path> <label>'") from None
        if row is None:
            continue
        p, label, _ = row
        paths.append(p if os.path.isabs(p) else str(base / p))
        labels.append(label)
    if not paths:
        raise UserError(f"list file '{path}' lists no images")
    if min(labels) < 0:
        raise UserError(f"list file '{path}' has a negative label")
    if classes is None:
        classes = read_class_map(class_map) if class_map else [str(i) for i in range(max(labels) + 1)]
    if max(labels) >= len(classes):
        raise UserError(f"list file '{path}' has label {max(labels)} but only {len(classes)} classes")
    origin = f"list file '{path}' resolves relative paths against '{os.path.abspath(base)}'"
    return Source(name, classes, labels, paths, origin=origin)


def open_split(spec: str, name: str, classes: list[str] | None = None, class_map: str | None = None,
               image_key: str | None = None, label_key: str | None = None) -> Source:
    """A folder of class folders, a list file, or an ``hf:``/``parquet:`` table (its image and
    label columns ``image_key``/``label_key``, default image/label)."""
    if is_arrow_spec(spec):
        return open_table(spec, name, classes, class_map, image_key, label_key)
    p = Path(spec)
    if p.is_dir():
        return scan_folder(p, name, classes)
    if p.is_file():
        return read_list(p, name, classes, class_map)
    raise UserError(f"{name} data '{spec}' does not exist (need a folder of class folders or a list file)")


def open_table(spec: str, name: str, classes: list[str] | None = None, class_map: str | None = None,
               image_key: str | None = None, label_key: str | None = None, labeled: bool = True) -> Source:
    """A split of a Hugging Face table (see :mod:`kdistill.data.arrow`) as a :class:`Source`."""
    names = read_class_map(class_map) if class_map and classes is None else None
    classes, labels, reader = open_arrow(spec, name, classes, names, arrow_key(image_key, "image"),
                                         arrow_key(label_key, "label"), labeled)
    return Source(name, classes, labels, reader=reader)


def arrow_key(key: str | None, what: str) -> str:
    """``data.image_key``/``label_key`` for a table: None or WebDataset's member names
    (``jpg;png``, ``cls``) mean the column ``image``/``label``."""
    wds = set(IMAGE_KEYS) if what == "image" else {LABEL_KEY}
    return what if not key or set(key.lower().split(";")) <= wds else key


# ------------------------------------------------------------------ unlabeled images

UNLABELED = -1  # the target of an image without a label


class PathTable(Sequence[str]):
    """An append-only list of paths stored as UTF-8 bytes + end offsets, relative to ``base``
    (~1/3 of the memory of a list of ``str``, nothing for DataLoader workers to copy on access)."""

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


def walk_images(root: Path) -> Iterator[str]:
    """The image files under ``root`` at any depth, relative to ``root``, one at a time, in
    the order of their sorted paths. Hidden files and folders (macOS ``._x.jpg`` resource
    forks, ``.cache/``) are skipped; symlinked folders are followed."""
    def walk(folder: str, rel: str) -> Iterator[str]:
        try:
            with os.scandir(folder) as it:  # a folder sorts as "name/", as inside a full path
                entries = sorted((e.name + "/" if e.is_dir() else e.name, e.name)
                                 for e in it if not e.name.startswith("."))
        except OSError:  # unreadable folder: skipped, as os.walk does
            return
        for key, name in entries:
            path = os.path.join(rel, name) if rel else name
            if key.endswith("/"):
                yield from walk(os.path.join(folder, name), path)
            elif name.lower().endswith(IMAGE_EXTENSIONS):
                yield path

    yield from walk(str(root), "")


def scan_images(root: Path) -> PathTable:
    """Every image file under ``root`` (see :func:`walk_images`; no class structure needed),
    without materialising a list of all names."""
    table = PathTable(str(root))
    for rel in walk_images(root):
        table.append(rel)
    return table


def read_paths(path: Path) -> PathTable:
    """Image paths of a list file (``path [label] [# comment]`` lines; labels ignored),
    relative to the file's folder."""
    table = PathTable(str(path.parent))
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            p = parse_path_line(line)
            if p is not None:
                table.append(p)
    return table


def open_unlabeled(spec: str, classes: list[str], name: str = "unlabeled", image_key: str | None = None) -> Source:
    """A folder (searched recursively), list file or ``hf:``/``parquet:`` table of images
    whose labels are not used: every target is ``UNLABELED``."""
    if is_arrow_spec(spec):
        src = open_table(spec, name, list(classes), image_key=image_key, labeled=False)
        if not len(src):
            raise UserError(f"{name} images '{spec}' hold no rows")
        return dataclasses.replace(src, labels=[UNLABELED] * len(src))
    p = Path(spec)
    if p.is_dir():
        paths = list(scan_images(p))
    elif p.is_file():
        paths = list(read_paths(p))
    else:
        raise UserError(f"{name} images '{spec}' do not exist (need a folder or a list file)")
    if not paths:
        raise UserError(f"{name} images '{spec}' hold no image files")
    return Source(name, classes, [UNLABELED] * len(paths), paths)


# ------------------------------------------------------------------ Fashion-MNIST


def fashion_mnist(split: str) -> Source:
    """train = first 55,000 official training images, val = last 5,000, test = official test."""
    images, labels = fashion_mnist_split(split)
    arr = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
    return Source(f"fashion-mnist/{split}", list(FASHION_MNIST_CLASSES), labels.tolist(), array=arr)


# ------------------------------------------------------------------ a split of a data ROOT


def split_candidates(root: str, split: str) -> list[Path]:
    """The paths :func:`split_spec` tries for ``split``: ``ROOT/<split>``, ``<split>_list.txt``,
    ``<split>.txt`` in a folder ROOT; a list-file ROOT itself for 'train', else its sibling
    with 'train' in the name replaced by the split (none when the name has no 'train')."""
    if is_arrow_spec(root):
        return []
    p = Path(root)
    if p.is_dir():
        return [p / split, p / f"{split}_list.txt", p / f"{split}.txt"]
    if p.is_file():
        if split == "train":
            return [p]
        if "train" in p.name:
            return [p.with_name(p.name.replace("train", split))]
    return []


def split_spec(root: str, split: str, explicit: str | None = None) -> str | None:
    """Where ``split`` lives: ``explicit``, else the first :func:`split_candidates` that exists."""
    if explicit:
        return explicit
    if is_arrow_spec(root):
        return arrow_split_spec(root, split)
    return next((str(c) for c in split_candidates(root, split) if c.exists()), None)


def missing_split(root: str, split: str) -> UserError:
    """The error for a ROOT without ``split``, naming what was looked for."""
    if is_arrow_spec(root):
        return arrow_missing_split(root, split)
    looked = split_candidates(root, split)
    if Path(root).is_dir():
        return UserError(f"data root '{root}' has no '{split}' split (expected {looked[0]}/<class>/<image>, "
                         f"{looked[1]} or {looked[2]})")
    where = (f"looked for the {split} list '{looked[0]}'" if looked else f"a {split} list is looked for "
             f"beside it only when its name contains 'train' (train_list.txt -> {split}_list.txt)")
    return UserError(f"data root '{root}' (a list file) has no '{split}' split: {where}"
                     + (f"; or pass it with -o data.{split}=LIST" if split in ("val", "test") else ""))


def open_source(root: str, split: str, explicit: str | None = None,
                classes: list[str] | None = None, class_map: str | None = None,
                required: bool = True, image_key: str | None = None,
                label_key: str | None = None) -> Source | None:
    """Open one split of ROOT (folder, list file, ``hf:DIR``, ``parquet:GLOB`` or
    'fashion-mnist'); ``image_key``/``label_key``: a table's columns (``data.image_key``...)."""
    if root == "fashion-mnist" and not explicit:
        return fashion_mnist(split)
    if not explicit and not is_arrow_spec(root) and not Path(root).exists():
        raise UserError(f"data root '{root}' does not exist (give a folder with train/ and val/, "
                        "a list file, hf:DIR, parquet:GLOB or 'fashion-mnist')")
    spec = split_spec(root, split, explicit)
    if spec is None:
        if required:
            raise missing_split(root, split)
        return None
    return open_split(spec, split, classes, class_map, image_key, label_key)


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
