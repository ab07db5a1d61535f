"""The synthetic mining pool of bench/scale.py: N distinct 32-px JPEGs made from CIFAR-10
train images (a random resized crop, a horizontal flip and colour jitter each, re-encoded at
JPEG quality 90), written straight into WebDataset shards with ``kdistill.data.shards``.

Sample ``i`` is a function of (seed, i) alone: its source image is ``i mod 50,000`` (so each
CIFAR image appears ``N / 50,000`` times, every time with other crop, flip and jitter draws
from ``numpy.random.default_rng([seed, i])``); its key is ``p{i:07d}``. Shard ``t`` holds the
samples ``t * shard_size ... (t + 1) * shard_size - 1``, so a tar's content does not depend
on which process wrote it or when: the build resumes per tar (a finished tar is never
rewritten, ShardWriter writes each atomically) and ``_info.json`` is written last, from
every tar's length.

    .venv/bin/python bench/scale_pool.py --out DIR [--n 1000000] [--procs 2]
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR  # noqa: E402

SPLIT = "unlabeled"
QUALITY = 90
VERSION = 2  # 2: noise after clipping (version 1 made 3 identical all-white images in 1M)


def load_cifar(cache: Path, root: str = CIFAR) -> np.ndarray:
    """CIFAR-10 train as one uint8 (N, 32, 32, 3) array in class-folder order (cached .npy)."""
    path = cache / "cifar_train_u8.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    from PIL import Image

    train = Path(root) / "train"
    files = [f for c in sorted(d for d in train.iterdir() if d.is_dir()) for f in sorted(c.glob("*.jpg"))]
    arr = np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32))) for f in files])
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    tmp.rename(path)
    return arr


def make_image(src: np.ndarray, seed: int, i: int, size: int = 32) -> bytes:
    """Sample ``i``: random resized crop (area 0.35-1, aspect 3/4-4/3), flip, brightness /
    contrast / saturation jitter (+-0.4) and Gaussian noise (sigma 2) of ``src`` (H, W, 3
    uint8), as JPEG bytes."""
    from PIL import Image

    rng = np.random.default_rng([seed, i])
    h, w = src.shape[:2]
    area = rng.uniform(0.35, 1.0) * h * w
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, max(8, round(np.sqrt(area * ratio)))))
    ch = int(min(h, max(8, round(np.sqrt(area / ratio)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    img = Image.fromarray(np.ascontiguousarray(src[y0:y0 + ch, x0:x0 + cw]))
    img = img.resize((size, size), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.5:
        a = a[:, ::-1]
    b, c, s = rng.uniform(0.6, 1.4, size=3)
    a = a * b
    a = (a - a.mean()) * c + a.mean()
    gray = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    a = (a - gray[..., None]) * s + gray[..., None]
    # sensor-like noise after clipping: a near-white source brightened past 255 would
    # otherwise become one flat white image, the same bytes for every such draw
    a = np.clip(a, 0, 255) + rng.normal(0.0, 2.0, a.shape).astype(np.float32)
    out = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def shard_name(t: int) -> str:
    return f"{SPLIT}-{t:06d}.tar"


def _write_shards(args: tuple) -> None:
    out, cache, seed, n, shard_size, shards, log = args
    os.nice(19)  # background work: the other jobs on the machine keep the CPU
    from kdistill.data.shards import ShardWriter

    src = load_cifar(cache)
    for t in shards:
        if (out / shard_name(t)).is_file():
            continue
        start = time.time()
        writer = ShardWriter(out, SPLIT, shard_size, first=t)
        for i in range(t * shard_size, min(n, (t + 1) * shard_size)):
            writer.write(f"p{i:07d}", make_image(src[i % len(src)], seed, i))
        writer.close()
        took = time.time() - start
        count = min(n, (t + 1) * shard_size) - t * shard_size
        with open(log, "a") as fh:
            fh.write(json.dumps({"shard": shard_name(t), "samples": count, "seconds": round(took, 2),
                                 "images_per_s": round(count / took, 1), "time": time.time()}) + "\n")


def build_pool(out: Path, cache: Path, n: int, shard_size: int = 10_000, seed: int = 0,
               procs: int = 2, log: Path | None = None) -> dict:
    """Write the missing shards of the pool (``procs`` processes, tars dealt round-robin) and
    ``_info.json``; returns the pool's summary (also in ``out/pool.json``)."""
    from kdistill.data.shards import split_entry, write_info

    out.mkdir(parents=True, exist_ok=True)
    log = log or out.parent / "pool.log"
    settings = {"n": n, "shard_size": shard_size, "seed": seed, "quality": QUALITY, "cifar": CIFAR,
                "version": VERSION}
    marker = out / "pool.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved["settings"] == settings:
            return saved
        raise SystemExit(f"{out} holds a pool made with {saved['settings']}, not {settings}; delete it or "
                         "use another folder")
    load_cifar(cache)  # once, before the workers map it
    count = (n + shard_size - 1) // shard_size
    todo = [t for t in range(count) if not (out / shard_name(t)).is_file()]
    start = time.time()
    jobs = [(out, cache, seed, n, shard_size, todo[p::procs], log) for p in range(procs)]
    if procs == 1:
        _write_shards(jobs[0])
    else:
        with mp.get_context("spawn").Pool(procs) as pool:
            pool.map(_write_shards, jobs)
    took = time.time() - start
    names = [shard_name(t) for t in range(count)]
    lengths = [min(n, (t + 1) * shard_size) - t * shard_size for t in range(count)]
    write_info(out, {SPLIT: split_entry(SPLIT, names, lengths)}, None, name="scale-pool")
    rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()] if log.is_file() else []
    rows = [r for r in rows if r.get("shard") in set(names)]
    secs = sum(r["seconds"] for r in rows)
    summary = {"settings": settings, "shards": count, "samples": sum(lengths),
               "bytes": sum((out / f).stat().st_size for f in names),
               "process_seconds": round(secs, 1), "procs": procs,
               "images_per_s_per_process": round(sum(r["samples"] for r in rows) / secs, 1) if secs else None,
               "wall_seconds_this_call": round(took, 1)}
    marker.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def count_distinct(out: Path) -> dict:
    """Read every sample of the pool once: how many distinct image byte strings (SHA-1) and
    keys it holds; cached in ``out/pool.json``."""
    import hashlib

    from kdistill.data.shards import open_wds

    marker = out / "pool.json"
    summary = json.loads(marker.read_text())
    if "distinct_images" not in summary:
        split = open_wds(f"wds:{out}", SPLIT, labeled=False)
        digests, keys, n = set(), set(), 0
        for t in range(len(split.urls)):
            for s in split.samples(t):
                digests.add(hashlib.sha1(s.data).digest())
                keys.add(s.key)
                n += 1
        summary.update(read_samples=n, distinct_images=len(digests), distinct_keys=len(keys))
        marker.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache", type=Path, default=None, help="where the CIFAR .npy lives (default: OUT's parent)")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--log", type=Path, default=None)
    a = p.parse_args()
    print(json.dumps(build_pool(a.out, a.cache or a.out.parent, a.n, a.shard_size, a.seed, a.procs, a.log), indent=1))


if __name__ == "__main__":
    main()
