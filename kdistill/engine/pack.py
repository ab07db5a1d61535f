"""``kdistill pack``: a data ROOT, list file, Fashion-MNIST or unlabeled pool as WebDataset
shards ``DIR/<split>-NNNNNN.tar`` with ``DIR/_info.json`` (the shape ``data/shards.py``
documents and ``open_wds`` reads).

* Encoded files (JPEG, PNG, WebP, ...) are copied byte for byte, member extension from the
  file name (lower case); decoded sources (Fashion-MNIST) are encoded as JPEG
  (``shards.encode_sample_bytes``). Unlabeled splits have no ``cls`` member.
* Every file is checked to decode (JPEG at 1/8 scale, which still walks all its data;
  other formats fully) before it is packed. One that does not (truncated, not an image,
  over PIL's pixel limit, missing) is left out, warned about and counted in the summary
  and in ``_pack.json``: packing it would only move the failure to every epoch of every
  training run, and make ``num_samples`` / ``class_counts`` count images nobody can read.
* Resume: ``DIR/_pack.json`` (written atomically, at most about once a second and at the
  end) records the source's fingerprint, the shard settings and every finished shard. A
  rerun of the same command skips the finished shards and writes the rest; the plan and
  each tar depend only on the source, so the result is byte-identical to an uninterrupted
  pack. A shard finished after the journal's last write is simply written again. A DIR
  holding another pack (other source or settings) or shards without a journal is refused.
* Shards are written by ``workers`` processes, one whole shard per task (reading and
  checking the images is the cost; the tars are the same whichever process writes them).
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from ..console import log, progress
from ..data import shards
from ..data.sources import IMAGE_EXTENSIONS
from ..errors import UserError
from ..utils import atomic_write_text, ensure_writable_dir, first_line
from .pack_plan import Plan, make_plan

JOURNAL = "_pack.json"
VERSION = 1
DEFAULT_SHARD_SIZE = 1000
DEFAULT_MAX_SHARD_BYTES = 512 * 2**20
SHARD_SIZE_HELP = (
    "samples per shard (default 1000: CIFAR-10's 50,000 train images make 50 shards, enough "
    "for 8 ranks x 6 loader workers, each needing its own shards; ImageNet-1k makes 1,282 "
    "shards of ~110 MB, which shuffle well and resume one tar at a time)")
MAX_BYTES_HELP = (
    "cap on a shard's size, e.g. 512MiB, 2GB or a byte count (default 512MiB: a shard of "
    "large images still reads in seconds, and a writer holds one shard in memory); a shard "
    "ends at --shard-size samples or before it would pass the cap, whichever comes first")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30}
JOURNAL_EVERY_S = 1.0


def parse_bytes(text: str | int) -> int:
    """``512MiB``, ``2GB``, ``100000`` -> bytes (raises ValueError)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(text)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class PackConfig:
    """Settings of ``kdistill pack`` (what the flags set; checked here)."""

    source: str
    out: str
    shard_size: int = DEFAULT_SHARD_SIZE
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES
    pool: bool = False  # the source is unlabeled images (a folder, nested or flat, or a list)
    workers: int | str = "auto"  # processes writing shards; 0: this process
    class_map: str | None = None  # PaddleClas class_id_map_file for a list source
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.out:
            raise UserError("pack needs --out DIR (the folder the shards are written to)")
        if self.shard_size < 1:
            raise UserError(f"--shard-size must be a positive number of samples, got {self.shard_size}")
        try:
            self.max_shard_bytes = parse_bytes(self.max_shard_bytes)
        except ValueError:
            raise UserError(f"--max-shard-bytes must be a size such as 512MiB, 2GB or 100000, "
                            f"got '{self.max_shard_bytes}'") from None
        if self.max_shard_bytes < 10 * 1024:
            raise UserError(f"--max-shard-bytes must be at least 10KiB, got {self.max_shard_bytes}")
        if self.workers != "auto" and int(self.workers) < 0:
            raise UserError(f"--workers must be >= 0 or auto, got {self.workers}")

    def resolved_workers(self) -> int:
        if self.workers != "auto":
            return int(self.workers)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(8, cpus))


# ------------------------------------------------------------------ one shard


_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif",
               "PPM": "ppm"}
_FILE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}  # a file's own extension is kept


def check_image(data: bytes) -> str:
    """The PIL format of encoded image ``data`` after decoding it (a JPEG at 1/8 scale,
    which still reads every byte of its compressed data); raises ValueError if it does not
    decode."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
                if im.width * im.height == 0:
                    raise ValueError("image has no pixels")
                return im.format or ""
    except UnidentifiedImageError:
        raise ValueError("not a readable image (unknown format or corrupt header)") from None
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ValueError(f"not a readable image ({type(err).__name__}: {first_line(err)})") from None


def _encoded(path: str | None, pixels) -> tuple[bytes, str]:
    """``(bytes, member extension)`` of one sample; raises ValueError/OSError when unusable."""
    if pixels is not None:
        import torch

        img = torch.from_numpy(pixels)
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        return shards.encode_sample_bytes(img.contiguous()), "jpg"
    with open(path, "rb") as fh:
        data = fh.read()
    fmt = check_image(data)
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in _FILE_EXTS:
        ext = _FORMAT_EXT.get(fmt, fmt.lower() or "bin")
    return data, ext


def write_shard(folder: str, split: str, index: int, items: list[tuple]) -> dict:
    """Write shard ``index`` of ``split`` (``<split>-NNNNNN.tar``, atomically) from its
    planned samples; what the journal records of it. No tar when no sample is usable."""
    writer = shards.ShardWriter(folder, split, max(1, len(items)), first=index)
    counts: dict[str, int] = {}
    exts: set[str] = set()
    skipped: list[list[str]] = []
    for path, pixels, key, label in items:
        try:
            data, ext = _encoded(path, pixels)
        except (OSError, ValueError) as err:
            skipped.append([path or key, first_line(err) if isinstance(err, ValueError) else
                            f"{type(err).__name__}: {err.strerror or first_line(err)}"])
            continue
        writer.write(key, data, label, ext)
        exts.add(ext)
        if label is not None:
            counts[str(label)] = counts.get(str(label), 0) + 1
    entry = writer.close()
    name = entry["filenames"][0] if entry["filenames"] else ""
    return {"index": index, "file": name, "n": entry["num_samples"],
            "bytes": os.path.getsize(os.path.join(folder, name)) if name else 0,
            "counts": counts, "exts": sorted(exts), "skipped": skipped}


# ------------------------------------------------------------------ the journal


def _settings(plan: Plan) -> dict:
    return {"shard_size": plan.shard_size, "max_shard_bytes": plan.max_shard_bytes}


def new_journal(plan: Plan) -> dict:
    return {"version": VERSION, "source": {"spec": plan.spec, "kind": plan.kind,
                                           "fingerprint": plan.fingerprint},
            **_settings(plan), "complete": False,
            "splits": {s.name: {"samples": len(s), "shards": s.num_shards, "done": {}}
                       for s in plan.splits}}


def open_journal(out: Path, plan: Plan) -> dict:
    """The journal of an earlier pack of the same source and settings in ``out``, else a
    new one; raises UserError for ``out`` holding another pack or foreign shards."""
    path = out / JOURNAL
    fix = f"choose another --out, or delete '{out}' to pack it again"
    if not path.is_file():
        foreign = (out / shards.INFO_FILE).exists() or any(out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
        if foreign:
            raise UserError(f"'{out}' holds shards that kdistill pack did not write there (no {JOURNAL}); {fix}")
        return new_journal(plan)
    try:
        journal = json.loads(path.read_text())
        old_src, old_fp = journal["source"]["spec"], journal["source"]["fingerprint"]
        old = {k: journal[k] for k in _settings(plan)}
        journal["splits"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"'{path}' is not a kdistill pack journal ({first_line(err)}); {fix}") from None
    if old_fp != plan.fingerprint:
        same = os.path.abspath(old_src) == os.path.abspath(plan.spec)
        raise UserError(f"'{out}' holds a pack of {'another version of ' if same else ''}'{old_src}'"
                        f"{' (its files changed since)' if same else ''}, not of '{plan.spec}'; {fix}")
    if old != _settings(plan):
        was = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in old.items())
        raise UserError(f"'{out}' holds a pack of '{plan.spec}' made with {was}; rerun with those "
                        f"settings to continue it, or {fix}")
    for s in plan.splits:  # a finished shard whose tar is gone or changed is written again
        done = journal["splits"].setdefault(s.name, {"samples": len(s), "shards": s.num_shards,
                                                     "done": {}})["done"]
        for k, rec in list(done.items()):
            tar = out / rec["file"] if rec["file"] else None
            if tar is not None and (not tar.is_file() or tar.stat().st_size != rec["bytes"]):
                del done[k]
                journal["complete"] = False
    return journal


def save_journal(out: Path, journal: dict) -> None:
    atomic_write_text(out / JOURNAL, json.dumps(journal, indent=1) + "\n")


def _clean_temporaries(out: Path) -> None:
    """Half-written tars and journals of a killed pack (``atomic_path``'s ``.NAME.*.tmp``)."""
    for tmp in out.glob(".*.tmp"):
        if re.fullmatch(r"\.(\w+-\d{6}\.tar|_pack\.json|_info\.json)\..+\.tmp", tmp.name):
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ the command


def _image_key(exts: set[str]) -> str:
    order = {e: i for i, e in enumerate(shards.IMAGE_KEYS)}
    return ";".join(sorted(exts, key=lambda e: (order.get(e, len(order)), e))) or "jpg"


def finish(out: Path, plan: Plan, journal: dict) -> dict:
    """Write ``_info.json`` from the journal; the per-split summary."""
    entries, summary, exts = {}, {}, set()
    for s in plan.splits:
        done = journal["splits"][s.name]["done"]
        recs = [done[str(k)] for k in range(s.num_shards)]
        counts: dict[int, int] = {}
        for r in recs:
            exts.update(r["exts"])
            for label, c in r["counts"].items():
                counts[int(label)] = counts.get(int(label), 0) + c
        written = [r for r in recs if r["file"]]
        entries[s.name] = shards.split_entry(s.name, [r["file"] for r in written], [r["n"] for r in written],
                                             counts if s.labeled else None,
                                             len(s.classes) if s.labeled else None)
        summary[s.name] = {"samples": sum(r["n"] for r in recs), "shards": len(written),
                           "bytes": sum(r["bytes"] for r in recs),
                           "skipped": sum(len(r["skipped"]) for r in recs)}
    name = Path(plan.spec).name if plan.kind != "fashion-mnist" else plan.spec
    info = out / shards.INFO_FILE
    if info.exists():
        info.unlink()  # write_info merges into an existing file; this pack's splits are all of it
    shards.write_info(out, entries, plan.classes, name=name, image_key=_image_key(exts))
    return summary


def _warn_skipped(rec: dict, shown: list[int], limit: int = 5) -> None:
    for path, why in rec["skipped"]:
        if shown[0] < limit:
            log(f"kdistill pack: warning: left out '{path}': {why}")
        shown[0] += 1


def pack(cfg: PackConfig) -> dict:
    """Pack ``cfg.source`` into ``cfg.out`` (resuming a killed pack of the same source);
    returns a summary: per split samples, shards, bytes, skipped files; seconds, images/s."""
    start = time.perf_counter()
    plan = make_plan(cfg.source, cfg.shard_size, int(cfg.max_shard_bytes), cfg.pool, cfg.class_map)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not a folder; choose a folder for the shards")
    out = ensure_writable_dir(out, "--out")
    journal = open_journal(out, plan)
    _clean_temporaries(out)
    todo = [(s, k) for s in plan.splits for k in range(s.num_shards)
            if str(k) not in journal["splits"][s.name]["done"]]
    total = sum(len(s) for s in plan.splits)
    resumed = total - sum(s.bounds[k + 1] - s.bounds[k] for s, k in todo)
    if resumed and todo:
        log(f"kdistill pack: continuing the pack in {out}: {resumed} of {total} samples already written")
    workers = min(cfg.resolved_workers(), len(todo))
    save_journal(out, journal)
    shown, written = [0], [0]
    last_save = time.monotonic()

    def record(split: str, rec: dict) -> None:
        nonlocal last_save
        journal["splits"][split]["done"][str(rec.pop("index"))] = rec
        written[0] += rec["n"]
        _warn_skipped(rec, shown)
        if time.monotonic() - last_save >= JOURNAL_EVERY_S:
            save_journal(out, journal)
            last_save = time.monotonic()

    bar = progress(total, f"pack {out.name}", cfg.progress and sys.stderr.isatty())
    bar.update(resumed)
    try:
        if workers <= 1:
            for s, k in todo:
                record(s.name, write_shard(str(out), s.name, k, s.items(k)))
                bar.update(s.bounds[k + 1] - s.bounds[k])
        else:
            _run_parallel(out, todo, workers, record, bar)
    finally:
        save_journal(out, journal)  # what finished, also on Ctrl-C or an error
        bar.close()
    summary = finish(out, plan, journal)
    journal["complete"] = True
    save_journal(out, journal)
    seconds = time.perf_counter() - start
    skipped = sum(v["skipped"] for v in summary.values())
    if shown[0] > 5:
        log(f"kdistill pack: warning: {shown[0] - 5} more files left out (all of them in {out / JOURNAL})")
    return {"out": str(out), "source": plan.spec, "kind": plan.kind, "splits": summary,
            "classes": len(plan.classes or []), "bytes": sum(v["bytes"] for v in summary.values()),
            "skipped": skipped, "written_now": written[0], "already_done": resumed,
            "seconds": seconds, "workers": workers,
            "images_per_s": written[0] / seconds if seconds > 0 else 0.0, "config": asdict(cfg)}


def _run_parallel(out: Path, todo: list, workers: int, record, bar) -> None:
    """Shards in plan order over ``workers`` processes, at most ``2 x workers`` in flight
    (each task carries its samples' paths or pixels, so memory stays bounded)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pending = iter(todo)
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        inflight: dict = {}

        def submit() -> None:
            for s, k in pending:
                inflight[pool.submit(write_shard, str(out), s.name, k, s.items(k))] = (s, k)
                if len(inflight) >= 2 * workers:
                    return

        submit()
        try:
            while inflight:
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    s, k = inflight.pop(fut)
                    record(s.name, fut.result())
                    bar.update(s.bounds[k + 1] - s.bounds[k])
                submit()
        except BaseException:
            for fut in inflight:
                fut.cancel()
            raise
