"""SSLD mining: pool streaming, pHash/embedding dedup, top-k per class, resume, memory bound."""
from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from conftest import CLASSES, make_folder, run_cli
from kdistill.errors import UserError
from kdistill.mining import (EMBED_THRESHOLD, PHASH_THRESHOLD, MineConfig, TopK, assign, hamming,
                             merge_shards, mine, open_pool, phash)
from kdistill.mining import score as score_mod
from kdistill.mining.dedup import EVAL_CROPS, nearest_hash
from kdistill.data.sources import read_paths
from kdistill.mining.pool import center_crop

FAST = dict(batch_size=4, workers=0)  # MineConfig fields for tiny pools


def fast(top_k: int, **fields) -> MineConfig:
    return MineConfig(top_k=top_k, **{**FAST, **fields})


# ------------------------------------------------------------------ helpers


def make_photo(rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A photo-like test image: smooth random colour field, a few shapes, mild noise. Unlike
    conftest.make_image (one pattern per class + pixel noise, perceptual near-duplicates of
    each other by design), two of these differ at low frequencies, as two photos do."""
    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 6, size // 2, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def jpeg(im: Image.Image, quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def crop(im: Image.Image, frac: float = 0.9) -> Image.Image:
    w, h = im.size
    cw, ch = round(w * frac), round(h * frac)
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.crop((left, top, left + cw, top + ch))


def tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def read_list(path: Path) -> list[tuple[str, int, float]]:
    """-> (absolute path, label, p) per line of a mined list."""
    rows = []
    for line in path.read_text().splitlines():
        body, comment = line.split("  # p=")
        rel, label = body.rsplit(" ", 1)
        rows.append((str((path.parent / rel).resolve()), int(label), float(comment)))
    return rows


def reference_probs(run: Path, paths: list[str]) -> np.ndarray:
    """Teacher probabilities, one image at a time (a plain loop: the brute-force reference)."""
    from kdistill.images import read_image
    from kdistill.data.transforms import eval_transform
    from kdistill.methods.teachers import load_teacher

    t = load_teacher(str(run), CLASSES, torch.device("cpu"))
    tf = eval_transform(t.preprocessing.image_size, t.preprocessing.crop_pct)
    return np.stack([F.softmax(t(tf(read_image(p)).unsqueeze(0)), 1)[0].numpy() for p in paths])


def reference_selection(probs: np.ndarray, k: int, allowed: np.ndarray) -> dict[int, int]:
    """Brute-force SSLD top-k: per class sort everything, take k; resolve by best rank."""
    best: dict[int, tuple] = {}
    for c in range(probs.shape[1]):
        ranked = sorted((i for i in range(len(probs)) if allowed[i] and np.isfinite(probs[i, c])),
                        key=lambda i: (-probs[i, c], i))[:k]
        for r, i in enumerate(ranked):
            key = (r, -probs[i, c], c)
            if i not in best or key < best[i]:
                best[i] = key
    return {i: key[2] for i, key in best.items()}


def run_mine_cli(argv: list[str]) -> int:
    """`kdistill mine ...` in this process (exit status and stderr as the command gives them)."""
    from kdistill.cli import main

    return main(["mine", *argv])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """Photo-like evaluation sets (val/ as an ImageFolder, test/ flat behind a list file)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    val, test = [], []
    for i in range(12):
        p = root / "val" / ("a" if i % 2 else "b") / f"{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        make_photo(rng).save(p)
        val.append(p)
    (root / "test").mkdir()
    for i in range(6):
        p = root / "test" / f"t{i}.png"
        make_photo(rng).save(p)
        test.append(p)
    (root / "test_list.txt").write_text("".join(f"test/{p.name} 0\n" for p in test))
    return {"root": root, "val": val, "test": test}


# ------------------------------------------------------------------ pool


def test_pool_folder_recursive_and_list_file(tmp_path):
    img = make_photo(np.random.default_rng(1), 16)
    for rel in ["a.png", "x/b.jpg", "x/y/z/c.PNG", ".hidden.png", ".cache/d.png", "notes.txt"]:
        p = tmp_path / "pool" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, format="PNG") if p.suffix.lower() in (".png", ".jpg") else p.write_text("x")
    pool = open_pool(str(tmp_path / "pool"))
    assert [pool.paths.relative(i) for i in range(len(pool))] == ["a.png", "x/b.jpg", "x/y/z/c.PNG"]
    assert pool.folder_label(pool.paths[1]) == "x" and pool.folder_label(pool.paths[0]) is None

    lst = tmp_path / "lists" / "pool.txt"
    lst.parent.mkdir()
    lst.write_text(f"# comment\n\n../pool/a.png 3\n../pool/x/b.jpg\n{tmp_path}/pool/x/y/z/c.PNG 0  # p=0.9\n")
    pool = open_pool(str(lst))
    assert [Path(p).resolve() for p in pool.paths] == [
        (tmp_path / "pool" / r).resolve() for r in ["a.png", "x/b.jpg", "x/y/z/c.PNG"]]
    assert pool.folder_label(pool.paths[0]) is None


def test_pool_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(UserError, match="pool '.*empty' has no images"):
        open_pool(str(tmp_path / "empty"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(UserError, match="has no images"):
        open_pool(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="does not exist"):
        open_pool(str(tmp_path / "nope"))


def test_path_table_is_compact(tmp_path):
    lst = tmp_path / "big.txt"
    lst.write_text("".join(f"images/n{i // 1000:04d}/img_{i:08d}.jpg {i % 10}\n" for i in range(100_000)))
    tracemalloc.start()
    table = read_paths(lst)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(table) == 100_000 and table.relative(99_999) == "images/n0099/img_00099999.jpg"
    assert size / len(table) < 60  # ~35 bytes per path; a list of str would take ~110


# ------------------------------------------------------------------ hashing


def test_hamming_matches_popcount():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-2**63, 2**63 - 1, (7,), generator=g, dtype=torch.int64)
    b = torch.randint(-2**63, 2**63 - 1, (5,), generator=g, dtype=torch.int64)
    d = hamming(a, b)
    ref = [[bin((x ^ y) & (2**64 - 1)).count("1") for y in b.tolist()] for x in a.tolist()]
    assert d.tolist() == ref and hamming(a, a).diag().eq(0).all()
    dist, idx = nearest_hash(a, b)
    assert dist.tolist() == [min(r) for r in ref] and idx.tolist() == [int(np.argmin(r)) for r in ref]


def test_phash_robust_to_copies_and_separates_photos():
    rng = np.random.default_rng(3)
    originals = [make_photo(rng) for _ in range(10)]
    others = [make_photo(rng) for _ in range(60)]
    ref = torch.stack([torch.cat([phash(center_crop(tensor(im), f).unsqueeze(0)) for f in EVAL_CROPS])
                       for im in originals])
    edits = {"copy": lambda im: im, "resize40": lambda im: im.resize((40, 40), Image.BICUBIC),
             "jpeg70": jpeg, "crop90": crop, "crop88": lambda im: crop(im, 0.88),
             "brighter": lambda im: Image.fromarray((np.asarray(im).astype(int) + 12).clip(0, 255).astype(np.uint8))}
    for name, edit in edits.items():
        h = torch.cat([phash(tensor(edit(im)).unsqueeze(0)) for im in originals])
        d = hamming(h, ref.flatten()).view(10, 10, len(EVAL_CROPS)).min(2).values
        assert d.diag().max() <= PHASH_THRESHOLD, name
    h = torch.cat([phash(tensor(im).unsqueeze(0)) for im in others])
    assert hamming(h, ref.flatten()).min() > PHASH_THRESHOLD


def test_dedup_index_embedding_test_and_either_rule():
    from kdistill.mining import DedupIndex

    g = torch.Generator().manual_seed(0)
    embeds = torch.rand(20, 16, generator=g)  # positive, like pooled ReLU features
    hashes = torch.randint(-2**63, 2**63 - 1, (20, len(EVAL_CROPS)), generator=g, dtype=torch.int64)
    index = DedupIndex([f"val/{i}.png" for i in range(20)], hashes, embeds)
    far = hashes[:, 0] ^ torch.tensor(0x5555_5555_5555_5555)  # 32 bits from the eval hash
    query_e = torch.cat([embeds[3:4] * 2.0 + 0.001, embeds[7:8]])  # same direction: cosine ~1
    matches = index.check(torch.stack([far[3], hashes[7, 2]]), query_e)
    assert (matches[0].eval_index, matches[0].method) == (3, "embedding") and matches[0].score >= EMBED_THRESHOLD
    assert (matches[1].eval_index, matches[1].method, matches[1].score) == (7, "phash", 0.0)  # pHash wins ties
    others = torch.rand(50, 16, generator=g)
    assert all(m is None for m in index.check(far[:1].repeat(50) ^ torch.arange(50), others))
    off = DedupIndex(index.paths, hashes, embeds, embed_threshold=1.01)  # > 1 disables it
    assert off.check(far[3:4], query_e[:1]) == [None]


# ------------------------------------------------------------------ selection


def test_topk_and_assign_match_brute_force():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.5, 300).astype(np.float32)
    probs[10:20] = probs[5]  # exact ties: broken by pool order
    probs[rng.random(300) < 0.1] = -np.inf  # "duplicates"
    for k in (1, 7, 500):
        top = TopK(4, k)
        for start in range(0, 300, 37):
            top.push(probs[start:start + 37], np.arange(start, min(300, start + 37)))
        allowed = np.isfinite(probs[:, 0])
        for c in range(4):
            ref = sorted(np.nonzero(allowed)[0], key=lambda i: (-probs[i, c], i))[:k]
            assert top.ids[c][np.isfinite(top.probs[c])].tolist() == ref
        got = {i: c for i, c, _ in assign(top)}
        assert got == reference_selection(probs, k, allowed)


def _fake_records(work: Path, n: int, shard_size: int, classes: int, k: int) -> None:
    """Score a synthetic pool of ``n`` images with fake logits through the real shard code."""
    scorer = score_mod.ShardScorer(classes, k, 0.0, None)
    g = torch.Generator().manual_seed(n)
    path_of = lambda i: f"pool/n{i // 1000:05d}/{i:08d}.jpg"  # noqa: E731
    for shard in range(-(-n // shard_size)):
        scorer.start(shard)
        for b in range(shard * shard_size, min(n, (shard + 1) * shard_size), 256):
            ids = torch.arange(b, min(n, b + 256, (shard + 1) * shard_size))
            batch = {"skipped": [], "index": ids, "keys": [path_of(i) for i in ids.tolist()],
                     "phash": ids.unsqueeze(1)}
            scorer.add(batch, torch.randn(len(ids), classes, generator=g) * 3, None)
        score_mod.write_shard(work, scorer.record())


def test_selection_memory_does_not_grow_with_pool(tmp_path):
    classes, k, shard_size = 10, 50, 4096
    peaks = {}
    for n in (20_000, 200_000):
        work = tmp_path / str(n)
        work.mkdir()
        tracemalloc.start()
        _fake_records(work, n, shard_size, classes, k)
        score_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        merged = merge_shards(sorted(work.glob("shard-*.pt")), classes, k)
        merge_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        assert merged.scored == n and len(merged.info) <= classes * k
        assert len(assign(merged.top)) <= classes * k
        peaks[n] = (score_peak, merge_peak)
    (s20, m20), (s200, m200) = peaks[20_000], peaks[200_000]
    # 10x the pool, same memory: bounded by shard size and classes x k, not pool size
    assert s200 < 1.25 * s20 + 256 * 1024, peaks
    assert m200 < 1.25 * m20 + 256 * 1024, peaks


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def toy_pool(tmp_path_factory) -> Path:
    """An ImageFolder pool (3 classes x 10) of toy images, distinct from the training data."""
    return make_folder(tmp_path_factory.mktemp("toypool"), {"pool": 10}, seed=7) / "pool"


def test_topk_matches_brute_force(trained_run, toy_pool, tmp_path):
    paths = [str(p) for p in sorted(toy_pool.rglob("*.png"))]
    probs = reference_probs(trained_run, paths)
    allowed = np.ones(len(paths), bool)
    for k in (1, 3, 50):  # 50 > the 10 images per class: everything is selected, once
        out = tmp_path / f"k{k}" / "mined.txt"
        summary = mine(str(trained_run), str(toy_pool), str(out), fast(k, shard_size=7), progress=False)
        rows = read_list(out)
        ref = reference_selection(probs, k, allowed)
        assert {(p, c) for p, c, _ in rows} == {(str(Path(paths[i]).resolve()), c) for i, c in ref.items()}
        for p, c, prob in rows:
            assert prob == pytest.approx(probs[paths.index(p), c], abs=1e-4)
        assert [(c, -p) for _, c, p in rows] == sorted((c, -p) for _, c, p in rows)
        assert summary["selected"] == len(rows) and summary["scored"] == len(paths) == summary["pool_size"]
        assert sum(summary["per_class"].values()) == len(rows)
        assert max(summary["per_class"].values()) <= k
        prec = summary["selection_precision"]
        truth = [CLASSES[c] == Path(p).parent.name for p, c, _ in rows]
        assert prec["overall"] == pytest.approx(sum(truth) / len(truth))
        assert Path(f"{out}.hist.png").stat().st_size > 0 and Path(f"{out}.summary.json").is_file()
        assert not Path(f"{out}.work").exists()
    assert len(rows) == len(paths)
    # min_prob: only images at or above it
    out = tmp_path / "minp" / "mined.txt"
    mine(str(trained_run), str(toy_pool), str(out), fast(50, min_prob=0.6, shard_size=7), progress=False)
    kept = read_list(out)
    assert kept and all(p >= 0.6 - 1e-4 for _, _, p in kept)
    ref = reference_selection(np.where(probs >= 0.6, probs, -np.inf), 50, allowed)
    assert {(p, c) for p, c, _ in kept} == {(str(Path(paths[i]).resolve()), c) for i, c in ref.items()}


def test_dedup_removes_planted_copies(trained_run, photos, tmp_path):
    pool = tmp_path / "pool"
    (pool / "deep" / "er").mkdir(parents=True)
    rng = np.random.default_rng(11)
    distinct = []
    for i in range(40):
        p = pool / ("deep/er" if i % 3 == 0 else "") / f"distinct_{i:02d}.png"
        make_photo(rng).save(p)
        distinct.append(p)
    val, test = photos["val"], photos["test"]
    planted = {  # pool file -> evaluation image it copies
        "copy.png": (val[0], lambda im: im),
        "resized40.png": (val[1], lambda im: im.resize((40, 40), Image.BICUBIC)),
        "resized_back.png": (val[2], lambda im: im.resize((40, 40), Image.BICUBIC).resize((48, 48))),
        "reencoded.jpg": (val[3], jpeg),
        "cropped.png": (val[4], crop),
        "deep/cropped_test.png": (test[0], crop),
        "deep/er/reencoded_test.jpg": (test[1], lambda im: jpeg(im, 70)),
    }
    for name, (src, edit) in planted.items():
        edit(Image.open(src).convert("RGB")).save(pool / name)
    out = tmp_path / "out" / "mined.txt"
    summary = mine(str(trained_run), str(pool), str(out), fast(100), progress=False,
                   dedup_against=[str(photos["root"] / "val"), str(photos["root"] / "test_list.txt")])
    with open(f"{out}.dedup.csv") as fh:
        report = {Path(r["pool_image"]).resolve(): r for r in csv.DictReader(fh)}
    assert set(report) == {(pool / n).resolve() for n in planted}, report.keys()
    for name, (src, _) in planted.items():
        r = report[(pool / name).resolve()]
        assert Path(r["eval_image"]).resolve() == src.resolve(), name
        assert r["method"] in ("phash", "embedding")
        assert float(r["score"]) <= PHASH_THRESHOLD if r["method"] == "phash" else float(r["score"]) >= EMBED_THRESHOLD
    assert summary["duplicates_removed"] == len(planted) and summary["eval_images"] == 18
    assert {p for p, _, _ in read_list(out)} == {str(p.resolve()) for p in distinct}
    assert summary["selection_precision"] is None  # pool folders are not class names


def test_unreadable_files_are_skipped(trained_run, toy_pool, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(toy_pool, pool)
    (pool / "circle" / "broken.png").write_bytes(b"not an image at all")
    (pool / "square" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "mined.txt"
    summary = mine(str(trained_run), str(pool), str(out), MineConfig(top_k=2, batch_size=8, workers=2),
                   progress=False)
    assert summary["pool_size"] == 32 and summary["scored"] == 30 and summary["skipped"] == 2
    assert sorted(Path(p).name for p, _ in summary["skipped_paths"]) == ["broken.png", "empty.jpg"]
    assert summary["selected"] == len(read_list(out)) == 6


def test_resume_does_not_rescore_finished_shards(trained_run, toy_pool, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full.txt"
    mine(str(trained_run), str(toy_pool), str(full), fast(3, shard_size=8), progress=False)

    out = tmp_path / "resumed.txt"
    real_write = score_mod.write_shard
    written: list[int] = []

    def crash_after_first(work, record):
        real_write(work, record)
        raise RuntimeError("killed")

    monkeypatch.setattr(score_mod, "write_shard", crash_after_first)
    with pytest.raises(RuntimeError, match="killed"):
        mine(str(trained_run), str(toy_pool), str(out), fast(3, shard_size=8), progress=False)
    first = Path(f"{out}.work") / "shard-00000.pt"
    stamp = first.stat().st_mtime_ns
    assert not out.exists()

    with pytest.raises(UserError, match="other settings"):  # a different run cannot reuse it
        mine(str(trained_run), str(toy_pool), str(out), fast(4, shard_size=8), progress=False)

    seen = []
    real_teacher = score_mod.run_teacher
    monkeypatch.setattr(score_mod, "write_shard", lambda w, r: (written.append(r["shard"]), real_write(w, r)))
    monkeypatch.setattr(score_mod, "run_teacher", lambda t, x, d: (seen.append(len(x)), real_teacher(t, x, d))[1])
    capsys.readouterr()
    summary = mine(str(trained_run), str(toy_pool), str(out), fast(3, shard_size=8, keep_work=True),
                   progress=False)
    assert "resuming: 1 of 4 shards done" in capsys.readouterr().err
    assert written == [1, 2, 3] and sum(seen) == 30 - 8
    assert first.stat().st_mtime_ns == stamp
    assert out.read_text() == full.read_text()
    assert summary["scored"] == 30 and Path(f"{out}.work").is_dir()  # --keep-work


def test_bad_input_is_a_user_error(trained_run, toy_pool, tmp_path, capsys):
    out = str(tmp_path / "m.txt")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--teacher", str(trained_run), "--pool", str(toy_pool), "--top-k", "0", "--out", out], "--top-k must be"),
        (["--teacher", str(tmp_path / "no-run"), "--pool", str(toy_pool), "--top-k", "2", "--out", out],
         "teacher '.*no-run' does not exist"),
        (["--teacher", str(trained_run), "--pool", str(tmp_path / "empty"), "--top-k", "2", "--out", out],
         "pool '.*empty' has no images"),
        (["--teacher", str(trained_run), "--pool", str(toy_pool), "--top-k", "2", "--out", out,
          "--dedup-against", str(tmp_path / "val")], "--dedup-against '.*val' does not exist"),
        (["--teacher", str(trained_run), "--pool", str(toy_pool), "--top-k", "2", "--out", str(tmp_path)],
         "is a folder"),
        (["--teacher", str(trained_run), "--pool", str(toy_pool), "--out", out], "required: --top-k"),
    ]
    import re

    for argv, message in cases:
        assert run_mine_cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert run_mine_cli(["--teacher", str(trained_run), "--pool", str(toy_pool), "--top-k", "2",
                         "--out", out, "--workers", "0", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("mined 6 images")


def test_kdistill_mine_subprocess(trained_run, toy_pool, tmp_path):
    bad = run_cli("mine", "--teacher", str(trained_run), "--pool", str(toy_pool), "--top-k", "-1",
                  "--out", str(tmp_path / "m.txt"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    ok = run_cli("mine", "--teacher", str(trained_run), "--pool", str(toy_pool), "--top-k", "1",
                 "--out", str(tmp_path / "m.txt"), "--workers", "0", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(Path(f"{tmp_path / 'm.txt'}.summary.json").read_text())["selected"] == 3


def test_torchrun_ranks_score_their_shards_and_rank0_merges(trained_run, toy_pool, tmp_path):
    """Two processes (gloo) each score every other shard; the merged list equals one process's."""
    import os
    import subprocess

    from conftest import ROOT

    single = tmp_path / "single.txt"
    mine(str(trained_run), str(toy_pool), str(single), fast(3, shard_size=8), progress=False)
    out = tmp_path / "ddp.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "kdistill",
           "mine", "--teacher", str(trained_run), "--pool", str(toy_pool), "--top-k", "3", "--out", str(out),
           "--shard-size", "8", "--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_text() == single.read_text()
    assert proc.stdout.count("mined ") == 1  # rank 0 reports
