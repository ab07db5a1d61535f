"""Streaming WebDataset shards through training and evaluation (data/streams.py): the
planner's properties, worker-independent items, and train / eval / resume / export on
``wds:`` data end to end."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, TRAIN_ARGS, make_folder, make_image, train_killed_at_epoch

from kdistill.cli import main
from kdistill.data.datasets import ImageDataset, MixedDataset, open_unlabeled_split
from kdistill.data.loader import EpochLoader, eval_loader
from kdistill.data.shards import ShardWriter, open_wds, write_info
from kdistill.data.streams import Unit, plan_epoch, plan_eval
from kdistill.data.transforms import eval_transform, train_transform
from kdistill.errors import UserError


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pack(folder: Path, splits: dict[str, int], shard_size: int, size: int = 16, seed: int = 0,
         info: bool = True, labeled: bool = True) -> Path:
    """``n`` images per class per split as shards of ``shard_size`` (PNG, lossless), written
    class-interleaved; also returns nothing else: the images are ``folder_images`` too."""
    rng = np.random.default_rng(seed)
    entries = {}
    for split, n in splits.items():
        w = ShardWriter(folder, split, shard_size, image_ext="png")
        for i in range(n):
            for c in range(len(CLASSES)):
                w.write(f"{split}-{c}-{i:04d}", _png(make_image(c, size, rng)), c if labeled else None)
        entries[split] = w.close()
    if info:
        write_info(folder, entries, CLASSES, image_key="png")
    return folder


def as_folder(shards: Path, split: str, out: Path) -> Path:
    """The same images as ``out/<split>/<class>/<key>.png``."""
    s = open_wds(f"wds:{shards}", split)
    for k in range(len(s.urls)):
        for sample in s.samples(k):
            d = out / split / CLASSES[sample.label]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{sample.key}.png").write_bytes(sample.data)
    return out


@pytest.fixture(scope="module")
def wds_root(tmp_path_factory) -> Path:
    """train: 3 x 16 images in 8 shards of 6; val: 3 x 6 in 3 shards of 6 (16 px)."""
    return pack(tmp_path_factory.mktemp("wds"), {"train": 16, "val": 6}, 6)


def units(lengths, part=0):
    return [Unit(part, k, n) for k, n in enumerate(lengths)]


# ------------------------------------------------------------------ the planner


def test_plan_reads_every_shard_once_reshuffles_and_balances_ranks():
    lengths = [10] * 13 + [4]
    groups = [units(lengths)]
    for world, workers in [(1, 1), (2, 2), (3, 1), (2, 3)]:
        plans = [plan_epoch(groups, [4], seed=1, epoch=e, world=world, workers=workers) for e in range(3)]
        for p in plans:
            dealt = sorted(u.shard for slot in p.slots for u in slot[0])
            assert dealt == list(range(len(lengths)))  # every shard once over all slots
            per_rank = [sum(p.batches[s] for s in p.rank_slots(r)) for r in range(world)]
            assert per_rank == [p.steps] * world  # the same steps on every rank
            for s, slot in enumerate(p.slots):  # no slot yields more full batches than it holds
                assert p.batches[s] <= sum(u.length for u in slot[0]) // 4
        assert len({p.steps for p in plans}) == 1  # the same steps every epoch
        order = lambda p: [u.shard for slot in p.slots for u in slot[0]]
        assert order(plans[0]) != order(plans[1]) or order(plans[1]) != order(plans[2])
        again = plan_epoch(groups, [4], seed=1, epoch=1, world=world, workers=workers)
        assert order(again) == order(plans[1]) and again.batches == plans[1].batches
        assert order(plan_epoch(groups, [4], seed=2, epoch=1, world=world, workers=workers)) != order(plans[1]) \
            or world * workers == 1


def test_too_few_shards_is_one_line_with_the_numbers(wds_root, capsys):
    with pytest.raises(UserError, match=r"3 shards, fewer than the 4 readers \(2 processes x 2 workers\)"):
        plan_epoch([units([6, 6, 6])], [2], 0, 0, world=2, workers=2)
    assert main(["train", "--data", f"wds:{wds_root}", "--model", "resnet8", "--epochs", "1",
                 "--no-progress", "--batch-size", "4", "--workers", "9"]) == 2
    assert "8 shards, fewer than the 9 readers" in capsys.readouterr().err


def test_eval_plan_reads_each_sample_once_over_ranks_and_workers(wds_root):
    split = open_wds(f"wds:{wds_root}", "train")
    ds = ImageDataset(split, eval_transform(16))
    seen = []
    for world in (1, 2, 3):
        got = []
        for rank in range(world):
            from kdistill.data.streams import EvalStream

            stream = EvalStream(split, ds.transform, 5, rank, world, workers=2)
            got += [item["index"] for batch in stream for item in batch]
        assert sorted(got) == list(range(len(split)))
        seen.append(got)
    assert plan_eval(units([3, 9, 3, 3]), 2, 1)[0] == [Unit(0, 1, 9)]  # balanced by count


# ------------------------------------------------------------------ items and workers


def _epochs(loader, epochs=(0, 1)):
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out.append([{k: v for k, v in b.items() if torch.is_tensor(v)} for b in loader])
    return out


def _by_index(batches):
    return {int(i): img for b in batches for i, img in zip(b["index"], b["image"])}


def test_workers_and_persistence_change_no_item(wds_root):
    """Per sample the same augmented pixels whatever the workers; 0 and 1 worker give the
    same batches, and so do persistent and fresh workers; each epoch reads every sample once
    (up to the planned steps) in another order."""
    split = open_wds(f"wds:{wds_root}", "train")
    ds = ImageDataset(split, train_transform(16, 16, crop="pad", auto_augment="randaugment"))
    make = lambda w, p=False: _epochs(EpochLoader(ds, 4, w, seed=3, persistent=p))
    ref = make(0)
    assert [len(e) for e in ref] == [12, 12]  # 48 images / 4
    for e in ref:
        idx = torch.cat([b["index"] for b in e]).tolist()
        assert sorted(idx) == list(range(48))
    assert torch.cat([b["index"] for b in ref[0]]).tolist() != torch.cat([b["index"] for b in ref[1]]).tolist()
    one = make(1)
    assert all(torch.equal(a[k], b[k]) for ea, eb in zip(ref, one) for a, b in zip(ea, eb) for k in a)
    two, two_p = make(2), make(2, True)
    assert all(torch.equal(a[k], b[k]) for ea, eb in zip(two, two_p) for a, b in zip(ea, eb) for k in a)
    for e in range(2):
        a, b = _by_index(ref[e]), _by_index(two[e])
        assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)
    assert not torch.equal(_by_index(ref[0])[0], _by_index(ref[1])[0])  # epochs augment anew


def test_unlabeled_shards_mix_into_the_same_stream(wds_root, tmp_path):
    pool = pack(tmp_path / "pool", {"unlabeled": 8}, 4, seed=5, labeled=False)
    split = open_wds(f"wds:{wds_root}", "train")
    unl = open_unlabeled_split(f"wds:{pool}", split.classes)
    assert len(unl) == 24 and not unl.labeled
    tf = train_transform(16, 16, crop="pad")
    ds = MixedDataset(ImageDataset(split, tf), ImageDataset(unl, tf))
    for fraction, per_batch in ((0.25, 2), (None, None)):
        loader = EpochLoader(ds, 8, 0, seed=1, unlabeled_fraction=fraction)
        loader.set_epoch(0)
        batches = list(loader)
        assert len(batches) == len(loader) > 0
        for b in batches:
            unlabeled = b["index"] >= 48
            assert torch.equal(unlabeled, b["target"] < 0)
            if per_batch is not None:
                assert int(unlabeled.sum()) == per_batch and b["n_labeled"] == 6
        if fraction is None:  # in proportion: all 72 images, each once
            idx = torch.cat([b["index"] for b in batches]).tolist()
            assert sorted(idx) == list(range(72))


# ------------------------------------------------------------------ commands


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


COMMON = ["--model", "resnet8", "--epochs", "2", "--seed", "2", *TRAIN_ARGS, "--device", "cpu", "--lr", "0.05",
          "-o", "train.amp=false"]


def test_train_eval_export_on_shards_match_the_same_images_as_a_folder(wds_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", f"wds:{wds_root}", *COMMON, "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["val.n"] == 18
    assert json.loads((out / "run.json").read_text())["data"]["train"]["lengths"] == [6] * 8
    folder = as_folder(wds_root, "val", tmp_path / "folder")
    capsys.readouterr()
    assert main(["eval", str(out), "--data", f"wds:{wds_root}", "--json", "--workers", "2"]) == 0
    on_shards = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out), "--data", str(folder), "--json", "--workers", "0"]) == 0
    on_folder = json.loads(capsys.readouterr().out)
    assert on_shards["n"] == on_folder["n"] == 18
    for key in ("top1", "top5", "mpa"):
        assert on_shards[key] == pytest.approx(on_folder[key], abs=1e-9)
    assert on_shards["loss"] == pytest.approx(on_folder["loss"], rel=1e-5)
    onnx = tmp_path / "s.onnx"
    assert main(["export", str(out), "--format", "onnx", "--out", str(onnx), "--no-card"]) == 0
    assert f"on 18 val images of wds:{wds_root}" in capsys.readouterr().out

    from kdistill.report.build import build_report

    rows = build_report([str(out)], f"wds:{wds_root}", tmp_path / "r.html", workers=0, bench_seconds=0.02)["rows"]
    assert rows[0]["top1"] == pytest.approx(on_folder["top1"], abs=1e-9)
    assert rows[0]["mpa"] == pytest.approx(on_folder["mpa"], abs=1e-9)



def test_indexed_shards_give_each_image_and_label_by_index(wds_root):
    from kdistill.data.datasets import IndexedShards, shard_images, split_labels
    from kdistill.data.shards import open_wds

    split = open_wds(f"wds:{wds_root}", "val")
    view = IndexedShards(split)
    assert len(view) == len(split) and view.labels == split_labels(split)
    for i, img in shard_images(split):
        assert torch.equal(view.load(i), img)
    assert view.describe(len(split) - 1).endswith(f"[{len(split) - 1 - split.offsets[-1]}]")


def test_shards_without_info_are_counted_and_a_truncated_shard_is_skipped(tmp_path, capsys):
    root = pack(tmp_path / "shards", {"train": 16, "val": 4}, 6, info=False)
    tar = root / "train-000003.tar"
    data = tar.read_bytes()
    assert main(["train", "--data", f"wds:{root}", *COMMON, "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    # cut the shard after the plan has counted it: it breaks off in the middle of training
    from kdistill.engine.trainer import Trainer

    fit = Trainer.fit

    def cut_then_fit(self):
        tar.write_bytes(data[:len(data) // 2 // 512 * 512 + 100])
        return fit(self)

    Trainer.fit = cut_then_fit
    try:
        assert main(["train", "--data", f"wds:{root}", *COMMON, "--out", str(tmp_path / "b")]) == 0
    finally:
        Trainer.fit = fit
        tar.write_bytes(data)
    rows = _rows(tmp_path / "b")
    assert [r["epoch"] for r in rows] == [1, 2]
    lost = [r["train.skipped"] for r in rows]
    assert all(0 < n < 6 for n in lost), lost
    listed = (tmp_path / "b" / "skipped.txt").read_text().splitlines()
    assert listed and all("train-000003.tar[" in line and "\ttrain\t" in line for line in listed)
    assert "train-000003.tar" in capsys.readouterr().err


def test_a_killed_run_resumes_to_the_uninterrupted_result(wds_root, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    args = ["--data", f"wds:{wds_root}", *COMMON, "--workers", "2", "-o", "data.persistent_workers=true"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert main(["train", *args, "--out", str(clean)]) == 0
    train_killed_at_epoch(monkeypatch, [*args, "--out", str(killed)])
    assert main(["train", *args, "--out", str(killed), "--resume"]) == 0
    a, b = load_file(clean / "last.safetensors"), load_file(killed / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in rs]
    assert strip(_rows(clean)) == strip(_rows(killed))
    # the worker count decides which shards share a reader: a resume with another is refused
    assert main(["train", *args[:-4], "--workers", "1", "--out", str(killed), "--resume",
                 "--epochs", "3", "-o", "optim.sched=constant"]) == 2


@pytest.fixture(scope="module")
def wds_teacher(wds_root, tmp_path_factory) -> Path:
    teacher = tmp_path_factory.mktemp("teacher") / "t"
    assert main(["train", "--data", f"wds:{wds_root}", *COMMON, "--epochs", "1", "--out", str(teacher)]) == 0
    return teacher


def test_distill_from_shards_by_pattern_and_views_that_need_random_access_refused(wds_root, wds_teacher,
                                                                                    tmp_path, capsys):
    teacher = wds_teacher
    out = tmp_path / "kd"  # the split patterns instead of the folder
    patterns = ["-o", f"data.train=wds:{wds_root}/train-{{000000..000007}}.tar",
                "-o", f"data.val=wds:{wds_root}/val-*.tar"]
    assert main(["distill", *patterns, "--teacher", str(teacher), "--loss", "kd",
                 *COMMON, "--epochs", "1", "--out", str(out)]) == 0
    assert _rows(out)[-1]["val.n"] == 18 and "val.agreement" in _rows(out)[-1]
    pool = pack(tmp_path / "mined", {"train": 4}, 4, seed=7, labeled=False)  # as SSLD writes them
    mixed = tmp_path / "mixed"
    assert main(["distill", "--data", f"wds:{wds_root}", "--teacher", str(teacher), "--loss", "kd",
                 *COMMON, "--epochs", "1", "--out", str(mixed), "-o", f"data.unlabeled=wds:{pool}",
                 "-o", "data.unlabeled_fraction=0.25"]) == 0
    assert json.loads((mixed / "run.json").read_text())["data"]["unlabeled"]["lengths"] == [4, 4, 4]
    capsys.readouterr()
    assert main(["distill", "--data", f"wds:{wds_root}", "--teacher", str(teacher), "--loss", "kd",
                 *COMMON, "--epochs", "1", "--out", str(tmp_path / "fm"), "-o", "distill.view=funmatch"]) == 2
    err = capsys.readouterr().err
    assert "wds shards" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_distill_view_fixed_scores_every_shard_sample(wds_root, wds_teacher, tmp_path):
    """View 'fixed': the teacher's outputs on every training sample (an eval stream over the
    shards, keyed by index), then added to each streamed item."""
    fixed = tmp_path / "fixed"
    assert main(["distill", "--data", f"wds:{wds_root}", "--teacher", str(wds_teacher), "--loss", "kd",
                 *COMMON, "--epochs", "1", "--out", str(fixed), "-o", "distill.view=fixed"]) == 0
    assert _rows(fixed)[-1]["val.n"] == 18
