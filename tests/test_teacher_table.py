"""View 'fixed': the teacher table is summed over ranks in bounded fp32 chunks on the device,
never whole (N x C x 4 bytes: 5 GB at ImageNet size)."""
import textwrap

import torch

from kdistill import distributed as dist
from kdistill.engine.distill import DistillConfig, build_teacher, teacher_table
from kdistill.engine.run import prepare

from test_ranks import torchrun


def _context(tiny_root, teacher, out):
    cfg = DistillConfig()
    cfg.data.root, cfg.data.workers, cfg.model.name = str(tiny_root), 0, "resnet8"
    cfg.train.device, cfg.train.out, cfg.eval.batch_size = "cpu", str(out), 16
    cfg.distill.teachers = [str(teacher)]
    ctx = prepare(cfg)
    teachers = build_teacher(ctx, cfg.distill)
    return ctx, teachers


def test_table_is_reduced_in_bounded_chunks(tiny_root, trained_run, tmp_path, monkeypatch):
    ctx, teachers = _context(tiny_root, trained_run, tmp_path / "o")
    whole = teacher_table(ctx, teachers)  # one process: nothing to reduce
    assert whole.dtype == torch.float16 and whole.shape == (72, 3) and whole.abs().sum(1).min() > 0

    seen = []

    def fake_all_reduce(t, *a, **k):  # a world of one: the sum is the tensor itself
        seen.append((t.numel() * t.element_size(), t.dtype, t.device.type))

    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    monkeypatch.setattr(dist.td, "all_reduce", fake_all_reduce)
    chunked = teacher_table(ctx, teachers, chunk_bytes=40)
    assert torch.equal(chunked, whole)
    assert chunked.dtype == torch.float16 and chunked.device.type == "cpu"
    assert seen and max(n for n, _, _ in seen) <= 40  # peak device tensor bounded
    assert sum(n for n, _, _ in seen) == 72 * 3 * 4  # every entry reduced once, in fp32
    assert {d for _, d, _ in seen} == {torch.float32}
    seen.clear()
    assert torch.equal(teacher_table(ctx, teachers, chunk_bytes=1 << 30), whole)
    assert [n for n, _, _ in seen] == [72 * 3 * 4]  # a large chunk: one all-reduce


def test_chunked_sum_covers_tables_of_any_size(monkeypatch):
    """Every element is reduced exactly once, also when the chunk does not divide the table."""
    calls = []

    def double(t, *a, **k):  # a world of two identical ranks
        calls.append(t.numel())
        t.mul_(2)

    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist.td, "all_reduce", double)
    table = torch.arange(35, dtype=torch.float16).reshape(7, 5)
    out = dist.all_reduce_sum_chunked(table.clone(), torch.device("cpu"), chunk_bytes=12)
    assert torch.equal(out, table * 2) and out.dtype == torch.float16
    assert calls == [3] * 11 + [2]


SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    sys.path.insert(0, sys.argv[3])
    from test_teacher_table import _context
    from kdistill import distributed as dist
    from kdistill.engine.distill import teacher_table

    root, teacher, tests, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    sizes = []
    all_reduce = dist.td.all_reduce
    def recording(t, *a, **k):
        sizes.append(t.numel() * t.element_size())
        return all_reduce(t, *a, **k)
    dist.td.all_reduce = recording
    ctx, teachers = _context(root, teacher, out + "/run")
    assert dist.world_size() == 2
    table = teacher_table(ctx, teachers, chunk_bytes=48)
    torch.save({"table": table, "sizes": sizes}, f"{out}/table-rank{dist.rank()}.pt")
    dist.cleanup()
""")


def test_two_ranks_each_score_a_shard_and_both_hold_the_whole_table(tiny_root, trained_run, tmp_path):
    from conftest import ROOT

    script = tmp_path / "table.py"
    script.write_text(SCRIPT)
    proc = torchrun(script, str(tiny_root), str(trained_run), str(ROOT / "tests"), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"table-rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["table"], r1["table"])
    assert max(r0["sizes"]) <= 48 and sum(r0["sizes"]) == 72 * 3 * 4
    ctx, teachers = _context(tiny_root, trained_run, tmp_path / "one")
    torch.testing.assert_close(r0["table"], teacher_table(ctx, teachers), atol=1e-2, rtol=1e-2)
