"""View 'fixed': the teacher table is memory-mapped in <out>/teacher-table/ (full fp16 logits
or the top k), reused while data and teacher match, and under torchrun filled by every rank
and written by rank 0 from row blocks of bounded size (engine/table.py)."""
import json
import pickle
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as td

from kdistill.cli import main
from kdistill.data.datasets import eval_dataset
from kdistill.data.loader import eval_loader
from kdistill.data.softlabels import FLOOR, TeacherTable, fingerprint, topk_log_probs, topk_renormalised
from kdistill.engine import table as table_mod
from kdistill.engine.distill import DistillConfig, DistillSection, build_teacher, teacher_table
from kdistill.engine.run import prepare
from kdistill.errors import UserError

from conftest import make_folder, torchrun


def _context(root, teacher, out, k=0):
    cfg = DistillConfig()
    cfg.data.root, cfg.data.workers, cfg.model.name = str(root), 0, "resnet8"
    cfg.train.device, cfg.train.out, cfg.eval.batch_size = "cpu", str(out), 16
    cfg.distill.teachers, cfg.distill.view, cfg.distill.table_top_k = [str(teacher)], "fixed", k
    ctx = prepare(cfg)
    return ctx, build_teacher(ctx, cfg.distill)


def in_ram(ctx, teacher) -> torch.Tensor:
    """The table as it was built before it went to disk: fp32 logits per index, in RAM."""
    loader = eval_loader(eval_dataset(ctx.splits.train, teacher.preprocessing), 16, 0)
    table = torch.zeros(len(ctx.splits.train), len(ctx.classes))
    for batch in loader:
        table[batch["index"]] = teacher.logits(batch["image"])
    return table


def counting(teacher):
    calls = []
    logits = teacher.logits
    teacher.logits = lambda x: calls.append(len(x)) or logits(x)
    return calls


def test_mapped_table_equals_the_in_ram_table_and_is_reused(tiny_root, trained_run, tmp_path, capsys):
    ctx, teacher = _context(tiny_root, trained_run, tmp_path / "o")
    expect = in_ram(ctx, teacher)
    calls = counting(teacher)
    table = teacher_table(ctx, teacher)
    folder = tmp_path / "o" / "teacher-table"
    assert isinstance(table, TeacherTable) and len(table) == 72 and sum(calls) == 72
    stored = np.load(folder / "logits.npy", mmap_mode="r")
    assert isinstance(stored, np.memmap) and stored.dtype == np.float16 and stored.shape == (72, 3)
    assert torch.equal(torch.from_numpy(np.array(stored)), expect.half())
    assert torch.equal(table[5], expect[5].half()) and torch.equal(table[[3, 70]], expect[[3, 70]].half())
    m = json.loads((folder / "manifest.json").read_text())
    assert m["shape"] == {"logits": [72, 3]} and m["dtype"] == {"logits": "float16"} and m["k"] == 0
    assert len(m["data"]["fingerprint"]) == 64 and len(m["teacher"]["sha256"]) == 64
    assert len(pickle.dumps(table)) < 4000  # workers get the path, not the rows
    assert sorted(p.name for p in folder.iterdir()) == ["logits.npy", "manifest.json"]

    calls.clear()
    capsys.readouterr()
    mtime = (folder / "logits.npy").stat().st_mtime_ns
    again = teacher_table(ctx, teacher)  # a resumed run: same data, same teacher
    assert calls == [] and "reusing the teacher table" in capsys.readouterr().err
    assert (folder / "logits.npy").stat().st_mtime_ns == mtime and torch.equal(again[7], table[7])

    m["data"]["fingerprint"] = "0" * 64  # made for other data: built again
    (folder / "manifest.json").write_text(json.dumps(m))
    rebuilt = teacher_table(ctx, teacher)
    assert sum(calls) == 72 and torch.equal(rebuilt[7], table[7])
    assert json.loads((folder / "manifest.json").read_text())["data"]["fingerprint"] != "0" * 64

    calls.clear()
    (folder / "manifest.json").unlink()  # a build killed before its manifest: built again
    teacher_table(ctx, teacher)
    assert sum(calls) == 72


def test_other_data_or_teacher_rebuild_the_table(tiny_root, trained_run, tmp_path):
    ctx, teacher = _context(tiny_root, trained_run, tmp_path / "o")
    teacher_table(ctx, teacher)
    other = make_folder(tmp_path / "other", {"train": 20, "val": 4})
    ctx2, teacher2 = _context(other, trained_run, tmp_path / "o")
    table = teacher_table(ctx2, teacher2)
    assert len(table) == 60 and np.load(tmp_path / "o" / "teacher-table" / "logits.npy").shape == (60, 3)
    with torch.no_grad():
        next(teacher2.parameters()).add_(0.5)  # another teacher on the same data
    calls = counting(teacher2)
    teacher_table(ctx2, teacher2)
    assert sum(calls) == 60


def test_topk_table_rows_are_renormalised_as_the_cache_does(tiny_root, trained_run, tmp_path):
    ctx, teacher = _context(tiny_root, trained_run, tmp_path / "o", k=2)
    logits = in_ram(ctx, teacher)
    table = teacher_table(ctx, teacher)
    folder = tmp_path / "o" / "teacher-table"
    assert sorted(p.name for p in folder.iterdir()) == ["index.npy", "manifest.json", "probs.npy"]
    p, i = topk_renormalised(logits.softmax(-1), 2)
    probs, index = np.load(folder / "probs.npy"), np.load(folder / "index.npy")
    assert probs.dtype == np.float16 and index.dtype == np.int32 and probs.shape == index.shape == (72, 2)
    assert torch.equal(torch.from_numpy(index).long(), i)
    torch.testing.assert_close(torch.from_numpy(probs), p, atol=1e-3, rtol=0)
    rows = table[list(range(72))]
    assert rows.shape == (72, 3)
    assert torch.equal(rows, topk_log_probs(torch.from_numpy(probs).float(), torch.from_numpy(index).long(), 3))
    kept = rows.exp()
    torch.testing.assert_close(kept.topk(2, -1).values.sum(-1), torch.ones(72), atol=2e-3, rtol=0)
    dropped = torch.ones(72, 3, dtype=torch.bool).scatter_(1, i, False)
    assert torch.allclose(rows[dropped], torch.tensor(FLOOR).log())  # the cache's floor


def _ident(n, k=0):
    return {"format": 1, "k": k, "data": {"n": n, "classes": ["a", "b", "c"], "fingerprint": "f"},
            "teacher": {"sha256": "t"}}


@pytest.fixture
def world_of_one(tmp_path):
    """A real gloo process group of one rank: the torchrun code path in this process."""
    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    sizes = []
    reduce = td.reduce

    def recording(t, *a, **k):
        sizes.append(t.numel() * t.element_size())
        return reduce(t, *a, **k)

    td.reduce = recording
    try:
        yield sizes
    finally:
        td.reduce = reduce
        td.destroy_process_group()


@pytest.mark.parametrize("k", [0, 2])
def test_merged_rows_come_in_bounded_blocks_duplicates_averaged_missing_marked(world_of_one, tmp_path, k):
    rows = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.5, -1.0], [0.0, 0.0, 9.0], [2.0, 2.5, 3.0], [7.0, 1.0, 0.0]])
    # row 3 twice, row 2 never (an unreadable image)
    loader = [{"image": rows[[4, 3]], "index": torch.tensor([4, 3])},
              {"skipped": ["x"], "index": torch.tensor([], dtype=torch.long)},
              {"image": rows[[0, 1, 3]], "index": torch.tensor([0, 1, 3])}]
    width = 3 if not k else 2 * k
    table = table_mod.ensure_table(tmp_path / "t", _ident(5, k), loader, lambda x: x, torch.device("cpu"),
                                   chunk_bytes=2 * 4 * (width + 1))  # 2 rows a block: 5 does not divide
    assert world_of_one == [2 * 4 * (width + 1)] * 2 + [4 * (width + 1)]
    out = table[list(range(5))]
    if not k:
        assert torch.equal(out[[0, 1, 3, 4]], rows[[0, 1, 3, 4]].half()) and torch.equal(out[2], torch.zeros(3).half())
    else:
        p, i = topk_renormalised(rows.softmax(-1), k)
        assert torch.equal(out[[0, 1, 3, 4]], topk_log_probs(p.float(), i, 3)[[0, 1, 3, 4]])
        assert (np.load(tmp_path / "t" / "index.npy")[2] == -1).all()
        assert torch.allclose(out[2], torch.tensor(FLOOR).log().expand(3))
    assert not list((tmp_path / "t").glob("part-*")) and not list((tmp_path / "t").glob("*.partial*"))


SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch.distributed as td
    sys.path.insert(0, sys.argv[3])
    from test_teacher_table import _context
    from kdistill import distributed as dist
    from kdistill.engine.distill import teacher_table

    root, teacher, tests, out = sys.argv[1:5]
    sizes, scored = [], []
    reduce = td.reduce
    def recording(t, *a, **k):
        sizes.append(t.numel() * t.element_size())
        return reduce(t, *a, **k)
    td.reduce = recording
    for k in (0, 2):
        ctx, teachers = _context(root, teacher, f"{out}/run-k{k}", k=k)
        assert dist.world_size() == 2
        logits = teachers.logits
        teachers.logits = lambda x: scored.append(len(x)) or logits(x)
        table = teacher_table(ctx, teachers, chunk_bytes=64)
        np.save(f"{out}/k{k}-rank{dist.rank()}.npy", table[list(range(len(table)))].numpy())
    np.save(f"{out}/sizes-rank{dist.rank()}.npy", np.array([sum(scored), max(sizes), len(sizes)]))
    dist.cleanup()
""")


def test_two_ranks_each_score_a_shard_and_rank0_writes_every_row(tiny_root, trained_run, tmp_path):
    from conftest import ROOT

    script = tmp_path / "table.py"
    script.write_text(SCRIPT)
    proc = torchrun(script, str(tiny_root), str(trained_run), str(ROOT / "tests"), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for k in (0, 2):
        r0, r1 = (np.load(tmp_path / f"k{k}-rank{r}.npy") for r in (0, 1))
        assert np.array_equal(r0, r1)
        ctx, teacher = _context(tiny_root, trained_run, tmp_path / f"one-k{k}", k=k)
        one = teacher_table(ctx, teacher)[list(range(72))]
        torch.testing.assert_close(torch.from_numpy(r0).float(), one.float(), atol=1e-2, rtol=1e-2)
        folder = tmp_path / f"run-k{k}" / "teacher-table"
        assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json"] + (
            ["probs.npy", "index.npy"] if k else ["logits.npy"]))
    full = np.load(tmp_path / "k0-rank0.npy")
    assert (np.abs(full).sum(1) > 0).all()  # no row left empty
    for r in (0, 1):
        scored, biggest, blocks = np.load(tmp_path / f"sizes-rank{r}.npy")
        # each rank scores half the images twice (k=0, k=2); blocks of 4 rows (3 logits + count)
        # and of 3 rows (2 probs + 2 classes + count) in 64 bytes of fp32
        assert scored == 72 and biggest <= 64 and blocks == 72 // 4 + 72 // 3


def test_kd_trains_from_a_topk_table_and_a_resume_reuses_it(tiny_root, trained_run, tmp_path, capsys):
    out = tmp_path / "kd"
    args = ["distill", "--data", str(tiny_root), "--teacher", str(trained_run), "--model", "resnet8",
            "--view", "fixed", "-o", "distill.table_top_k=2", "--loss", "kd:0.9", "--loss", "ce:0.1",
            "--batch-size", "16", "--out", str(out), "--workers", "0", "--no-progress", "--lr", "0.05",
            "--epochs", "1"]
    assert main(args) == 0
    manifest = json.loads((out / "teacher-table" / "manifest.json").read_text())
    assert manifest["k"] == 2
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0  # a finished run resumed: the table is reused
    assert "reusing the teacher table" in capsys.readouterr().err
    assert json.loads((out / "teacher-table" / "manifest.json").read_text())["created"] == manifest["created"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and all(np.isfinite(r["train.loss"]) and r["train.kd"] > 0 for r in rows)


def test_table_top_k_is_checked():
    with pytest.raises(UserError, match="table_top_k"):
        DistillSection(table_top_k=-1, view="fixed")
    with pytest.raises(UserError, match="view fixed"):
        DistillSection(table_top_k=5)
    assert DistillSection(table_top_k=5, view="fixed").table_top_k == 5


def test_table_over_wds_shards_is_keyed_by_the_stable_sample_index(tiny_root, trained_run, tmp_path):
    """Shards written in the folder's order: sample index = shard offset + position, so the
    table built from the shards equals the folder's, row for row."""
    from kdistill.data.shards import ShardSplit, ShardWriter, write_info
    from kdistill.data.sources import open_split

    shards = tmp_path / "wds"
    entries = {}
    for split in ("train", "val"):
        src = open_split(str(tiny_root / split), split)
        w = ShardWriter(shards, split, 10, image_ext="png")  # 72 = 7 x 10 + 2: uneven shards
        for i, path in enumerate(src.paths):
            w.write(f"{split}-{i:04d}", open(path, "rb").read(), src.labels[i])
        entries[split] = w.close()
    write_info(shards, entries, src.classes, image_key="png")
    ctx, teacher = _context(f"wds:{shards}", trained_run, tmp_path / "s")
    assert isinstance(ctx.splits.train, ShardSplit) and len(ctx.splits.train.urls) == 8
    table = teacher_table(ctx, teacher)
    folder_ctx, folder_teacher = _context(tiny_root, trained_run, tmp_path / "f")
    expect = in_ram(folder_ctx, folder_teacher).half()
    torch.testing.assert_close(table[list(range(72))], expect, atol=1e-2, rtol=0)
    m = json.loads((tmp_path / "s" / "teacher-table" / "manifest.json").read_text())
    assert m["data"]["n"] == 72 and m["data"]["fingerprint"] == fingerprint(ctx.splits.train)
    calls = counting(teacher)
    teacher_table(ctx, teacher)  # the same shards: reused
    assert calls == []
