"""The same `kdistill train` under torchrun: 2 CPU processes with gloo."""
import json
import os
import subprocess
import sys

from kdistill.models.checkpoint import read_meta

from conftest import ROOT


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
