"""Streaming teacher scoring of the pool and top-k per class selection (SSLD).

The pool is scored shard by shard (a tar, or a chunk of paths: :mod:`.pool`). Each shard
keeps only its per-class top-k candidates (:class:`TopK`) with what the output needs of
them (pool index, key, pHash) and is written atomically to ``<work>/shard-NNNNN.pt``;
finished shards are never rescored, so a killed run resumes where it stopped. Memory is
``O(classes x k)`` plus the shards in flight (one per DataLoader worker), never O(pool):
the main process keeps one running :class:`TopK` of the finished shards, and rank 0 merges
the shard files one at a time into another.

That running top-k also prunes: an entry below the current k-th best probability of its
class can never be selected (the k entries above it are already in shard files), so a
shard file holds only entries that may still matter and the work folder stops growing
with the pool once the per-class top-k has filled. The selection is the same whatever the
order shards finish in, or whether a run was resumed.

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

from ..console import log, progress
from ..data.transforms import eval_transform
from ..utils import freeze_before_fork
from .dedup import EVAL_CROPS, DedupIndex
from .pool import Pool, ShardStream

if TYPE_CHECKING:
    from ..methods.teachers import TeacherSource

SHARD_FORMAT = 2
MAX_LISTED = 100  # skipped images / broken shards named in the summary


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

    def merge_entries(self, cls: np.ndarray, ids: np.ndarray, probs: np.ndarray) -> None:
        """Merge flat (class, id, prob) entries (any order)."""
        if not len(cls):
            return
        num_classes = self.probs.shape[0]
        width = int(np.bincount(cls, minlength=num_classes).max())
        p = np.full((num_classes, width), -np.inf, dtype=np.float32)
        i = np.zeros((num_classes, width), dtype=np.int64)
        slot = _slots(cls)
        p[cls, slot], i[cls, slot] = probs, ids
        self.merge(p, i)

    def floor(self) -> np.ndarray:
        """Per class, the probability below which nothing can enter any more (the k-th
        best so far; -inf while a class holds fewer than k)."""
        out = np.full(self.probs.shape[0], -np.inf, dtype=np.float32)
        if self.probs.shape[1] == self.k:
            out = self.probs[:, self.k - 1].copy()
        return out

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Valid entries as flat arrays: (class, rank, id, prob)."""
        cls, rank = np.nonzero(np.isfinite(self.probs))
        return cls, rank, self.ids[cls, rank], self.probs[cls, rank]

    def live(self) -> set[int]:
        return set(self.ids[np.isfinite(self.probs)].tolist())


def _slots(cls: np.ndarray) -> np.ndarray:
    """Position of each entry among the entries of its class (entries in any order)."""
    order = np.argsort(cls, kind="stable")
    counts = np.bincount(cls)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.empty(len(cls), dtype=np.int64)
    slot[order] = np.arange(len(cls)) - np.repeat(starts, counts)
    return slot


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
    """Accumulates one shard's batches: teacher probabilities -> dedup -> per-class top-k.
    ``floor`` (per class, from the running top-k of finished shards) drops entries that
    can no longer be selected; ``describe(shard, key)`` names an image in the dedup report."""

    num_classes: int
    k: int
    min_prob: float
    dedup: DedupIndex | None
    shard: int = -1
    floor: np.ndarray | None = None
    describe: Callable[[int, str], str] | None = None
    top: TopK = field(init=False)
    info: dict = field(default_factory=dict)  # pool id -> (key, phash), this shard's images
    scored: int = 0
    seen: int = 0
    skipped: list = field(default_factory=list)
    dups: list = field(default_factory=list)

    def start(self, shard: int, floor: np.ndarray | None = None) -> "ShardScorer":
        self.shard, self.top, self.scored, self.seen, self.floor = shard, TopK(self.num_classes, self.k), 0, 0, floor
        self.info, self.skipped, self.dups = {}, [], []
        return self

    def add(self, batch: dict, logits: torch.Tensor | None, embeds: torch.Tensor | None) -> None:
        self.skipped += [[k, why] for k, why in batch["skipped"]]
        self.seen += batch.get("seen", len(batch["skipped"]) + len(batch.get("keys", ())))
        if logits is None:
            return
        probs = F.softmax(logits.float(), dim=1).cpu()
        ids, keys = batch["index"], batch["keys"]
        keep = probs >= self.min_prob
        if self.floor is not None:
            keep &= probs >= torch.from_numpy(self.floor).unsqueeze(0)
        hashes = batch["phash"][:, 0] if "phash" in batch else torch.zeros(len(ids), dtype=torch.long)
        if self.dedup is not None:
            for j, m in enumerate(self.dedup.check(hashes, embeds)):
                if m is not None:
                    keep[j] = False
                    name = self.describe(self.shard, keys[j]) if self.describe else keys[j]
                    self.dups.append([name, self.dedup.paths[m.eval_index],
                                      m.method, m.score, m.distance, m.cosine])
        masked = torch.where(keep, probs, torch.tensor(float("-inf")))
        self.top.push(masked.numpy(), ids.numpy())
        live = keep.any(1).tolist()
        self.info.update((i, (k, h)) for i, k, h, ok in zip(ids.tolist(), keys, hashes.tolist(), live) if ok)
        self.scored += len(ids)

    def record(self, broken: str = "", missing: int = 0) -> dict:
        cls, _, ids, probs = self.top.entries()
        unique, row = np.unique(ids, return_inverse=True)
        info = [self.info[i] for i in unique.tolist()]
        return {"format": SHARD_FORMAT, "shard": self.shard, "scored": self.scored, "seen": self.seen,
                "cls": torch.from_numpy(cls.astype(np.int64)), "row": torch.from_numpy(row.astype(np.int64)),
                "prob": torch.from_numpy(probs.copy()), "index": torch.from_numpy(unique.astype(np.int64)),
                "keys": [k for k, _ in info], "phash": torch.tensor([h for _, h in info], dtype=torch.long),
                "skipped": self.skipped, "dups": self.dups, "broken": broken, "missing": missing}


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
    if not isinstance(rec, dict) or rec.get("format") != SHARD_FORMAT:
        raise UserError(f"mining work file '{path}' has an unknown format; delete it to rescore that shard")
    return rec


def fold(top: TopK, rec: dict) -> None:
    """Merge one shard record's entries into ``top``."""
    idx = rec["index"].numpy()
    top.merge_entries(rec["cls"].numpy(), idx[rec["row"].numpy()], rec["prob"].numpy())


# ------------------------------------------------------------------ merge


@dataclass
class Merged:
    """The merge of all shard files: global top-k, candidate info and counters."""

    top: TopK
    info: dict  # pool id -> (shard, key, phash), for ids in ``top`` only
    scored: int = 0
    seen: int = 0
    skipped: int = 0
    skipped_paths: list = field(default_factory=list)
    duplicates: int = 0
    broken: list = field(default_factory=list)  # [shard, reason, samples never read]
    missing: int = 0


def merge_shards(files: Iterable[Path], num_classes: int, k: int,
                 on_dups: Callable[[list], None] | None = None, max_listed: int = MAX_LISTED,
                 describe: Callable[[int, str], str] = lambda shard, key: key) -> Merged:
    """Fold shard files one at a time into a running top-k (memory independent of the pool)."""
    out = Merged(TopK(num_classes, k), {})
    for f in files:
        rec = read_shard(f)
        shard = int(rec["shard"])
        out.scored += rec["scored"]
        out.seen += rec["seen"]
        out.skipped += len(rec["skipped"])
        room = max(0, max_listed - len(out.skipped_paths))
        out.skipped_paths += [[describe(shard, key), why] for key, why in rec["skipped"][:room]]
        out.duplicates += len(rec["dups"])
        if rec["broken"]:
            out.missing += rec["missing"]
            if len(out.broken) < max_listed:
                out.broken.append([shard, rec["broken"], rec["missing"]])
        if on_dups and rec["dups"]:
            on_dups(rec["dups"])
        fold(out.top, rec)
        live = out.top.live()
        for j, (idx, key) in enumerate(zip(rec["index"].tolist(), rec["keys"])):
            if idx in live:
                out.info[idx] = (shard, key, int(rec["phash"][j]))
        out.info = {i: v for i, v in out.info.items() if i in live}
    return out


# ------------------------------------------------------------------ teacher passes


def run_teacher(teacher: TeacherSource, images: torch.Tensor, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 batch -> (logits, raw pooled embeddings or None when not captured), on the CPU."""
    view = teacher.view_of(images.to(device, non_blocking=True))
    return view.logits.float().cpu(), None if view.embed is None else view.embed.float().cpu()


def _loader(dataset: ShardStream, workers: int, device: torch.device) -> DataLoader:
    # batches are made by the workers (one shard's images each): batch_size=None
    freeze_before_fork(workers)
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda")


def build_index(pools: Sequence[Pool], teacher: TeacherSource, batch_size: int, workers: int,
                device: torch.device, phash_threshold: int, embed_threshold: float,
                show_progress: bool = True) -> DedupIndex:
    """Fingerprint the evaluation images: pHashes of each at :data:`EVAL_CROPS` framings and,
    when the embedding test is on, the teacher's pooled embeddings. Streamed shard by shard
    like the pool; memory is what the index itself holds (per evaluation image)."""
    pp = teacher.preprocessing
    tf = eval_transform(pp.image_size, pp.crop_pct)
    use_embed = teacher.capture is not None and embed_threshold <= 1.0
    names, hashes, embeds, skipped = [], [], [], []
    with progress(sum(len(p) for p in pools), "dedup index", show_progress) as bar:
        for pool in pools:
            ds = ShardStream(pool, range(pool.num_shards), tf, batch_size, EVAL_CROPS)
            for batch in _loader(ds, workers, device):
                skipped += [pool.describe(batch["shard"], k) for k, _ in batch["skipped"]]
                if "image" in batch:
                    names += [pool.describe(batch["shard"], k) for k in batch["keys"]]
                    hashes.append(batch["phash"])
                    if use_embed:
                        embeds.append(run_teacher(teacher, batch["image"], device)[1])
                bar.update(batch["seen"])
    return DedupIndex(names, torch.cat(hashes) if hashes else torch.zeros(0, len(EVAL_CROPS), dtype=torch.long),
                      torch.cat(embeds) if embeds and embeds[0] is not None else None,
                      phash_threshold, embed_threshold, skipped)


def score_shards(pool: Pool, shards: Sequence[int], work: Path, teacher: TeacherSource,
                 scorer: ShardScorer, batch_size: int, workers: int, device: torch.device,
                 show_progress: bool = True, running: TopK | None = None) -> int:
    """Score the given shards of the pool, writing each one as soon as it is complete.
    ``scorer`` is the template (classes, k, min_prob, dedup); ``running`` the top-k of the
    shards finished before (it prunes, and grows with each shard written here)."""
    pp = teacher.preprocessing
    ds = ShardStream(pool, shards, eval_transform(pp.image_size, pp.crop_pct), batch_size)
    running = running if running is not None else TopK(scorer.num_classes, scorer.k)
    active: dict[int, ShardScorer] = {}  # at most one shard in flight per worker
    written = 0
    with progress(sum(pool.shard_size(s) for s in shards), "mine", show_progress) as bar:
        for batch in _loader(ds, workers, device):
            shard = int(batch["shard"])
            if shard not in active:
                active[shard] = ShardScorer(scorer.num_classes, scorer.k, scorer.min_prob, scorer.dedup,
                                            describe=pool.describe).start(shard, running.floor())
            logits, embeds = (run_teacher(teacher, batch["image"], device)
                              if "image" in batch else (None, None))
            active[shard].add(batch, logits, embeds)
            bar.update(batch["seen"])
            if batch["last"]:
                if batch["broken"]:
                    log(f"mine: warning: shard '{pool.shard_name(shard)}' is {batch['broken']}; "
                        f"its {batch['missing']} remaining samples are skipped and counted")
                rec = active.pop(shard).record(batch["broken"], batch["missing"])
                write_shard(work, rec)
                fold(running, rec)
                written += 1
    return written
