"""Streaming teacher scoring of the pool and top-k per class selection (SSLD).

The pool is scored in shards of ``shard_size`` images. Each shard keeps only its per-class
top-k candidates (:class:`TopK`) and is written atomically to ``<work>/shard-NNNNN.pt``;
finished shards are never rescored, so a killed run resumes where it stopped. Rank 0 then
merges the shard files one at a time into one running :class:`TopK`, so memory is
``O(classes x k)`` plus one shard, never O(pool).

Selection (SSLD, Wei et al. 2020, "Circumventing Outliers of AutoAugment with Knowledge
Distillation"; PaddleClas SSLD): for every class c, the ``k`` non-duplicate images with the
highest p(c) (at least ``min_prob``; ties by pool order). An image in the top-k of several
classes is kept once, for the class where its rank is best (then higher probability, then
lower class index); the other class is not refilled, so it may end with fewer than ``k``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..console import progress
from ..data.transforms import eval_transform
from .dedup import EVAL_CROPS, DedupIndex
from .pool import PoolImages, ShardBatches, collate_pool

if TYPE_CHECKING:
    from ..methods.teachers import TeacherSource

SHARD_FORMAT = 1


def shard_path(work: Path, shard: int) -> Path:
    return work / f"shard-{shard:05d}.pt"


class TopK:
    """Running top-``k`` per class: (C, <=k) probabilities and pool ids, best first (a
    vectorised bounded heap: all classes merged at once with one ``np.lexsort``).

    ``push`` takes scored images (n, C); ``merge`` takes per-class candidates (C, m). Each
    call keeps the k best of state + new by (probability desc, id asc): memory never exceeds
    ``C x (k + m)``. Entries of -inf (duplicates, below ``min_prob``) are never kept.
    """

    def __init__(self, num_classes: int, k: int) -> None:
        self.k = k
        self.probs = np.full((num_classes, 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((num_classes, 0), dtype=np.int64)

    def push(self, probs: np.ndarray, ids: np.ndarray) -> None:
        n = len(ids)
        self.merge(np.ascontiguousarray(probs.T), np.broadcast_to(ids.astype(np.int64), (probs.shape[1], n)))

    def merge(self, probs: np.ndarray, ids: np.ndarray) -> None:
        p = np.concatenate([self.probs, probs.astype(np.float32)], axis=1)
        i = np.concatenate([self.ids, ids], axis=1)
        order = np.lexsort((i, -p), axis=1)[:, :self.k]
        p, i = np.take_along_axis(p, order, 1), np.take_along_axis(i, order, 1)
        width = int(np.isfinite(p).sum(1).max(initial=0))  # drop all -inf columns
        self.probs, self.ids = p[:, :width], i[:, :width]

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Valid entries as flat arrays: (class, rank, id, prob)."""
        cls, rank = np.nonzero(np.isfinite(self.probs))
        return cls, rank, self.ids[cls, rank], self.probs[cls, rank]


def assign(top: TopK) -> list[tuple[int, int, float]]:
    """Resolve images in several classes' top-k: best rank, then higher prob, then lower
    class. Returns ``(id, class, prob)`` sorted by class, then descending prob, then id."""
    best: dict[int, tuple[int, float, int]] = {}
    for c, r, i, p in zip(*(a.tolist() for a in top.entries())):
        key = (r, -p, c)
        if i not in best or key < best[i]:
            best[i] = key
    rows = [(i, c, -neg_p) for i, (r, neg_p, c) in best.items()]
    rows.sort(key=lambda row: (row[1], -row[2], row[0]))
    return rows


# ------------------------------------------------------------------ one shard


@dataclass
class ShardScorer:
    """Accumulates one shard's batches: teacher probabilities -> dedup -> per-class top-k."""

    num_classes: int
    k: int
    min_prob: float
    dedup: DedupIndex | None
    shard: int = -1
    top: TopK = field(init=False)
    maxprob: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    scored: int = 0
    skipped: list = field(default_factory=list)
    dups: list = field(default_factory=list)

    def start(self, shard: int) -> None:
        self.shard, self.top, self.scored = shard, TopK(self.num_classes, self.k), 0
        self.maxprob, self.paths, self.skipped, self.dups = {}, {}, [], []

    def add(self, batch: dict, logits: torch.Tensor | None, embeds: torch.Tensor | None,
            path_of: Callable[[int], str]) -> None:
        self.skipped += [[p, why] for _, p, why in batch["skipped"]]
        if logits is None:
            return
        probs = F.softmax(logits.float(), dim=1).cpu()
        ids = batch["index"]
        keep = probs >= self.min_prob
        if self.dedup is not None:
            for j, m in enumerate(self.dedup.check(batch["phash"][:, 0], embeds)):
                if m is not None:
                    keep[j] = False
                    self.dups.append([path_of(int(ids[j])), self.dedup.paths[m.eval_index], m.method,
                                      m.score, m.distance, m.cosine])
        masked = torch.where(keep, probs, torch.tensor(float("-inf")))
        self.top.push(masked.numpy(), ids.numpy())
        self.maxprob.update(zip(ids.tolist(), probs.max(1).values.tolist()))
        self.scored += len(ids)

    def record(self, path_of: Callable[[int], str]) -> dict:
        cls, _, ids, probs = self.top.entries()
        return {"format": SHARD_FORMAT, "shard": self.shard, "scored": self.scored,
                "cls": torch.from_numpy(cls.astype(np.int64)), "idx": torch.from_numpy(ids.copy()),
                "prob": torch.from_numpy(probs.copy()),
                "maxprob": torch.tensor([self.maxprob[i] for i in ids.tolist()], dtype=torch.float32),
                "paths": [path_of(i) for i in ids.tolist()], "skipped": self.skipped, "dups": self.dups}


def write_shard(work: Path, record: dict) -> None:
    """Atomic: a shard file either holds a complete shard or does not exist."""
    from ..utils import atomic_write

    atomic_write(shard_path(work, record["shard"]), lambda tmp: torch.save(record, tmp))


def read_shard(path: Path) -> dict:
    from ..errors import UserError

    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"mining work file '{path}' is unreadable ({str(err).splitlines()[0][:100]}); "
                        "delete it to rescore that shard") from None
    if rec.get("format") != SHARD_FORMAT:
        raise UserError(f"mining work file '{path}' has an unknown format; delete it")
    return rec


# ------------------------------------------------------------------ merge


@dataclass
class Merged:
    """The merge of all shard files: global top-k, candidate info and counters."""

    top: TopK
    info: dict  # pool id -> (path, max prob), for ids in ``top`` only
    scored: int = 0
    skipped: int = 0
    skipped_paths: list = field(default_factory=list)
    duplicates: int = 0


def merge_shards(files: Iterable[Path], num_classes: int, k: int,
                 on_dups: Callable[[list], None] | None = None, max_listed: int = 100) -> Merged:
    """Fold shard files one at a time into a running top-k (memory independent of the pool)."""
    out = Merged(TopK(num_classes, k), {})
    for f in files:
        rec = read_shard(f)
        out.scored += rec["scored"]
        out.skipped += len(rec["skipped"])
        out.skipped_paths += rec["skipped"][:max(0, max_listed - len(out.skipped_paths))]
        out.duplicates += len(rec["dups"])
        if on_dups and rec["dups"]:
            on_dups(rec["dups"])
        cls, ids, probs = rec["cls"].numpy(), rec["idx"].numpy(), rec["prob"].numpy()
        if len(cls):
            width = int(np.bincount(cls, minlength=num_classes).max())
            p = np.full((num_classes, width), -np.inf, dtype=np.float32)
            i = np.zeros((num_classes, width), dtype=np.int64)
            slot = _slots(cls)
            p[cls, slot], i[cls, slot] = probs, ids
            out.top.merge(p, i)
        for j, (idx, path) in enumerate(zip(ids.tolist(), rec["paths"])):
            out.info.setdefault(idx, (path, float(rec["maxprob"][j])))
        live = set(out.top.ids[np.isfinite(out.top.probs)].tolist())
        out.info = {i: v for i, v in out.info.items() if i in live}
    return out


def _slots(cls: np.ndarray) -> np.ndarray:
    """Position of each entry among the entries of its class (entries in any order)."""
    order = np.argsort(cls, kind="stable")
    counts = np.bincount(cls)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.empty(len(cls), dtype=np.int64)
    slot[order] = np.arange(len(cls)) - np.repeat(starts, counts)
    return slot


# ------------------------------------------------------------------ teacher passes


def run_teacher(teacher: TeacherSource, images: torch.Tensor, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 batch -> (logits, raw pooled embeddings or None when not captured), on the CPU."""
    view = teacher.view_of(images.to(device, non_blocking=True))
    return view.logits.float().cpu(), None if view.embed is None else view.embed.float().cpu()


def _loader(dataset, workers: int, device: torch.device, **kw) -> DataLoader:
    return DataLoader(dataset, num_workers=workers, collate_fn=collate_pool,
                      pin_memory=device.type == "cuda", **kw)


def build_index(paths: Sequence[str], teacher: TeacherSource, batch_size: int, workers: int,
                device: torch.device, phash_threshold: int, embed_threshold: float,
                show_progress: bool = True) -> DedupIndex:
    """Fingerprint the evaluation images: pHashes of each at :data:`EVAL_CROPS` framings and,
    when the embedding test is on, the teacher's pooled embeddings."""
    pp = teacher.preprocessing
    ds = PoolImages(paths, eval_transform(pp.image_size, pp.crop_pct), EVAL_CROPS)
    use_embed = teacher.capture is not None and embed_threshold <= 1.0
    keep, hashes, embeds, skipped = [], [], [], []
    with progress(len(ds), "dedup index", show_progress) as bar:
        for batch in _loader(ds, workers, device, batch_size=batch_size):
            skipped += [p for _, p, _ in batch["skipped"]]
            if "image" in batch:
                keep += batch["index"].tolist()
                hashes.append(batch["phash"])
                if use_embed:
                    embeds.append(run_teacher(teacher, batch["image"], device)[1])
            bar.update(len(batch["skipped"]) + len(batch.get("index", [])))
    return DedupIndex([paths[i] for i in keep],
                      torch.cat(hashes) if hashes else torch.zeros(0, len(EVAL_CROPS), dtype=torch.long),
                      torch.cat(embeds) if embeds and embeds[0] is not None else None,
                      phash_threshold, embed_threshold, skipped)


def score_shards(paths: Sequence[str], shards: Sequence[int], shard_size: int, work: Path,
                 teacher: TeacherSource, scorer: ShardScorer, batch_size: int, workers: int,
                 device: torch.device, show_progress: bool = True) -> int:
    """Score the given shards of the pool, writing each one as soon as it is complete."""
    pp = teacher.preprocessing
    sampler = ShardBatches(shards, shard_size, len(paths), batch_size)
    ds = PoolImages(paths, eval_transform(pp.image_size, pp.crop_pct))
    total = sum(e - s for s, e in map(sampler.bounds, shards))
    path_of = paths.__getitem__
    current, written = None, 0
    with progress(total, "mine", show_progress) as bar:
        for batch in _loader(ds, workers, device, batch_sampler=sampler):
            shard = batch["first"] // shard_size
            if shard != current:
                if current is not None:
                    write_shard(work, scorer.record(path_of))
                    written += 1
                scorer.start(shard)
                current = shard
            logits, embeds = (run_teacher(teacher, batch["image"], device)
                              if "image" in batch else (None, None))
            scorer.add(batch, logits, embeds, path_of)
            bar.update(len(batch["skipped"]) + len(batch.get("index", [])))
    if current is not None:
        write_shard(work, scorer.record(path_of))
        written += 1
    return written
