"""The soft-label cache format: a teacher's top-k probabilities per augmented view.

``DIR/manifest.json`` names the teacher (spec, architecture, SHA-256 of its weights), the
data (image count, classes, fingerprint), ``k``, the number of views, the view recipe and
seed, and which views are complete. Per view ``v``, three memory-mapped ``.npy`` files hold,
for every training image in order: ``view-v.probs.npy`` (N, k) float16 probabilities
(renormalised over the top k), ``view-v.index.npy`` (N, k) class indices, and
``view-v.params.npy`` (N, 8) float32 view parameters (see ``data/views.py``) that replay
the exact crop, flip and mixup the teacher saw. An unreadable image has index -1 rows.

:class:`TeacherTable` reads the same kind of store for view mode 'fixed': one centre-crop view
per training image, full logits or the top k, keyed by the sample's index.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..utils import atomic_write_text
from .shards import ShardSplit
from .sources import Source

FORMAT = 1
FLOOR = 1e-8  # probability given to classes outside the stored top k (as logits: log FLOOR)


def fingerprint(source: Source | ShardSplit) -> str:
    """SHA-256 of the split's classes, labels and file names (or decoded pixels); for shards,
    of the classes, shard file names and sample counts (samples are keyed by their index,
    shard offset + position, which those fix)."""
    h = hashlib.sha256()
    if isinstance(source, ShardSplit):
        h.update(json.dumps([source.classes, source.fingerprint()]).encode())
        return h.hexdigest()
    h.update(json.dumps([source.classes, len(source)]).encode())
    h.update(np.asarray(source.labels, dtype=np.int64).tobytes())
    if source.reader is not None:  # hf:/parquet: rows
        h.update(source.reader.digest().encode())
    elif source.paths:
        for p in source.paths:
            h.update(Path(p).name.encode() + b"/" + Path(p).parent.name.encode() + b"\0")
    elif isinstance(source.array, torch.Tensor):
        h.update(source.array.numpy().tobytes())
    else:
        for img in source.array or []:
            h.update(img.numpy().tobytes())
    return h.hexdigest()


def view_files(root: Path, v: int) -> dict[str, Path]:
    return {k: root / f"view-{v:03d}.{k}.npy" for k in ("probs", "index", "params")}


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise UserError(f"soft-label cache '{root}' does not exist or has no manifest.json; "
                        "make it with kdistill cache")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"soft-label cache manifest '{path}' is corrupt") from None


def write_manifest(root: Path, manifest: dict) -> None:
    atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=2) + "\n")


class SoftLabels:
    """Reader: replays view parameters and dense teacher log-probabilities per image."""

    def __init__(self, root: str | Path, source: Source, teacher_sha: str | None = None) -> None:
        self.root = Path(root)
        m = read_manifest(self.root)
        self.manifest = m
        missing = [v for v in range(m["views"]) if v not in m["done_views"]]
        if missing:
            raise UserError(f"soft-label cache '{root}' is incomplete ({len(m['done_views'])} of "
                            f"{m['views']} views); finish it with the same kdistill cache command")
        if m["data"]["fingerprint"] != fingerprint(source) or m["data"]["classes"] != source.classes:
            raise UserError(f"soft-label cache '{root}' was made for other training data "
                            f"({m['data']['n']} images from {m['data']['root']}); make a new cache")
        if teacher_sha and m["teacher"]["sha256"] != teacher_sha:
            raise UserError(f"soft-label cache '{root}' was made with another teacher "
                            f"({m['teacher']['spec']}); make a new cache or drop --teacher")
        self.views, self.k, self.num_classes = m["views"], m["k"], len(m["data"]["classes"])
        self._arrays: dict | None = None
        self._check_files(m["data"]["n"])

    def _check_files(self, n: int) -> None:
        """Every view's shard files exist, map, and hold one row per training image."""
        for v in range(self.views):
            for kind, path in view_files(self.root, v).items():
                try:
                    rows = np.load(path, mmap_mode="r").shape[0]
                except (OSError, ValueError) as e:
                    raise UserError(f"soft-label cache '{self.root}' is damaged: cannot map {path.name} "
                                    f"({type(e).__name__}); make the cache again") from None
                if rows != n:
                    raise UserError(f"soft-label cache '{self.root}' is damaged: {path.name} has {rows} rows "
                                    f"for {n} images; make the cache again")

    def _open(self) -> dict:
        if self._arrays is None:  # opened lazily: each DataLoader worker maps the files itself
            self._arrays = {v: {k: np.load(p, mmap_mode="r") for k, p in view_files(self.root, v).items()}
                            for v in range(self.views)}
        return self._arrays

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def params(self, view: int, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._open()[view]["params"][index]))

    def extras(self, view: int, index: int) -> dict:
        a = self._open()[view]
        return {"t_logits": topk_log_probs(torch.from_numpy(np.asarray(a["probs"][index], np.float32)),
                                           torch.from_numpy(np.asarray(a["index"][index], np.int64)),
                                           self.num_classes)}

    def bytes_per_image(self) -> float:
        n = self.manifest["data"]["n"]
        total = sum(p.stat().st_size for v in range(self.views) for p in view_files(self.root, v).values())
        return total / max(n, 1)


def topk_renormalised(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest probabilities (renormalised to sum 1, float16) and their classes."""
    p, i = probs.float().topk(min(k, probs.shape[-1]), dim=-1)
    return (p / p.sum(-1, keepdim=True)).half(), i


def topk_log_probs(probs: torch.Tensor, index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dense float32 log-probabilities (..., C) from stored top-k ``probs`` (..., k) and their
    classes ``index`` (..., k; -1: none, e.g. an unreadable image). Classes outside the top k,
    and stored fp16 values that underflowed to 0, get :data:`FLOOR` (log(0) = -inf would make
    KL NaN); as logits at temperature T they then weigh ``(FLOOR / p)^(1/T)`` against a kept
    class of probability p (bench/table_topk.py measures what that costs)."""
    ok = index >= 0
    dense = torch.zeros(*index.shape[:-1], num_classes)
    dense.scatter_add_(-1, index.clamp_min(0), torch.where(ok, probs.float(), 0.0))
    return dense.clamp_min_(FLOOR).log_()


TABLE_FORMAT = 1


def table_files(root: Path, k: int) -> dict[str, Path]:
    """The arrays of a fixed-view teacher table: full logits, or top-k probabilities + classes."""
    names = ("probs", "index") if k else ("logits",)
    return {name: Path(root) / f"{name}.npy" for name in names}


class TeacherTable:
    """Reader of the view-'fixed' teacher table that ``engine/table.py`` writes.

    ``DIR/manifest.json`` (format, shape, dtype, ``k``, the data's fingerprint, the teacher's
    identity) beside memory-mapped ``.npy`` arrays with one row per training image, keyed by
    the sample's ``index``: ``logits.npy`` (N, C) float16 when ``k`` is 0, else ``probs.npy``
    (N, k) float16 (renormalised over the top k, as the soft-label cache stores them) and
    ``index.npy`` (N, k) int32 classes (-1 rows: no output, e.g. an unreadable image).
    ``table[i]`` is the ``t_logits`` of sample ``i``: the logits, or the top-k log-probabilities
    with :data:`FLOOR` elsewhere (:func:`topk_log_probs`). Only pages that are read come into
    memory; DataLoader workers map the files themselves."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        self.k, self.n = self.manifest["k"], self.manifest["data"]["n"]
        self.num_classes = len(self.manifest["data"]["classes"])
        self._arrays: dict | None = None

    def _open(self) -> dict:
        if self._arrays is None:
            self._arrays = {name: np.load(p, mmap_mode="r") for name, p in table_files(self.root, self.k).items()}
        return self._arrays

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index) -> torch.Tensor:
        """``t_logits`` of one sample index (C,) or of several (B, C)."""
        index = int(index) if np.ndim(index) == 0 else np.asarray(index, dtype=np.int64)
        a = self._open()
        if not self.k:
            return torch.from_numpy(np.array(a["logits"][index]))
        return topk_log_probs(torch.from_numpy(np.asarray(a["probs"][index], np.float32)),
                              torch.from_numpy(np.asarray(a["index"][index], np.int64)), self.num_classes)

    def bytes_per_image(self) -> float:
        return sum(p.stat().st_size for p in table_files(self.root, self.k).values()) / max(self.n, 1)
