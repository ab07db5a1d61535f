"""Unreadable images are counted (``train.skipped`` / ``val.skipped`` in metrics.jsonl) and
each listed once, with why, in ``RUN/skipped.txt``, whether they were dropped when decoding
into RAM or met by the loader; list files that cannot be read or lack a val list say what
was looked for."""
import json
import os
import subprocess
import sys

import pytest

from kdistill.cli import main
from kdistill.config import DataConfig
from kdistill.data.datasets import open_splits
from kdistill.data.sources import open_source
from kdistill.errors import UserError

from conftest import ROOT, corrupt_png, make_folder, png_bytes

TRAIN = ["--model", "resnet8", "--batch-size", "4", "--workers", "0", "--no-progress", "--lr", "0.05"]


def _spoiled(tmp_path):
    """3 x 8 good training images + 4 unreadable ones, 3 x 3 good val images + 2 unreadable."""
    root = make_folder(tmp_path / "data", {"train": 8, "val": 3})
    bad = {"train": {"circle/broken.png": b"not an image at all", "square/empty.jpg": b"",
                     "stripes/flipped.png": corrupt_png(), "stripes/cut.jpg": png_bytes(fmt="JPEG")[:100]},
           "val": {"circle/bad.png": b"nope", "square/empty.png": b""}}
    for split, files in bad.items():
        for rel, data in files.items():
            (root / split / rel).write_bytes(data)
    return root, {str(root / split / rel): split for split, files in bad.items() for rel in files}


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _listed(out) -> dict[str, tuple[str, str]]:
    lines = (out / "skipped.txt").read_text().splitlines()
    entries = {p: (split, why) for p, split, why in (line.split("\t") for line in lines)}
    assert len(entries) == len(lines)  # each image once
    return entries


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_unreadable_images_are_counted_and_listed_once(tmp_path, in_memory):
    """28 training images in 7 batches of 4: every image is met in each of the 2 epochs."""
    root, bad = _spoiled(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--epochs", "2", "--out", str(out), *TRAIN,
                 "-o", f"data.in_memory={in_memory}"]) == 0
    rows = _rows(out)
    assert [r["train.skipped"] for r in rows] == [4, 4]
    assert [(r["val.skipped"], r["val.n"]) for r in rows] == [(2, 9), (2, 9)]
    listed = _listed(out)
    assert {p: split for p, (split, _) in listed.items()} == bad
    assert all(why for _, why in listed.values())
    assert listed[str(root / "train" / "square" / "empty.jpg")][1] == "empty file"
    assert "not a readable image" in listed[str(root / "train" / "circle" / "broken.png")][1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["skipped"] == 2


def test_a_resumed_run_keeps_the_list_and_a_new_one_replaces_it(tmp_path):
    root, bad = _spoiled(tmp_path)
    out = tmp_path / "run"
    base = ["train", "--data", str(root), "--out", str(out), *TRAIN, "-o", "optim.sched=constant"]
    assert main([*base, "--epochs", "1", "-o", "data.in_memory=no"]) == 0
    before = (out / "skipped.txt").read_text()
    assert main([*base, "--epochs", "2", "--resume", "-o", "data.in_memory=no"]) == 0
    assert (out / "skipped.txt").read_text() == before and len(_listed(out)) == len(bad)
    clean, fresh = make_folder(tmp_path / "clean", {"train": 8, "val": 3}), tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "skipped.txt").write_text("stale.png\ttrain\told\n")
    assert main(["train", "--data", str(clean), "--out", str(fresh), *TRAIN, "--epochs", "1"]) == 0
    assert not (fresh / "skipped.txt").exists()
    assert [(r["train.skipped"], r["val.skipped"]) for r in _rows(fresh)] == [(0, 0)]


def test_torchrun_counts_every_ranks_skips(tmp_path):
    """2 CPU ranks, each meeting some of the unreadable images: counted over both ranks."""
    root, bad = _spoiled(tmp_path)
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "kdistill", "train", "--data", str(root), "--epochs", "1", "--out", str(out),
           "--device", "cpu", *TRAIN, "--batch-size", "7", "-o", "data.in_memory=no"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row, = _rows(out)  # 14 images per rank in 2 batches of 7: every image met once
    assert (row["train.skipped"], row["val.skipped"], row["val.n"]) == (4, 2, 9)
    assert {p: split for p, (split, _) in _listed(out).items()} == bad


# ------------------------------------------------------------------ list files


def _list_root(tmp_path, name: str = "mytrain.txt"):
    """``pd3/<name>`` listing ``imgs/<i>.png``, paths relative to the dataset folder, not
    to pd3/ where the list is: none resolves."""
    data = make_folder(tmp_path / "ds", {"imgs": 2})
    lines = [f"imgs/{c}/{i:03d}.png {k}" for k, c in enumerate(["circle", "square"]) for i in range(2)]
    (tmp_path / "pd3").mkdir()
    (tmp_path / "pd3" / name).write_text("\n".join(lines) + "\n")
    return data, tmp_path / "pd3" / name


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_unreadable_list_names_the_first_path_and_the_folder_paths_are_resolved_against(tmp_path, in_memory):
    _, lst = _list_root(tmp_path)
    with pytest.raises(UserError) as err:
        open_splits(DataConfig(root=str(lst), in_memory=in_memory, workers=0), need_val=False)
    msg = str(err.value)
    assert str(tmp_path / "pd3" / "imgs" / "circle" / "000.png") in msg  # the first resolved path
    assert f"against '{tmp_path / 'pd3'}'" in msg and str(lst) in msg  # the base folder, the list
    assert "FileNotFoundError" in msg and "\n" not in msg


def test_unreadable_val_list_fails_with_where_it_looked(tmp_path):
    data, lst = _list_root(tmp_path)
    good = tmp_path / "train_list.txt"  # beside ds/imgs: resolves
    good.write_text(lst.read_text().replace("imgs/", "ds/imgs/"))
    (tmp_path / "val_list.txt").write_text(lst.read_text().replace("imgs/", "elsewhere/imgs/"))
    with pytest.raises(UserError, match=r"split 'val' can be read: the first is '.*elsewhere/imgs/circle/000.png'"):
        open_splits(DataConfig(root=str(good), in_memory="no", workers=0))


def test_missing_val_list_names_the_list_looked_for(tmp_path):
    _, lst = _list_root(tmp_path)
    with pytest.raises(UserError) as err:
        open_source(str(lst), "val")
    msg = str(err.value)
    assert f"'{lst.parent / 'myval.txt'}'" in msg and "mytrain.txt/val" not in msg
    assert "data.val=" in msg
    _, other = _list_root(tmp_path / "b", name="labels.txt")
    with pytest.raises(UserError, match="only when its name contains 'train'") as err:
        open_source(str(other), "val")
    assert "labels.txt/val" not in str(err.value)
    with pytest.raises(UserError, match=r"no 'test' split \(expected .*/test/<class>/<image>, .*test_list.txt"):
        open_source(str(tmp_path / "b"), "test")
