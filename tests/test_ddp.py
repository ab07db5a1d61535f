"""The same `kdistill train` under torchrun: 2 CPU processes with gloo."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdistill.models.checkpoint import load_state, read_meta

from conftest import ROOT, make_folder


def test_torchrun_two_cpu_processes(tiny_root, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "kdistill", "train", "--data", str(tiny_root), "--model", "resnet8", "--epochs", "2",
           "--batch-size", "8", "--out", str(out), "--workers", "0", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # rank 0 logs once per epoch
    assert all(r["val.n"] == 24 for r in rows)  # each val image evaluated exactly once
    assert read_meta(out / "best.safetensors")["arch"] == "resnet8"
    assert proc.stdout.count("done:") == 1  # only rank 0 reports


# ------------------------------------------------------------------ ranks stay in step
# An unreadable batch on one rank only: every rank must still take part in the same
# collectives (else DDP hangs) and the same accumulation windows.

BATCH, SEED = 8, 5


def _spoil(root, rank: int, batch: int, world: int = 2) -> None:
    """Make every file of ``rank``'s ``batch``-th training batch of epoch 0 unreadable
    (the same DistributedSampler order as kdistill's EpochLoader)."""
    from torch.utils.data import DistributedSampler

    from kdistill.data.sources import open_source

    source = open_source(str(root), "train")
    sampler = DistributedSampler(range(len(source)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=SEED, drop_last=True)
    sampler.set_epoch(0)
    for i in list(sampler)[batch * BATCH:(batch + 1) * BATCH]:
        Path(source.paths[i]).write_bytes(b"not an image")


def _descendants(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [d for c in map(int, children) for d in (c, *_descendants(c))]


def _run_ranks(args: list[str], logs: Path, timeout: int) -> subprocess.CompletedProcess:
    """torchrun 2 CPU ranks of this file's worker. A hang fails the test: torchrun and its
    workers (each in a session of its own) are killed. Output goes to files, which orphans
    cannot hold open."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(Path(__file__).resolve()), *args]
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"ranks hung (killed after {timeout} s): {(logs / 'stderr').read_text()[-1500:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, (logs / "stdout").read_text(),
                                       (logs / "stderr").read_text())


def test_rank_with_an_unreadable_batch_stays_in_step(tmp_path):
    """accum_steps=2, 4 batches per rank: rank 1's batch 1 (the window's synchronising
    step) and rank 0's batch 2 are all unreadable. Both ranks skip those two micro-batches
    together, step twice in epoch 1, and end with the same weights."""
    root = make_folder(tmp_path / "data", {"train": 24, "val": 2})
    _spoil(root, rank=1, batch=1)
    _spoil(root, rank=0, batch=2)
    out = tmp_path / "run"
    proc = _run_ranks(["train", str(root), str(out), "train.accum_steps=2", "train.epochs=2"], tmp_path,
                      timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train.skipped"] == 16  # both ranks' 8 spoiled files
    assert load_state(out / "last.pt")["global_step"] == 4  # 2 windows per epoch, none lost


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1 alone sees a NaN loss: at the next check both ranks stop with the same line
    (before, rank 0 went on into the next collective and waited there)."""
    root = make_folder(tmp_path / "data", {"train": 24, "val": 2})
    out = tmp_path / "run"
    start = time.monotonic()
    proc = _run_ranks(["nan", str(root), str(out), "train.sync_every=1", "train.epochs=2"], tmp_path, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "TrainingError: loss became nan" in ln]
    assert len(lines) == 2 and all("step 2 on rank 1" in ln for ln in lines), proc.stderr[-2000:]
    assert time.monotonic() - start < 100
    assert not (out / "last.pt").exists()  # stopped in epoch 1, before anything was saved


@pytest.mark.parametrize("teacher", ["run", "self-ema"])
def test_distill_with_adapters_keeps_one_ddp_and_ranks_in_step(teacher, tiny_root, trained_run, tmp_path):
    """FitNets hints (1x1-conv + BN adapters) under 2 gloo ranks: student and adapters live in
    one trainable module wrapped once by DDP (frozen teachers outside it), so both ranks end
    with the same student AND adapter weights. DDP searches for unused parameters only when an
    adapter can sit out a step (the EMA self-teacher starts teaching halfway)."""
    out = tmp_path / "run"
    source = ([f"distill.teachers=[{trained_run}]"] if teacher == "run"
              else ["distill.self_distill=ema", "distill.self_start=0.5"])
    proc = _run_ranks(["distill", str(tiny_root), str(out), "train.epochs=2", "distill.losses=[fitnet:1,ce:1]",
                       *source], tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert any(k.startswith("losses.") for k in w0) and any(k.startswith("student.") for k in w0)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    for r in (0, 1):
        info = json.loads((out / f"rank{r}.json").read_text())
        assert info["ddp_instances"] == 1
        assert info["ddp_wraps"] == "Trainable" and not info["teacher_in_ddp"]
        assert info["find_unused_parameters"] == (teacher == "self-ema")


def _worker(kind: str, root: str, out: str, *overrides: str) -> None:
    """One rank of ``kdistill train`` or ``distill`` (resnet8, gloo) that saves its own
    trainable parameters (and, for distill, how DDP wraps the method)."""
    from torch.nn.parallel import DistributedDataParallel

    from kdistill.config import Config, build_config
    from kdistill.engine import distill as distill_mod
    from kdistill import distributed as dist
    from kdistill.engine import run as run_mod
    from kdistill.methods.supervised import Supervised

    schema = distill_mod.DistillConfig if kind == "distill" else Config
    cfg = build_config(schema, overrides=[
        f"data.root={root}", "model.name=resnet8", f"train.out={out}", f"train.batch_size={BATCH}",
        f"train.seed={SEED}", "data.workers=0", "data.in_memory=no", "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.25,0.25,0.25]", "train.progress=false", "train.device=cpu", "train.amp=false",
        "train.threads=1", *overrides])
    ctx = run_mod.prepare(cfg)
    try:
        if kind == "distill":
            method, crop = distill_mod.build_method(ctx, cfg.distill, distill_mod.build_teacher(ctx, cfg.distill))
            run_mod.fit(ctx, method, crop_size=crop)
            ddps = [m for m in method.modules() if isinstance(m, DistributedDataParallel)]
            wrapped = {id(p) for d in ddps for p in d.parameters()}
            info = {"ddp_instances": len(ddps), "ddp_wraps": type(ddps[0].module).__name__,
                    "teacher_in_ddp": any(id(p) in wrapped for p in method.teacher.parameters()),
                    "find_unused_parameters": ddps[0].find_unused_parameters}
            (Path(out) / f"rank{dist.rank()}.json").write_text(json.dumps(info))
            params = dict(method.trainable().named_parameters())
        elif kind == "nan":  # rank 1's loss turns NaN at its second step
            class NanOnRank1(Supervised):
                steps = 0

                def step(self, modules, batch):
                    out = super().step(modules, batch)
                    self.steps += 1
                    if dist.rank() == 1 and self.steps == 2:
                        out["loss"] = out["loss"] * float("nan")
                    return out

            run_mod.fit(ctx, NanOnRank1(ctx.student, ctx.student_prep()))
            return
        else:
            method = Supervised(ctx.student, ctx.student_prep())
            run_mod.fit(ctx, method)
            params = dict(method.plain_student.named_parameters())
        torch.save({n: p.detach().clone() for n, p in params.items()}, Path(out) / f"rank{dist.rank()}.pt")
    finally:
        dist.cleanup()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
