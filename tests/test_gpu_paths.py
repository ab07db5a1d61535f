"""The CUDA paths of the loop, checked on the CPU: out-of-memory in one line, fused
optimizers, the EMA held on a step fp16's scaler skips, channels_last=auto, teachers in
bf16, and one number per checkpoint (validation evaluates as `kdistill eval` does)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import TRAIN_ARGS

from kdistill.cli import main
from kdistill.config import Config, build_config
from kdistill.engine import precision
from kdistill.models import create_model

CPU = torch.device("cpu")


def _train(root, out, *extra):
    return main(["train", "--data", str(root), "--model", "resnet8", "--out", str(out), *TRAIN_ARGS,
                 "-o", "train.max_steps_per_epoch=2", *extra])


def test_out_of_gpu_memory_is_one_line_and_the_run_resumes_in_smaller_batches(tiny_root, tmp_path, monkeypatch, capsys):
    from kdistill.methods.supervised import Supervised

    out = tmp_path / "run"
    assert _train(tiny_root, out, "--epochs", "2") == 0
    state = torch.load(out / "last.pt", weights_only=False)
    state["epoch"] = 1  # as if the second epoch were still to come
    torch.save(state, out / "last.pt")
    real = Supervised.step

    def oom(self, modules, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Supervised, "step", oom)
    capsys.readouterr()
    assert _train(tiny_root, out, "--epochs", "2", "--resume") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kdistill: error: out of GPU memory at --batch-size 16 per process (train.accum_steps=1)")
    assert "--resume --batch-size 8 -o train.accum_steps=2" in err and "Traceback" not in err
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 1  # intact
    monkeypatch.setattr(Supervised, "step", real)
    # the way out it names: the same effective batch in smaller micro-batches
    assert _train(tiny_root, out, "--epochs", "2", "--resume", "--batch-size", "8", "-o", "train.accum_steps=2") == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("device, fused", [("cuda", True), ("cpu", False)])
def test_fused_optimizers_on_cuda(device, fused, monkeypatch):
    import timm.optim

    from kdistill.engine.optim import build_optimizer

    seen = {}
    monkeypatch.setattr(timm.optim, "create_optimizer_v2", lambda *a, **k: seen.update(k) or torch.optim.SGD(
        nn.Linear(2, 2).parameters(), lr=0.1))
    for name in ("sgd", "adamw"):
        seen.clear()
        build_optimizer(build_config(Config, overrides=[f"optim.name={name}"]), nn.Linear(2, 2), torch.device(device), 4)
        assert seen.get("fused", False) is fused


def _bare_trainer(ema_decay: float = 0.5):
    """A Trainer with just what _optimizer_step uses: one linear student, SGD, fp16 scaler."""
    from timm.utils import ModelEmaV3

    from kdistill.engine.trainer import Trainer

    t = Trainer.__new__(Trainer)
    student = nn.Linear(3, 2)
    t.cfg = build_config(Config, overrides=["optim.clip_grad=1.0"])
    t.method = SimpleNamespace(plain_student=student, after_step=lambda: None)
    t.optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    t.scheduler, t.global_step = None, 0
    t.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    t.ema = ModelEmaV3(student, decay=ema_decay)
    return t, student


def test_the_ema_skips_the_step_fp16s_scaler_skips():
    t, student = _bare_trainer()
    params = list(student.parameters())
    for bad in (False, True, False):
        ema_before = [p.detach().clone() for p in t.ema.module.parameters()]
        loss = student(torch.ones(4, 3)).sum()
        t.scaler.scale(loss).backward()
        if bad:
            params[0].grad.fill_(float("inf"))
        weights = [p.detach().clone() for p in params]
        t._optimizer_step(params, 4, 4)
        t.optimizer.zero_grad()
        moved = any(not torch.equal(a, b) for a, b in zip(ema_before, t.ema.module.parameters()))
        assert moved is not bad  # a skipped step leaves the weights and their EMA as they were
        assert all(torch.equal(a, b) for a, b in zip(weights, params)) is bad


def test_channels_last_auto(monkeypatch):
    from kdistill.engine.run import use_channels_last

    cfg = Config()
    conv, mlp = create_model("resnet8", 3), nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: True)
    assert use_channels_last("auto", conv, CPU, cfg) and not use_channels_last("auto", mlp, CPU, cfg)
    assert use_channels_last("auto", conv, torch.device("cuda"), cfg)
    assert not use_channels_last("auto", conv, CPU, build_config(Config, overrides=["train.amp=false"]))
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: False)  # fp32 CPU kernels gain nothing
    assert not use_channels_last("auto", conv, CPU, cfg)
    assert use_channels_last(True, conv, CPU, cfg) and not use_channels_last(False, conv, torch.device("cuda"), cfg)
    assert build_config(Config).model.channels_last == "auto"


def test_a_teacher_in_bf16_runs_the_same_in_any_autocast_state():
    from kdistill.data.transforms import Preprocessing
    from kdistill.methods.teachers import Teacher

    torch.manual_seed(0)
    pp = Preprocessing(32, [0.5] * 3, [0.25] * 3, 1.0)
    fp32 = Teacher(create_model("resnet8", 3), pp, "t")
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    ref = fp32(x).softmax(-1)
    lean = Teacher(create_model("resnet8", 3), pp, "t")
    lean.load_state_dict(fp32.state_dict())
    lean.run_in(torch.bfloat16)
    assert next(lean.model.parameters()).dtype is torch.bfloat16 and lean.prep.channels_last
    for cast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            out = lean(x)
        assert out.dtype is torch.float32 and not out.is_inference() and not out.requires_grad
        torch.testing.assert_close(out.softmax(-1), ref, atol=3e-2, rtol=0)


def test_validation_and_eval_give_one_number_per_checkpoint(tiny_root, tmp_path, monkeypatch, capsys):
    """Trained under bf16 autocast, validated in fp32: the run's last val numbers are those
    `kdistill eval` prints for the same weights (the demo's table said 0.8414 beside the
    report's 0.8412)."""
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: True)
    out = tmp_path / "run"
    assert _train(tiny_root, out, "--epochs", "1") == 0
    final = json.loads((out / "summary.json").read_text())["final"]
    assert json.loads((out / "summary.json").read_text())["precision"] == "bf16"
    capsys.readouterr()
    assert main(["eval", str(out / "last.safetensors"), "--data", str(tiny_root), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["loss"] == pytest.approx(final["loss"], abs=1e-6)
    assert (evaluated["top1"], evaluated["mpa"], evaluated["n"]) == (final["top1"], final["mpa"], final["n"])
