"""``kdistill mine``: the SSLD mining run (:func:`mine`) and its command-line front end.

The pool (a folder, a list file or ``wds:DIR`` shards) is scored shard by shard in bounded
memory (:mod:`.score`); the selection goes to a list file or to new shards (:mod:`.output`).
Files written next to ``--out LIST`` (for ``--out wds:DIR``: the shards, then ``DIR/mined.*``
in place of ``LIST.*``):

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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .. import distributed as dist
from ..config import TEACHER_RUNTIME_HELP, TeacherRuntime, add_flags, arg, from_args
from ..console import log
from ..errors import UserError
from ..utils import atomic_path, atomic_write, resolve_device, write_json
from .dedup import EMBED_THRESHOLD, PHASH_THRESHOLD, DedupIndex
from .output import ListTarget, ShardTarget, open_target
from .pool import Pool, first_images, open_pool, open_reference
from .score import (Merged, ShardScorer, TopK, assign, build_index, fold, merge_shards, read_shard,
                    score_shards, shard_path)

if TYPE_CHECKING:
    from ..methods.teachers import TeacherSource

DEDUP_COLUMNS = ["pool_image", "eval_image", "method", "score", "phash_distance", "cosine"]


@dataclass
class MineConfig:
    """What ``kdistill mine`` keeps and drops, and how it runs. Each field is also a flag
    of ``kdistill mine`` (help and default from here). The ``ssld`` section extends it
    (:class:`kdistill.engine.ssld.SSLDSection`): one declaration, one set of defaults."""

    top_k: int = arg(1000, "images kept per class", "K")
    min_prob: float = arg(0.0, "ignore images whose class probability is below P", "P")
    phash_threshold: int = arg(PHASH_THRESHOLD, "dedup: max pHash Hamming distance of a "
                               "duplicate; < 0 disables", "BITS")
    embed_threshold: float = arg(EMBED_THRESHOLD, "dedup: min centred teacher-embedding cosine "
                                 "of a duplicate; > 1 disables", "COS")
    batch_size: int = arg(256, "images per teacher forward pass", "B")
    workers: int = arg(2, "DataLoader worker processes", "N")
    shard_size: int = arg(4096, "images per resumable shard", "N")
    keep_work: bool = arg(False, "keep LIST.work/ (shard results) after success")
    teacher_runtime: TeacherRuntime = arg("auto", TEACHER_RUNTIME_HELP)

    def _name(self, key: str) -> str:
        """How an error names field ``key``: here as the flag of ``kdistill mine``."""
        return "--" + key.replace("_", "-")

    def __post_init__(self) -> None:
        checks = {  # field: (valid, what it must be)
            "top_k": (lambda v: v > 0, "must be a positive number of images per class"),
            "batch_size": (lambda v: v > 0, "must be positive"),
            "shard_size": (lambda v: v > 0, "must be positive"),
            "workers": (lambda v: v >= 0, "must be >= 0"),
            "phash_threshold": (lambda v: v <= 64, "is a number of bits out of 64 (negative disables)"),
            "embed_threshold": (lambda v: v >= -1, "is a cosine in [-1, 1] (above 1 disables)"),
            "min_prob": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
        }
        for key, (valid, what) in checks.items():
            value = getattr(self, key)
            if value is not None and not valid(value):  # None: the ssld section's "take the run's"
                raise UserError(f"{self._name(key)} {what}, got {value}")


def mine(teacher: str, pool: str, out: str, cfg: MineConfig, *, dedup_against: Sequence[str] = (),
         device: str = "auto", progress: bool = True) -> dict:
    """Let ``teacher`` pick the top-``cfg.top_k`` images per class of ``pool`` after removing
    near-duplicates of the ``dedup_against`` images; writes ``out`` (a list file, or shards
    for ``wds:DIR``) and returns the summary. Under torchrun each rank scores every
    world_size-th pending shard; rank 0 merges and writes."""
    from ..data.transforms import eval_transform
    from ..methods.compiled import compile_teachers
    from ..methods.teachers import load_teachers
    from ..models.checkpoint import read_meta, resolve_checkpoint
    from ..models.hooks import FeatureCapture

    target = open_target(out, cfg.shard_size)
    if not Path(teacher).exists():
        raise UserError(f"teacher '{teacher}' does not exist (mine needs a kdistill run folder or checkpoint)")
    ckpt = resolve_checkpoint(teacher)
    classes = list(read_meta(ckpt)["classes"])
    the_pool = open_pool(pool, chunk=cfg.shard_size)
    target.check_pool(the_pool)
    eval_sets = [p for d in dedup_against for p in open_reference(d, cfg.shard_size)]
    if not eval_sets:
        log("mine: no --dedup-against given; evaluation images in the pool would not be removed")
    work = target.work
    settings = {"teacher": str(ckpt.resolve()), "teacher_bytes": ckpt.stat().st_size,
                "classes": len(classes), "pool": the_pool.fingerprint(), "pool_size": len(the_pool),
                "shard_size": cfg.shard_size, "top_k": cfg.top_k, "min_prob": cfg.min_prob,
                "phash_threshold": cfg.phash_threshold, "embed_threshold": cfg.embed_threshold,
                "dedup_against": [p.fingerprint() for p in eval_sets], "out": target.out}
    own_group = not dist.is_distributed()
    dev = dist.init(resolve_device(device))
    t = None
    try:
        t = load_teachers([teacher], classes, dev)
        if eval_sets and cfg.embed_threshold <= 1.0:  # the teacher's pooled embeddings, for dedup
            t.capture = FeatureCapture(t.single.model, [], embed=True, role="teacher")
        pp = t.preprocessing
        compile_teachers(t, cfg.teacher_runtime, dev, lambda: first_images(
            the_pool, eval_transform(pp.image_size, pp.crop_pct)), batch_size=cfg.batch_size)
        if dist.is_main():
            _open_work(work, settings)
        dist.barrier()
        index = _dedup_index(work, eval_sets, t, cfg, dev, progress) if eval_sets else None
        n_shards = the_pool.num_shards
        pending = None
        if dist.is_main():
            pending = [s for s in range(n_shards) if not shard_path(work, s).is_file()]
            if len(pending) < n_shards:
                log(f"resuming: {n_shards - len(pending)} of {n_shards} shards done")
        pending = dist.broadcast_object(pending)
        running = TopK(len(classes), cfg.top_k)  # of the finished shards: prunes the new ones
        for s in sorted(set(range(n_shards)) - set(pending)):
            fold(running, read_shard(shard_path(work, s)))
        scorer = ShardScorer(len(classes), cfg.top_k, cfg.min_prob, index)
        score_shards(the_pool, pending[dist.rank()::dist.world_size()], work, t, scorer, cfg.batch_size,
                     cfg.workers, dev, progress, running)
        dist.barrier()
        summary: dict = {}
        if dist.is_main():
            summary = _finish(target, work, n_shards, classes, cfg.top_k, cfg.workers, the_pool, index, {
                "teacher": teacher, "checkpoint": str(ckpt), "pool": pool,
                "dedup_against": list(dedup_against),
                "thresholds": {"phash": cfg.phash_threshold, "embedding": cfg.embed_threshold,
                               "min_prob": cfg.min_prob}})
            if not cfg.keep_work:
                shutil.rmtree(work, ignore_errors=True)
        dist.barrier()
        return summary if dist.is_main() else json.loads(Path(f"{target.base}.summary.json").read_text())
    finally:
        if t is not None and t.capture is not None:
            t.capture.remove()
        if own_group:
            dist.cleanup()


def _open_work(work: Path, settings: dict) -> None:
    """Create the work folder, or check that an existing one belongs to the same run."""
    manifest = work / "manifest.json"
    settings = json.loads(json.dumps(settings))  # as read back (tuples -> lists)
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


def _dedup_index(work: Path, eval_sets: list[Pool], teacher: TeacherSource, cfg: MineConfig, dev: torch.device,
                 progress: bool) -> DedupIndex:
    """The evaluation fingerprints, computed once by rank 0 and cached in the work folder."""
    cache = work / "eval.pt"
    if dist.is_main() and not cache.is_file():
        index = build_index(eval_sets, teacher, cfg.batch_size, cfg.workers, dev,
                            cfg.phash_threshold, cfg.embed_threshold, progress)
        if not index.paths:
            raise UserError(f"none of the {sum(len(s) for s in eval_sets)} --dedup-against images could be read")
        atomic_write(cache, lambda tmp: torch.save(index.state(), tmp))
        log(f"dedup index: {len(index.paths)} evaluation images"
            + (f" ({len(index.skipped)} unreadable, skipped)" if index.skipped else ""))
    dist.barrier()
    state = torch.load(cache, map_location="cpu", weights_only=True)
    return DedupIndex.from_state(state, cfg.phash_threshold, cfg.embed_threshold)


def _finish(target: ListTarget | ShardTarget, work: Path, n_shards: int, classes: list[str], top_k: int,
            workers: int, pool: Pool, index: DedupIndex | None, extra: dict) -> dict:
    """Merge the shard files; write the selection, dedup report, histogram and summary."""
    files = [shard_path(work, s) for s in range(n_shards)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"mining shard {missing[0]} is missing (a rank failed?); rerun to resume")
    base = target.base
    report = Path(f"{base}.dedup.csv")
    with atomic_path(report) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(DEDUP_COLUMNS)
        merged = merge_shards(files, len(classes), top_k, on_dups=writer.writerows, describe=pool.describe)
    rows = assign(merged.top)
    written = target.write(rows, merged.info, pool, classes, workers)
    counts = [0] * len(classes)
    for _, c, _ in rows:
        counts[c] += 1
    hist = Path(f"{base}.hist.png")
    _histogram(hist, [p for _, _, p in rows], top_k)
    if merged.broken:
        log(f"mine: {len(merged.broken)} pool shards broke off early; {merged.missing} samples in them were "
            f"not read (first: shard {merged.broken[0][0]}: {merged.broken[0][1]})")
    summary = {
        "out": str(target.out), **extra, "top_k": top_k, "pool_size": len(pool), "scored": merged.scored,
        "skipped": merged.skipped + merged.missing, "skipped_paths": merged.skipped_paths,
        "broken_shards": [[pool.shard_name(s), why, n] for s, why, n in merged.broken],
        "unread_samples": merged.missing, "duplicates_removed": merged.duplicates,
        "eval_images": len(index.paths) if index else 0,
        "eval_skipped": index.skipped[:100] if index else [],
        "selected": len(rows), "per_class": dict(zip(classes, counts)),
        "mean_prob": round(sum(p for _, _, p in rows) / len(rows), 6) if rows else None,
        "selection_precision": _precision(rows, merged, pool, classes), "shards": n_shards,
        "files": {**written, "dedup_report": str(report), "histogram": str(hist),
                  "summary": f"{base}.summary.json"},
    }
    write_json(f"{base}.summary.json", summary)
    return summary


def _precision(rows: list[tuple[int, int, float]], merged: Merged, pool: Pool,
               classes: list[str]) -> dict | None:
    """For an ImageFolder pool: the fraction of selected images whose folder is their
    assigned class (the labels are never used for mining, only for this report)."""
    labels = [pool.folder_label(merged.info[i][1]) for i, _, _ in rows]
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
                   help="folder of images (searched recursively), list file, or wds:DIR / wds:PATTERN "
                        "shards (split unlabeled, else train)")
    p.add_argument("--dedup-against", action="append", default=[], metavar="SOURCE",
                   help="evaluation images to keep out of the selection (repeatable), e.g. ROOT/val, "
                        "a list file, wds:DIR (its val and test shards)")
    p.add_argument("--out", required=True, metavar="LIST",
                   help="list file to write, or wds:DIR to write the selected images as shards "
                        "(the only output for a sharded pool)")
    add_flags(p, MineConfig, required=["top_k"])  # --top-k, --min-prob, ... --keep-work
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_mine, on_interrupt="finished shards are kept (run the same command again to continue)")
    return p


def cmd_mine(args: argparse.Namespace) -> int:
    s = mine(args.teacher, args.pool, args.out, from_args(MineConfig, args),
             dedup_against=args.dedup_against, device=args.device, progress=not args.no_progress)
    if dist.is_main():
        counts = list(s["per_class"].values())
        print(f"mined {s['selected']} images ({min(counts)}-{max(counts)} per class, top-{s['top_k']}) "
              f"from {s['pool_size']} pool images; {s['duplicates_removed']} near-duplicates removed, "
              f"{s['skipped']} unreadable skipped: {s['out']}")
    return 0
