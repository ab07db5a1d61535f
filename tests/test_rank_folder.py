"""Under torchrun (gloo on CPU): one run folder for all ranks without --out, and the DDP
path at world size 1 with KDISTILL_FORCE_DDP=1."""
import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import torchrun

# Runs `kdistill ARGS` with rank R's clock R seconds late (ranks that start either side of
# a second, or nodes whose clocks differ) and records whether the method was DDP-wrapped.
PROBE = textwrap.dedent("""
    import datetime, os, sys, types
    from pathlib import Path

    import kdistill.engine.run as run
    from kdistill.cli import main
    from kdistill.methods.base import Method

    rank = int(os.environ["RANK"])

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2030, 1, 2, 3, 4, 5 + rank)

    run._dt = types.SimpleNamespace(datetime=Clock)
    wrap = Method.wrap_distributed

    def recorded(self, device_ids):
        Path(f"wrapped-rank{rank}").write_text("ddp")
        return wrap(self, device_ids)

    Method.wrap_distributed = recorded
    raise SystemExit(main(sys.argv[1:]))
""")


def run_probe(cwd: Path, nproc: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=NPROC PROBE ARGS`` on CPU in ``cwd``."""
    (cwd / "probe.py").write_text(PROBE)
    return torchrun("probe.py", *args, nproc=nproc, cwd=cwd, env=env, timeout=240)

def _train(root) -> list[str]:
    return ["train", "--data", str(root), "--model", "resnet8", "--epochs", "1", "--batch-size", "8",
            "--workers", "0", "--no-progress", "--device", "cpu", "-o", "data.max_train_images=36"]


def test_ranks_without_out_share_rank0s_run_folder(tiny_root, tmp_path):
    proc = run_probe(tmp_path, 2, *_train(tiny_root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["resnet8-20300102-030405"]
    summary = json.loads((tmp_path / "runs" / "resnet8-20300102-030405" / "summary.json").read_text())
    assert summary["world_size"] == 2


@pytest.mark.parametrize("force", [True, False])
def test_force_ddp_at_world_size_one(force, tiny_root, tmp_path):
    """``torchrun --nproc_per_node=1`` takes the DDP path only with KDISTILL_FORCE_DDP=1."""
    proc = run_probe(tmp_path, 1, *_train(tiny_root), "--out", "run",
                     env={"KDISTILL_FORCE_DDP": "1" if force else "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "wrapped-rank0").is_file() == force
    assert ("KDISTILL_FORCE_DDP=1: process group (gloo) and DDP at world size 1" in proc.stderr) == force
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 1
