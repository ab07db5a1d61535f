"""Mining WebDataset pools: same selection as a folder, resume after kill -9, selected images
written as shards, bounded work state, bad shards."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, make_folder
from kdistill.data.shards import ShardWriter, open_wds, split_entry, write_info
from kdistill.mining import MineConfig, assign, merge_shards, mine
from kdistill.mining import score as score_mod
from kdistill.mining.pool import Item, Pool
from kdistill.mining.score import TopK

FAST = dict(batch_size=4, workers=0)


def fast(top_k: int, **fields) -> MineConfig:
    return MineConfig(top_k=top_k, **{**FAST, **fields})


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict:
    """The same 36 toy images as a folder pool and as 5 tars of an ``unlabeled`` split."""
    root = tmp_path_factory.mktemp("pools")
    folder = make_folder(root, {"pool": 12}, seed=5, ext="jpg") / "pool"
    paths = sorted(folder.rglob("*.jpg"))
    shards = root / "shards"
    writer = ShardWriter(shards, "unlabeled", 8)
    for i, p in enumerate(paths):
        writer.write(f"img{i:03d}", p.read_bytes())
    write_info(shards, {"unlabeled": writer.close()}, None)
    return {"folder": folder, "paths": [str(p.resolve()) for p in paths], "shards": shards}


def read_list(path: Path) -> list[tuple[str, int, str]]:
    """-> (first column, label, probability text) per line of a mined list."""
    rows = []
    for line in path.read_text().splitlines():
        body, comment = line.split("  # p=")
        name, label = body.rsplit(" ", 1)
        rows.append((name, int(label), comment.split()[0]))
    return rows


def cli(*args: str, env: dict | None = None, script: str | None = None) -> subprocess.CompletedProcess:
    """``kdistill mine ARGS`` in a subprocess; ``script`` runs first (in the same process)."""
    code = (script or "") + "\nimport sys\nfrom kdistill.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    full = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + str(ROOT / "tests"), "OMP_NUM_THREADS": "1",
            **(env or {})}
    return subprocess.run([sys.executable, "-c", code, "mine", *args], capture_output=True, text=True,
                          env=full, cwd=ROOT, timeout=300)


def test_wds_pool_selects_what_the_folder_pool_does_and_writes_shards(trained_run, pools, tmp_path):
    lst = tmp_path / "folder" / "mined.txt"
    a = mine(str(trained_run), str(pools["folder"]), str(lst), fast(4, shard_size=8), progress=False)
    out = tmp_path / "out"
    b = mine(str(trained_run), f"wds:{pools['shards']}", f"wds:{out}",
             MineConfig(top_k=4, batch_size=3, workers=2), progress=False)
    by_path = {p: i for i, p in enumerate(pools["paths"])}
    folder_rows = [(by_path[str((lst.parent / n).resolve())], c, p) for n, c, p in read_list(lst)]
    shard_rows = [(int(n), c, p) for n, c, p in read_list(out / "mined.txt")]
    assert shard_rows == folder_rows and len(folder_rows) == a["selected"] == b["selected"] == 12
    assert b["scored"] == b["pool_size"] == 36 and b["shards"] == 5 and b["skipped"] == 0
    assert "from " in (out / "mined.txt").read_text() and not (out / "mined.work").exists()

    split = open_wds(f"wds:{out}", "unlabeled")
    assert len(split) == 12 and split.classes == ["circle", "square", "stripes"]
    label = {i: c for i, c, _ in folder_rows}
    got = [s for shard in range(len(split.urls)) for s in split.samples(shard)]
    assert [int(s.key) for s in got] == sorted(label)  # pool order
    for s in got:
        assert s.label == label[int(s.key)] and not s.error
        assert s.data == Path(pools["paths"][int(s.key)]).read_bytes()  # copied, not re-encoded
    assert split.class_counts == [sum(1 for c in label.values() if c == k) for k in range(3)]
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["unlabeled"]["num_samples"] == 12

    # a folder pool can be written as shards too; the same images come out
    out2 = tmp_path / "out2"
    mine(str(trained_run), str(pools["folder"]), f"wds:{out2}", fast(4, shard_size=8), progress=False)
    again = open_wds(f"wds:{out2}", "unlabeled")
    assert [s.data for sh in range(len(again.urls)) for s in again.samples(sh)] == [s.data for s in got]


def test_kill9_while_scoring_and_while_writing_then_rerun_is_identical(trained_run, pools, tmp_path):
    args = ["--teacher", str(trained_run), "--pool", f"wds:{pools['shards']}", "--top-k", "4",
            "--batch-size", "3", "--workers", "0", "--no-progress", "--device", "cpu", "--shard-size", "5"]
    full = tmp_path / "full"
    assert cli(*args, "--out", f"wds:{full}").returncode == 0
    out = tmp_path / "killed"
    kill_scoring = ("import os, signal\nfrom kdistill.mining import score\nreal = score.write_shard\nn = [0]\n"
                    "def w(work, rec):\n    n[0] += 1\n    if n[0] == 3:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
                    "    real(work, rec)\nscore.write_shard = w\n")
    proc = cli(*args, "--out", f"wds:{out}", script=kill_scoring)
    assert proc.returncode == -9
    work = out / "mined.work"
    assert sorted(p.name for p in work.glob("shard-*.pt")) == ["shard-00000.pt", "shard-00001.pt"]
    kill_writing = ("import os, signal\nfrom kdistill.data import shards\nreal = shards.ShardWriter.flush\n"
                    "def f(self):\n    if self.next == 1 and self._buffer:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
                    "    real(self)\nshards.ShardWriter.flush = f\n")
    proc = cli(*args, "--out", f"wds:{out}", script=kill_writing)
    assert proc.returncode == -9 and "resuming: 2 of 5 shards done" in proc.stderr
    assert [p.name for p in (work / "out").glob("*.tar")] == ["unlabeled-000000.tar"]
    proc = cli(*args, "--out", f"wds:{out}")
    assert proc.returncode == 0, proc.stderr
    assert "resuming: 5 of 5 shards done" in proc.stderr
    assert (out / "mined.txt").read_text() == (full / "mined.txt").read_text()
    names = sorted(p.name for p in full.glob("*.tar"))
    assert names == sorted(p.name for p in out.glob("*.tar")) == ["unlabeled-000000.tar", "unlabeled-000001.tar",
                                                                   "unlabeled-000002.tar"]
    for n in names:
        assert (out / n).read_bytes() == (full / n).read_bytes()
    assert json.loads((out / "_info.json").read_text()) == json.loads((full / "_info.json").read_text())


def test_bad_shard_input(trained_run, pools, tmp_path, capsys):
    from kdistill.cli import main

    base = ["mine", "--teacher", str(trained_run), "--top-k", "2", "--workers", "0", "--no-progress"]
    cases = [
        (["--pool", f"wds:{pools['shards']}", "--out", str(tmp_path / "m.txt")], "cannot point into the tar files"),
        (["--pool", f"wds:{tmp_path}/none-{{000000..000003}}.tar", "--out", f"wds:{tmp_path / 'o'}"],
         "does not exist"),
        (["--pool", f"wds:{tmp_path}/none-*.tar", "--out", f"wds:{tmp_path / 'o'}"], "match no file"),
        (["--pool", f"wds:{tmp_path}", "--out", f"wds:{tmp_path / 'o'}"], "has no unlabeled or train shards"),
        (["--pool", f"wds:{pools['shards']}", "--out", f"wds:{pools['shards']}"], "not a mining output"),
    ]
    for argv, message in cases:
        assert main([*base, *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_truncated_tar_mid_pool_is_skipped_and_counted(trained_run, pools, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(pools["shards"], shards)
    tar = shards / "unlabeled-000002.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[:len(data) // 2])  # breaks off inside a member
    out = tmp_path / "out"
    s = mine(str(trained_run), f"wds:{shards}", f"wds:{out}", MineConfig(top_k=50, batch_size=4, workers=2),
             progress=False)  # the warning comes from the main process, whichever worker read the tar
    err = capsys.readouterr().err
    assert "unlabeled-000002.tar" in err and "warning" in err
    (url, why, unread), = s["broken_shards"]
    assert url.endswith("unlabeled-000002.tar") and "not a readable tar" in why
    assert 0 < unread < 8 and s["unread_samples"] == unread and s["scored"] == 36 - unread
    assert s["selected"] == 36 - unread == len(open_wds(f"wds:{out}", "unlabeled"))


# ------------------------------------------------------------------ bounded state


class FakePool(Pool):
    """``n`` one-pixel images in shards of ``size``: costs nothing to decode."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size, self.spec = n, size, "fake"
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.randint(0, 256, (n, 3, 1, 1), generator=g, dtype=torch.uint8)

    def __len__(self) -> int:
        return self.n

    @property
    def num_shards(self) -> int:
        return -(-self.n // self.size)

    def shard_size(self, shard: int) -> int:
        return min(self.n, (shard + 1) * self.size) - shard * self.size

    def items(self, shard: int):
        for i in range(shard * self.size, shard * self.size + self.shard_size(shard)):
            yield Item(i, f"k{i}", self.pixels[i])

    def fingerprint(self) -> str:
        return "fake"


class FakeTeacher:
    """Logits linear in the pixel colour (deterministic per image)."""

    class preprocessing:  # noqa: N801
        image_size, crop_pct = 1, 1.0

    def __init__(self, classes: int) -> None:
        self.w = torch.randn(3, classes, generator=torch.Generator().manual_seed(1)) * 0.05


def test_work_state_and_merge_do_not_grow_with_the_pool(tmp_path, monkeypatch):
    classes, k, size = 5, 10, 100
    teacher = FakeTeacher(classes)
    monkeypatch.setattr(score_mod, "run_teacher",
                        lambda t, x, d: (x.float().flatten(1) @ t.w, None))
    entries = {}
    for n in (1_500, 15_000):
        pool, work = FakePool(n, size), tmp_path / str(n)
        work.mkdir()
        scorer = score_mod.ShardScorer(classes, k, 0.0, None)
        assert score_mod.score_shards(pool, range(pool.num_shards), work, teacher, scorer, 64, 0,
                                      torch.device("cpu"), False) == pool.num_shards
        files = sorted(work.glob("shard-*.pt"))
        entries[n] = sum(len(torch.load(f, weights_only=True)["cls"]) for f in files)
        merged = merge_shards(files, classes, k)
        assert merged.top.probs.shape[1] <= k and len(merged.info) <= classes * k
        # pruned shard files still give exactly the brute-force top-k of the whole pool
        probs = torch.softmax(pool.pixels.float().flatten(1) @ teacher.w, 1).numpy()
        ref = TopK(classes, k)
        ref.push(probs, np.arange(n))
        assert [(i, c) for i, c, _ in assign(merged.top)] == [(i, c) for i, c, _ in assign(ref)]
    # 10x the pool: the shard files hold far less than 10x the entries (they stop growing
    # once the per-class top-k has filled); without pruning it would be exactly 10x
    assert entries[15_000] < 2 * entries[1_500], entries


def test_ssld_with_a_sharded_pool_distils_on_the_mined_shards(tiny_root, trained_run, tmp_path, capsys):
    """kdistill ssld --pool wds:DIR: mine writes shards under the run, the distill stage streams
    them as data.unlabeled beside the labeled images."""
    from conftest import TRAIN_ARGS
    from kdistill.cli import main
    from kdistill.config import load_yaml

    pool = make_folder(tmp_path / "pool", {"p": 12}, seed=11, ext="jpg") / "p"
    shards = tmp_path / "shards"
    writer = ShardWriter(shards, "unlabeled", 4)
    for i, p in enumerate(sorted(pool.rglob("*.jpg"))):
        writer.write(f"img{i:03d}", p.read_bytes())
    write_info(shards, {"unlabeled": writer.close()}, None)
    out = tmp_path / "ssld"
    common = ["--teacher", str(trained_run), "--pool", f"wds:{shards}", "--top-k", "3", "--model", "resnet8"]
    assert main(["ssld", "--data", str(tiny_root), *common, "--out", str(out)]) == 2
    assert "needs sharded labeled data too" in capsys.readouterr().err
    labeled = tmp_path / "labeled"
    assert main(["pack", str(tiny_root), "--out", str(labeled), "--shard-size", "4", "--workers", "0"]) == 0
    assert main(["ssld", "--data", f"wds:{labeled}", "--teacher", str(trained_run), "--pool", f"wds:{shards}",
                 "--top-k", "3", "--model", "resnet8", "--epochs", "1", "--finetune-epochs", "0",
                 "--out", str(out), *TRAIN_ARGS, "--workers", "0",
                 "-o", "ssld.phash_threshold=-1", "-o", "ssld.embed_threshold=2"]) == 0
    unlabeled = load_yaml(out / "distill" / "config.yaml")["data"]["unlabeled"]
    assert unlabeled.startswith("wds:")
    mined = open_wds(unlabeled, "unlabeled", labeled=False)
    assert 0 < len(mined) <= 9
    row = json.loads((out / "distill" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train.kd"] > 0


class _TensorPool(Pool):
    """One shard of decoded images (tensors), for ShardStream alone."""

    def __init__(self, images: list[torch.Tensor]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_shards(self) -> int:
        return 1

    def shard_size(self, shard: int) -> int:
        return len(self.images)

    def items(self, shard: int):
        return iter(Item(i, f"k{i}", img) for i, img in enumerate(self.images))


def test_shard_stream_prepares_batches_at_once_and_skips_only_the_image_that_fails():
    from kdistill.mining.dedup import phash
    from kdistill.mining.pool import ShardStream

    gen = torch.Generator().manual_seed(0)
    same = [torch.randint(0, 200, (3, 12, 12), dtype=torch.uint8, generator=gen) for _ in range(5)]
    same[3][0, 0, 0] = 255  # the transform below refuses this one

    def transform(x):
        if bool((x == 255).any()):
            raise ValueError("no 255 here")
        return x[..., :8, :8]

    batches = list(ShardStream(_TensorPool(same), [0], transform, 4, crops=(1.0, 0.5)))
    keys = [k for b in batches for k in b["keys"]]
    assert keys == ["k0", "k1", "k2", "k4"]
    assert [s for b in batches for s in b["skipped"]] == [("k3", "ValueError: no 255 here")]
    first = batches[0]
    assert first["image"].shape == (3, 3, 8, 8) and first["phash"].shape == (3, 2)
    # the batched hashes are the per-image ones
    assert int(first["phash"][1, 0]) == int(phash(same[1].unsqueeze(0))[0])
    assert int(first["phash"][1, 1]) == int(phash(same[1][:, 3:9, 3:9].unsqueeze(0))[0])
    # images of different sizes in one batch: prepared one by one
    mixed = [same[0], torch.randint(0, 200, (3, 10, 14), dtype=torch.uint8, generator=gen)]
    (b,) = list(ShardStream(_TensorPool(mixed), [0], transform, 4))
    assert b["keys"] == ["k0", "k1"] and b["image"].shape == (2, 3, 8, 8)


def test_mining_loaders_freeze_the_heap_before_their_workers_fork():
    """gc.freeze before the fork: a full collection would otherwise write to every inherited
    object and copy the pages the workers share with the main process (bench/scale.py)."""
    import gc

    from kdistill.mining.score import _loader

    gc.unfreeze()
    try:
        _loader([], 0, torch.device("cpu"))
        assert gc.get_freeze_count() == 0
        _loader([], 2, torch.device("cpu"))
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
