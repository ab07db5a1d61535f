"""``kdistill mine``: the SSLD mining run (:func:`mine`) and its command-line front end.

Files written next to ``--out LIST``:

* ``LIST``: PaddleClas list ``path label  # p=0.9876``, label = class index in the teacher's
  class order, paths relative to LIST's folder (portable with it), sorted by class then
  descending teacher probability;
* ``LIST.summary.json``: counts, thresholds, skipped files, selection precision;
* ``LIST.dedup.csv``: every pool image removed as a near-duplicate, with its match;
* ``LIST.hist.png``: histogram of the selected images' teacher confidence;
* ``LIST.work/``: shard results while mining (resume by rerunning the same command);
  removed once LIST is written, unless ``--keep-work``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .. import distributed as dist
from ..console import log
from ..errors import UserError
from ..utils import (atomic_path, atomic_write, atomic_write_text, ensure_writable_file_parent,
                     resolve_device, write_json)
from .dedup import EMBED_THRESHOLD, PHASH_THRESHOLD, DedupIndex
from .pool import Pool, open_pool
from .score import Merged, ShardScorer, assign, build_index, merge_shards, score_shards, shard_path

if TYPE_CHECKING:
    from ..methods.teachers import Teacher
    from ..models.hooks import FeatureCapture

DEDUP_COLUMNS = ["pool_image", "eval_image", "method", "score", "phash_distance", "cosine"]


def mine(teacher: str, pool: str, top_k: int, out: str, dedup_against: Sequence[str] = (),
         batch_size: int = 256, workers: int = 2, device: str = "auto", shard_size: int = 4096,
         phash_threshold: int = PHASH_THRESHOLD, embed_threshold: float = EMBED_THRESHOLD,
         min_prob: float = 0.0, progress: bool = True, keep_work: bool = False) -> dict:
    """Let ``teacher`` pick the top-``top_k`` images per class of ``pool`` after removing
    near-duplicates of the ``dedup_against`` images; writes ``out`` and returns the summary.
    Under torchrun each rank scores every world_size-th pending shard; rank 0 merges."""
    from ..methods.teachers import load_teacher
    from ..models.checkpoint import read_meta, resolve_checkpoint
    from ..models.hooks import FeatureCapture

    _check_args(top_k, batch_size, workers, shard_size, phash_threshold, embed_threshold, min_prob, out)
    ensure_writable_file_parent(out, "--out")  # LIST and LIST.work/ go there
    if not Path(teacher).exists():
        raise UserError(f"teacher '{teacher}' does not exist (mine needs a kdistill run folder or checkpoint)")
    ckpt = resolve_checkpoint(teacher)
    classes = list(read_meta(ckpt)["classes"])
    the_pool = open_pool(pool)
    eval_sets = [open_pool(d, "--dedup-against") for d in dedup_against]
    if not eval_sets:
        log("mine: no --dedup-against given; evaluation images in the pool would not be removed")
    work = Path(f"{out}.work")
    settings = {"teacher": str(ckpt.resolve()), "teacher_bytes": ckpt.stat().st_size,
                "classes": len(classes), "pool": the_pool.paths.digest(), "pool_size": len(the_pool),
                "shard_size": shard_size, "top_k": top_k, "min_prob": min_prob,
                "phash_threshold": phash_threshold, "embed_threshold": embed_threshold,
                "dedup_against": [s.paths.digest() for s in eval_sets]}
    own_group = not dist.is_distributed()
    dev = dist.init(resolve_device(device))
    capture = None
    try:
        t = load_teacher(teacher, classes, dev)
        if eval_sets and embed_threshold <= 1.0:
            capture = FeatureCapture(t.model, [], embed=True, role="teacher")
        if dist.is_main():
            _open_work(work, settings)
        dist.barrier()
        index = _dedup_index(work, eval_sets, t, capture, batch_size, workers, dev, phash_threshold,
                             embed_threshold, progress) if eval_sets else None
        n_shards = math.ceil(len(the_pool) / shard_size)
        pending = None
        if dist.is_main():
            pending = [s for s in range(n_shards) if not shard_path(work, s).is_file()]
            if len(pending) < n_shards:
                log(f"resuming: {n_shards - len(pending)} of {n_shards} shards done")
        pending = dist.broadcast_object(pending)
        scorer = ShardScorer(len(classes), top_k, min_prob, index)
        score_shards(the_pool.paths, pending[dist.rank()::dist.world_size()], shard_size, work, t,
                     capture, scorer, batch_size, workers, dev, progress)
        dist.barrier()
        summary: dict = {}
        if dist.is_main():
            summary = _finish(out, work, n_shards, classes, top_k, the_pool, index, {
                "teacher": teacher, "checkpoint": str(ckpt), "pool": pool,
                "dedup_against": list(dedup_against),
                "thresholds": {"phash": phash_threshold, "embedding": embed_threshold,
                               "min_prob": min_prob}})
            if not keep_work:
                shutil.rmtree(work, ignore_errors=True)
        dist.barrier()
        return summary if dist.is_main() else json.loads(Path(f"{out}.summary.json").read_text())
    finally:
        if capture is not None:
            capture.remove()
        if own_group:
            dist.cleanup()


def _check_args(top_k: int, batch_size: int, workers: int, shard_size: int, phash_threshold: int,
                embed_threshold: float, min_prob: float, out: str) -> None:
    if top_k <= 0:
        raise UserError(f"--top-k must be a positive number of images per class, got {top_k}")
    for name, value in (("--batch-size", batch_size), ("--shard-size", shard_size)):
        if value <= 0:
            raise UserError(f"{name} must be positive, got {value}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    if phash_threshold > 64:
        raise UserError(f"--phash-threshold is a number of bits out of 64 (negative disables), got {phash_threshold}")
    if embed_threshold < -1:
        raise UserError(f"--embed-threshold is a cosine in [-1, 1] (above 1 disables), got {embed_threshold}")
    if not 0.0 <= min_prob <= 1.0:
        raise UserError(f"--min-prob must be in [0, 1], got {min_prob}")
    if Path(out).is_dir():
        raise UserError(f"--out '{out}' is a folder; give the path of the list file to write")


def _open_work(work: Path, settings: dict) -> None:
    """Create the work folder, or check that an existing one belongs to the same run."""
    manifest = work / "manifest.json"
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise UserError(f"'{work}' holds an unfinished mining run with other settings ({diff[0]}: "
                            f"{old.get(diff[0])} vs now {settings[diff[0]]}); rerun it with the same "
                            f"settings to resume, or delete '{work}' to start over")
        return
    work.mkdir(parents=True, exist_ok=True)
    write_json(manifest, settings)


def _dedup_index(work: Path, eval_sets: list[Pool], teacher: Teacher,
                 capture: FeatureCapture | None, batch_size: int, workers: int,
                 dev: torch.device, phash_threshold: int, embed_threshold: float,
                 progress: bool) -> DedupIndex:
    """The evaluation fingerprints, computed once by rank 0 and cached in the work folder."""
    cache = work / "eval.pt"
    if dist.is_main() and not cache.is_file():
        paths = [p for s in eval_sets for p in s.paths]
        index = build_index(paths, teacher, capture, batch_size, workers, dev, phash_threshold,
                            embed_threshold, progress)
        if not index.paths:
            raise UserError(f"none of the {len(paths)} --dedup-against images could be read")
        atomic_write(cache, lambda tmp: torch.save(index.state(), tmp))
        log(f"dedup index: {len(index.paths)} evaluation images"
            + (f" ({len(index.skipped)} unreadable, skipped)" if index.skipped else ""))
    dist.barrier()
    state = torch.load(cache, map_location="cpu", weights_only=True)
    return DedupIndex.from_state(state, phash_threshold, embed_threshold)


def _finish(out: str, work: Path, n_shards: int, classes: list[str], top_k: int, pool: Pool,
            index: DedupIndex | None, extra: dict) -> dict:
    """Merge the shard files; write the list, dedup report, histogram and summary."""
    files = [shard_path(work, s) for s in range(n_shards)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"mining shard {missing[0]} is missing (a rank failed?); rerun to resume")
    report = Path(f"{out}.dedup.csv")
    with atomic_path(report) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(DEDUP_COLUMNS)
        merged = merge_shards(files, len(classes), top_k, on_dups=writer.writerows)
    rows = assign(merged.top)
    out_dir = Path(out).resolve().parent
    lines = [f"{os.path.relpath(os.path.abspath(merged.info[i][0]), out_dir)} {c}  # p={p:.4f}\n"
             for i, c, p in rows]
    atomic_write_text(out, "".join(lines))
    counts = [0] * len(classes)
    for _, c, _ in rows:
        counts[c] += 1
    hist = Path(f"{out}.hist.png")
    _histogram(hist, [p for _, _, p in rows], top_k)
    summary = {
        "out": str(out), **extra, "top_k": top_k, "pool_size": len(pool), "scored": merged.scored,
        "skipped": merged.skipped, "skipped_paths": merged.skipped_paths,
        "duplicates_removed": merged.duplicates,
        "eval_images": len(index.paths) if index else 0,
        "eval_skipped": index.skipped[:100] if index else [],
        "selected": len(rows), "per_class": dict(zip(classes, counts)),
        "mean_prob": round(sum(p for _, _, p in rows) / len(rows), 6) if rows else None,
        "selection_precision": _precision(rows, merged, pool, classes), "shards": n_shards,
        "files": {"list": str(out), "dedup_report": str(report), "histogram": str(hist),
                  "summary": f"{out}.summary.json"},
    }
    write_json(f"{out}.summary.json", summary)
    return summary


def _precision(rows: list[tuple[int, int, float]], merged: Merged, pool: Pool,
               classes: list[str]) -> dict | None:
    """For an ImageFolder pool: the fraction of selected images whose folder is their
    assigned class (the labels are never used for mining, only for this report)."""
    labels = [pool.folder_label(merged.info[i][0]) for i, _, _ in rows]
    if not any(lbl in classes for lbl in labels):
        return None
    hits, totals = [0] * len(classes), [0] * len(classes)
    for (_, c, _), lbl in zip(rows, labels):
        totals[c] += 1
        hits[c] += lbl == classes[c]
    return {"overall": round(sum(hits) / max(1, sum(totals)), 6),
            "per_class": {name: (round(h / n, 6) if n else None)
                          for name, h, n in zip(classes, hits, totals)}}


def _histogram(path: Path, probs: list[float], top_k: int) -> None:
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no display needed

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.hist(probs, bins=20, range=(0.0, 1.0), color="tab:blue", edgecolor="white")
    ax.set_xlabel("teacher probability of the assigned class")
    ax.set_ylabel("images")
    ax.set_title(f"{len(probs)} mined images (top-{top_k} per class)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


# ------------------------------------------------------------------ command line


def add_mine_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``mine`` to a ``kdistill`` sub-command table."""
    p = subparsers.add_parser(
        "mine", help="SSLD: let a teacher pick the top-k unlabeled images per class",
        description="Score an unlabeled pool with a teacher, drop near-duplicates of the "
                    "evaluation images, keep the top-k images per class as a PaddleClas list. "
                    "Rerun the same command to resume an interrupted run.")
    p.add_argument("--teacher", required=True, metavar="RUN_OR_CKPT", help="kdistill run folder or checkpoint")
    p.add_argument("--pool", required=True, metavar="DIR_OR_LIST",
                   help="folder of images (searched recursively) or list file")
    p.add_argument("--top-k", type=int, required=True, metavar="K", help="images per class")
    p.add_argument("--dedup-against", action="append", default=[], metavar="DIR_OR_LIST",
                   help="evaluation images to keep out of the list (repeatable), e.g. ROOT/val")
    p.add_argument("--out", required=True, metavar="LIST", help="list file to write")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--shard-size", type=int, default=4096, help="images per resumable shard")
    p.add_argument("--phash-threshold", type=int, default=PHASH_THRESHOLD, metavar="BITS",
                   help=f"max pHash Hamming distance of a duplicate (default {PHASH_THRESHOLD}; <0 disables)")
    p.add_argument("--embed-threshold", type=float, default=EMBED_THRESHOLD, metavar="COS",
                   help=f"min centred teacher-embedding cosine of a duplicate (default {EMBED_THRESHOLD}; >1 disables)")
    p.add_argument("--min-prob", type=float, default=0.0, metavar="P",
                   help="ignore images whose class probability is below P")
    p.add_argument("--keep-work", action="store_true", help="keep LIST.work/ (shard results) after success")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_mine, on_interrupt="finished shards are kept (run the same command again to continue)")
    return p


def cmd_mine(args: argparse.Namespace) -> int:
    s = mine(args.teacher, args.pool, args.top_k, args.out, args.dedup_against, args.batch_size,
             args.workers, args.device, args.shard_size, args.phash_threshold, args.embed_threshold,
             args.min_prob, not args.no_progress, args.keep_work)
    if dist.is_main():
        counts = list(s["per_class"].values())
        print(f"mined {s['selected']} images ({min(counts)}-{max(counts)} per class, top-{s['top_k']}) "
              f"from {s['pool_size']} pool images; {s['duplicates_removed']} near-duplicates removed, "
              f"{s['skipped']} unreadable skipped: {s['out']}")
    return 0
