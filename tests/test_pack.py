"""``kdistill pack`` (engine/pack.py): folder roots, list files, pools and decoded sources
as WebDataset shards that ``open_wds`` reads back with the same classes, labels, counts
and bytes; shard size and byte cap; resume after a kill with byte-identical tars; refusal
of a folder that holds another pack."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, corrupt_png, make_folder, run_cli
from kdistill.cli import main
from kdistill.data import sources
from kdistill.data.shards import open_wds
from kdistill.engine import pack as packmod
from kdistill.engine.pack import PackConfig
from kdistill.engine.pack_plan import ORDER_SEED, key_of
from kdistill.errors import UserError
from kdistill.images import read_image


def _read(out: Path, split: str, labeled: bool = True):
    s = open_wds(f"wds:{out}", split, labeled=labeled)
    samples = [x for k in range(len(s.urls)) for x in s.samples(k)]
    assert not any(x.error for x in samples)
    return s, samples


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def _pack(source, out, *flags: str) -> int:
    return main(["pack", str(source), "--out", str(out), "--no-progress", *flags])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """train 3 x 5 (PNG), val 3 x 3 (JPEG), test 3 x 2 (PNG), plus one corrupt and one
    non-image file in train/ and a second file with the stem of another."""
    r = make_folder(tmp_path_factory.mktemp("root"), {"train": 5, "test": 2}, size=16)
    make_folder(r, {"val": 3}, size=16, seed=1, ext="jpg")
    (r / "train" / "circle" / "zz_corrupt.png").write_bytes(corrupt_png(32))
    (r / "train" / "square" / "zz_text.jpg").write_bytes(b"not an image")
    (r / "train" / "square" / "000.jpg").write_bytes((r / "val" / "square" / "000.jpg").read_bytes())
    return r


def test_folder_root_round_trip_with_classes_labels_counts_and_bytes(root, tmp_path):
    out = tmp_path / "wds"
    assert _pack(root, out, "--shard-size", "4", "--workers", "0") == 0
    info = json.loads((out / "_info.json").read_text())
    assert set(info["splits"]) == {"train", "val", "test"} and info["image_key"] == "jpg;png"
    for split in ("train", "val", "test"):
        src = sources.open_source(str(root), split)
        readable = [i for i in range(len(src)) if src.read(i)[0] is not None]
        s, samples = _read(out, split)
        assert s.classes == src.classes == ["circle", "square", "stripes"]
        assert len(s) == len(samples) == len(readable)
        # copied as they are, with their labels, in a seeded random order (not the folder's)
        assert sorted((x.label, x.data) for x in samples) == sorted(
            (src.labels[i], Path(src.paths[i]).read_bytes()) for i in readable)
        assert [x.label for x in samples] != [src.labels[i] for i in readable]
        assert [x.index for x in samples] == list(range(len(samples)))
        assert s.class_counts == [sum(1 for x in samples if x.label == c) for c in range(3)]
        if split == "train":  # the shards holding a left-out file are one short
            assert s.lengths == [3, 3, 4, 4, 2]
        else:
            assert all(n == 4 for n in s.lengths[:-1]) and 0 < s.lengths[-1] <= 4
    train = [x.key for x in _read(out, "train")[1]]
    assert "square/000" in train and "square/000~1" in train  # 000.jpg beside 000.png
    assert len(set(train)) == len(train) == 16  # 15 + the extra 000.jpg; the two bad files left out
    journal = json.loads((out / "_pack.json").read_text())
    left_out = sorted(Path(p).name for rec in journal["splits"]["train"]["done"].values() for p, _ in rec["skipped"])
    assert left_out == ["zz_corrupt.png", "zz_text.jpg"] and journal["complete"]
    # stable: another pack, with worker processes, gives the same tars; a rerun changes nothing
    again = tmp_path / "again"
    assert _pack(root, again, "--shard-size", "4", "--workers", "2") == 0
    assert _digests(again) == _digests(out) and len(_digests(out)) == 5 + 3 + 2
    assert _pack(root, out, "--shard-size", "4") == 0 and _digests(again) == _digests(out)


def test_keys_are_tar_safe_one_to_one_and_keep_webdatasets_split():
    assert key_of("airplane/0001.jpg") == "airplane/0001"
    assert key_of("a.b/c d.v2.png") == "a%2Eb/c%20d%2Ev2"
    assert key_of("x/__meta__.jpg") == "x/%5F_meta__"
    assert key_of("../up/é.jpg") == "%2E%2E/up/%C3%A9"
    assert len({key_of(p) for p in ["a_b.jpg", "a.b.jpg", "a b.jpg", "a%20b.jpg"]}) == 4
    for p in ["a.b/c d.v2.png", "../x.y/z.jpeg", "_x/y"]:
        assert "." not in key_of(p)


def test_shard_size_and_byte_cap(root, tmp_path):
    out = tmp_path / "cap"
    assert _pack(root, out, "--shard-size", "100", "--max-shard-bytes", "20KiB", "--workers", "0") == 0
    tars = sorted(out.glob("train-*.tar"))
    assert len(tars) > 1 and all(t.stat().st_size <= 20 * 1024 for t in tars)
    s, samples = _read(out, "train")
    assert len(samples) == 16 and sum(s.lengths) == 16
    with pytest.raises(UserError, match="--max-shard-bytes"):
        PackConfig(str(root), str(out), max_shard_bytes="lots")
    assert _pack(root, tmp_path / "x", "--shard-size", "0") == 2


def test_list_file_root_with_its_split_lists(root, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    src = sources.open_source(str(root), "test")
    rel = [os.path.relpath(p, lists) for p in src.paths]
    lines = [f"{p} {y}" for p, y in zip(rel, src.labels)]
    (lists / "train_list.txt").write_text("\n".join(lines + [lines[0]]) + "\n")  # a file listed twice
    (lists / "val_list.txt").write_text("\n".join(lines[:3]) + "\n")
    out = tmp_path / "wds"
    assert _pack(lists / "train_list.txt", out, "--shard-size", "4") == 0
    s, samples = _read(out, "train")
    assert s.classes == ["0", "1", "2"] and len(samples) == len(lines) + 1
    assert sorted(x.label for x in samples) == sorted(src.labels + [src.labels[0]])
    by_key = {x.key: x for x in samples}
    first = next(k for k in by_key if k.endswith("~1"))
    assert by_key[first].data == by_key[first[:-2]].data  # the file listed twice, under its own key
    v, val = _read(out, "val")
    assert sorted(x.label for x in val) == sorted(src.labels[:3]) and "test" not in json.loads((out / "_info.json").read_text())["splits"]


def test_pools_flat_detected_nested_and_list_with_flag(root, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted((root / "test").rglob("*.png"))):
        (flat / f"img.{i}.png").write_bytes(p.read_bytes())
    out = tmp_path / "p1"
    assert _pack(flat, out, "--shard-size", "4") == 0
    s, samples = _read(out, "unlabeled", labeled=False)
    info = json.loads((out / "_info.json").read_text())
    assert list(info["splits"]) == ["unlabeled"] and "class_counts" not in info["splits"]["unlabeled"]
    assert len(samples) == 6 and all(x.label is None for x in samples) and sorted(x.key for x in samples)[0] == "img%2E0"
    with tarfile.open(out / "unlabeled-000000.tar") as tf:
        assert not [n for n in tf.getnames() if n.endswith(".cls")]
    nested = root / "train"  # class folders but no train/: a pool only when asked
    assert _pack(nested, tmp_path / "p2") == 2
    assert _pack(nested, tmp_path / "p2", "--pool") == 0
    assert len(_read(tmp_path / "p2", "unlabeled", labeled=False)[1]) == 16
    listing = tmp_path / "pool.txt"
    listing.write_text("\n".join(str(p) for p in sorted(flat.iterdir())) + "\n")
    assert _pack(listing, tmp_path / "p3", "--pool") == 0
    assert sorted(x.data for x in _read(tmp_path / "p3", "unlabeled", labeled=False)[1]) == sorted(
        x.data for x in samples)
    assert _pack(listing, tmp_path / "p4") == 2  # a list without labels is not a labeled root
    both = make_folder(tmp_path / "both", {"train": 2}, size=16)  # a root's unlabeled/ is packed too
    (both / "unlabeled").symlink_to(flat, target_is_directory=True)
    assert _pack(both, tmp_path / "p5") == 0
    info = json.loads((tmp_path / "p5" / "_info.json").read_text())
    assert list(info["splits"]) == ["train", "unlabeled"] and info["classes"] == ["circle", "square", "stripes"]
    assert sorted(x.data for x in _read(tmp_path / "p5", "unlabeled", labeled=False)[1]) == sorted(
        x.data for x in samples)


def test_decoded_fashion_mnist_is_encoded_as_jpeg(monkeypatch, tmp_path):
    g = np.random.default_rng(0)
    blocks = lambda n: (np.repeat(np.repeat(g.integers(0, 255, (n, 7, 7), dtype=np.uint8), 4, 1), 4, 2),  # noqa: E731
                        g.integers(0, 10, n).astype(np.uint8))
    arrays = {"train": blocks(9), "test": blocks(4)}
    import importlib

    for name in ("kdistill.data.sources", "kdistill.data.fmnist"):  # where the arrays are read
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "_fashion_mnist_arrays"):
            monkeypatch.setattr(mod, "_fashion_mnist_arrays", lambda: arrays)
            monkeypatch.setattr(mod, "FASHION_MNIST_VAL", 3)
    out = tmp_path / "fm"
    assert _pack("fashion-mnist", out, "--shard-size", "4") == 0
    for split, (images, labels) in (("train", (arrays["train"][0][:6], arrays["train"][1][:6])),
                                    ("val", (arrays["train"][0][6:], arrays["train"][1][6:])),
                                    ("test", arrays["test"])):
        s, samples = _read(out, split)
        order = np.random.default_rng(ORDER_SEED).permutation(len(labels))  # pack's seeded order
        images, labels = images[order], labels[order]
        assert s.classes == sources.FASHION_MNIST_CLASSES and [x.label for x in samples] == labels.tolist()
        for x, img in zip(samples, images):
            assert x.data[:2] == b"\xff\xd8"  # JPEG
            decoded = read_image(x.data).float()
            assert decoded.shape == (3, 28, 28) and (decoded - torch.from_numpy(img).float()).abs().mean() < 8


def _interrupt_after(monkeypatch, k: int) -> None:
    real, calls = packmod.write_shard, [0]

    def write_shard(*args):
        if calls[0] == k:
            raise KeyboardInterrupt
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(packmod, "write_shard", write_shard)


def test_interrupted_pack_resumes_to_identical_shards(root, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    assert _pack(root, clean, "--shard-size", "3", "--workers", "0") == 0
    out = tmp_path / "cut"
    _interrupt_after(monkeypatch, 4)
    assert _pack(root, out, "--shard-size", "3", "--workers", "0") == 130
    journal = json.loads((out / "_pack.json").read_text())
    assert sum(len(v["done"]) for v in journal["splits"].values()) == 4 and not journal["complete"]
    assert not (out / "_info.json").exists()
    monkeypatch.undo()
    (out / ".train-000005.tar.abc123.tmp").write_bytes(b"half a tar")  # what a kill leaves
    assert _pack(root, out, "--shard-size", "3", "--workers", "2") == 0
    assert _digests(out) == _digests(clean) and not list(out.glob(".*.tmp"))
    assert (out / "_info.json").read_bytes() == (clean / "_info.json").read_bytes()


def test_kill_9_then_rerun_gives_identical_shards(root, tmp_path):
    clean = tmp_path / "clean"
    assert _pack(root, clean, "--shard-size", "2", "--workers", "0") == 0
    out = tmp_path / "killed"
    args = ["pack", str(root), "--out", str(out), "--shard-size", "2", "--workers", "0", "--no-progress"]
    slow = ("import time, kdistill.engine.pack as p\n"
            "real = p.write_shard\n"
            "def write_shard(*a):\n    time.sleep(0.4)\n    return real(*a)\n"
            "p.write_shard = write_shard\n"
            f"from kdistill.cli import main\nmain({args!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", slow], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.tar"))) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 4 <= len(list(out.glob("*.tar"))) < len(_digests(clean))  # killed part way
    assert _pack(root, out, "--shard-size", "2") == 0
    assert _digests(out) == _digests(clean)


def test_a_folder_holding_another_pack_is_refused(root, tmp_path, capsys):
    out = tmp_path / "wds"
    assert _pack(root, out, "--shard-size", "4") == 0
    capsys.readouterr()
    assert _pack(root, out, "--shard-size", "5") == 2
    err = capsys.readouterr().err.strip()
    assert "--shard-size 4" in err and len(err.splitlines()) == 1
    other = make_folder(tmp_path / "other", {"train": 2}, size=16)
    assert _pack(other, out, "--shard-size", "4") == 2
    assert "holds a pack of" in capsys.readouterr().err
    (out / "_pack.json").unlink()
    assert _pack(root, out, "--shard-size", "4") == 2
    assert "did not write" in capsys.readouterr().err


def test_missing_source_is_one_line_exit_2(tmp_path):
    r = run_cli("pack", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
