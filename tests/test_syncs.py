"""The training loop asks the device for nothing per step: host syncs (``.item()``,
``bool(tensor)``, ``.tolist()``, ...) happen every ``train.sync_every`` steps and once per
epoch, so on CUDA the host can run ahead of the GPU. Counted on the CPU, where the same
calls are made."""
import os
import sys

import pytest
import torch

from kdistill.config import build_config
from kdistill.engine import run as run_mod
from kdistill.engine.distill import DistillConfig, build_method, build_teacher

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
# code that makes batches on the host (in DataLoader workers when data.workers > 0) asks
# CPU tensors, not the device: not counted
LOADING = (f"{os.sep}torchvision{os.sep}", f"{os.sep}torch{os.sep}utils{os.sep}data{os.sep}",
           f"{os.sep}kdistill{os.sep}data{os.sep}")


def _count_syncs(monkeypatch, tiny_root, trained_run, out, steps: int, sync_every: int, *extra) -> int:
    cfg = build_config(DistillConfig, overrides=[
        f"data.root={tiny_root}", "model.name=resnet8", "train.epochs=1", "train.batch_size=4",
        f"train.max_steps_per_epoch={steps}", f"train.sync_every={sync_every}", f"train.out={out}",
        "data.workers=0", "train.progress=false", "distill.agreement=false",
        f"distill.teachers=[{trained_run}]", "distill.teacher_runtime=eager", *extra])
    ctx = run_mod.prepare(cfg)
    method, crop = build_method(ctx, cfg.distill, build_teacher(ctx, cfg.distill))
    calls = {"n": 0}
    for name in SYNCS:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            caller = sys._getframe(1).f_code.co_filename
            if not any(part in caller for part in LOADING):
                calls["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        run_mod.fit(ctx, method, crop_size=crop)
    finally:
        monkeypatch.undo()
    return calls["n"]


@pytest.mark.parametrize("extra", [[], ["distill.losses=[kd:0.5,ce:0.5]", "train.ema_decay=0.9",
                                        "optim.clip_grad=1.0"]], ids=["kd", "kd+ce+ema+clip"])
def test_no_host_sync_per_step(extra, monkeypatch, tiny_root, trained_run, tmp_path):
    short = _count_syncs(monkeypatch, tiny_root, trained_run, tmp_path / "a", 4, 1000, *extra)
    long = _count_syncs(monkeypatch, tiny_root, trained_run, tmp_path / "b", 12, 1000, *extra)
    assert long == short, f"{(long - short) / 8:.1f} host syncs per training step"


def test_syncs_every_n_steps(monkeypatch, tiny_root, trained_run, tmp_path):
    """With sync_every=2, 12 steps sync 4 more times than 4 steps do (8 steps / 2 = 4 checks,
    each one bool of the bad-step flag and one .item() for the progress bar)."""
    short = _count_syncs(monkeypatch, tiny_root, trained_run, tmp_path / "a", 4, 2)
    long = _count_syncs(monkeypatch, tiny_root, trained_run, tmp_path / "b", 12, 2)
    assert long - short == 4 * 2
