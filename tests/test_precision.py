"""train.amp = auto | true | false: autocast only where the hardware makes it fast."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdistill.cli import main
from kdistill.config import Config, build_config
from kdistill.engine import precision
from kdistill.errors import UserError

from conftest import TRAIN_ARGS

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def native_bf16(monkeypatch):
    """Stub the CPU probe: call with True (AVX512-BF16 / AMX) or False (e.g. AVX2 only)."""
    def stub(native: bool, capability: str = "AVX2") -> None:
        monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
        monkeypatch.setattr(precision, "cpu_capability", lambda: capability)
    return stub


def test_auto_is_fp32_on_a_cpu_without_native_bf16(native_bf16):
    native_bf16(False, "AVX2")
    p = precision.resolve(CPU, "auto")
    assert p.dtype is None and p.name == "fp32" and "AVX2" in p.reason and "no native bf16" in p.reason
    assert p.warning is None and not p.needs_scaler
    assert p.record(CPU) == {"precision": "fp32", "cpu_capability": "AVX2"}


def test_auto_is_bf16_on_a_cpu_with_native_bf16(native_bf16):
    native_bf16(True, "AVX512")
    p = precision.resolve(CPU, "auto")
    assert p.dtype is torch.bfloat16 and p.warning is None
    assert p.record(CPU) == {"precision": "bf16", "cpu_capability": "AVX512"}
    with p.autocast(CPU)():
        assert torch.get_autocast_dtype("cpu") is torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_true_forces_bf16_with_one_warning_where_it_is_emulated(native_bf16):
    native_bf16(False)
    p = precision.resolve(CPU, True)
    assert p.dtype is torch.bfloat16 and "emulated" in p.warning and "\n" not in p.warning
    native_bf16(True)
    assert precision.resolve(CPU, True).warning is None


def test_false_is_fp32_everywhere(native_bf16):
    native_bf16(True)
    assert precision.resolve(CPU, False).dtype is None
    assert precision.resolve(CUDA, False).dtype is None


@pytest.mark.parametrize("capability, dtype", [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                               ((7, 5), torch.float16), ((7, 0), torch.float16)])
def test_auto_on_cuda_is_bf16_from_capability_8_else_fp16_with_a_scaler(monkeypatch, capability, dtype):
    """T4 (7.5) and V100 (7.0) only emulate bf16, though torch.cuda.is_bf16_supported() says yes."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there
    p = precision.resolve(CUDA, "auto")
    assert p.dtype is dtype and p.needs_scaler is (dtype is torch.float16)
    assert f"{capability[0]}.{capability[1]}" in p.reason
    assert "cpu_capability" not in p.record(CUDA)
    assert precision.resolve(CUDA, "auto", "fp16").dtype is torch.float16


def test_the_real_probe_answers(monkeypatch):
    assert isinstance(precision.cpu_native_bf16(), bool) and precision.cpu_capability()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below bf16: emulated
    assert precision.cpu_native_bf16() is False


def test_config_default_old_and_new_values():
    assert Config().train.amp == "auto"
    assert build_config(Config, overrides=["train.amp=true"]).train.amp is True  # old configs
    assert build_config(Config, overrides=["train.amp=false"]).train.amp is False
    assert build_config(Config, overrides=["train.amp=auto"]).train.amp == "auto"
    with pytest.raises(UserError, match="train.amp"):
        build_config(Config, overrides=["train.amp=maybe"])


@pytest.mark.parametrize("flag, value", [([], "auto"), (["--amp"], True), (["--no-amp"], False)])
def test_flags(flag, value):
    from kdistill.cli import build_parser, train_config

    args = build_parser().parse_args(["train", "--data", "x", *flag])
    assert train_config(args).train.amp == value


def test_run_records_the_precision_it_used_and_keeps_auto(tiny_root, tmp_path, native_bf16, capsys):
    native_bf16(False, "AVX2")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_root), "--model", "resnet8", "--epochs", "2",
                 "--out", str(out), "-o", "optim.sched=step", *TRAIN_ARGS]) == 0  # step: may be extended
    assert "precision: fp32 (CPU AVX2 has no native bf16" in capsys.readouterr().err
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["amp"] == "auto"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["precision"], r["cpu_capability"]) for r in rows] == [("fp32", "AVX2")] * 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["cpu_capability"] == "AVX2"
    from kdistill.models.checkpoint import read_meta

    assert read_meta(out / "best.safetensors")["precision"] == "fp32"
    # resumed on a machine with native bf16: 'auto' chooses again there
    native_bf16(True, "AVX512")
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", *TRAIN_ARGS]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["precision"] for r in rows] == ["fp32", "fp32", "bf16"]


def test_recipes_and_demo_use_auto():
    from kdistill.config import RECIPES
    from kdistill.demo import FULL, arms, demo_config

    for path in RECIPES.rglob("*.yaml"):
        assert (yaml.safe_load(path.read_text()).get("train") or {}).get("amp", "auto") == "auto", path
    for arm in arms(FULL, Path("/tmp/x")):
        assert demo_config(Path("/tmp/x"), "fashion-mnist", arm, {**FULL, "progress": False}, []).train.amp == "auto"


def test_a_run_saved_without_a_scaler_resumes_under_fp16(tiny_root, tmp_path, native_bf16, monkeypatch):
    """last.pt from an fp32/bf16 run holds an empty GradScaler state; a run resumed where
    'auto' picks fp16 (say on a T4) must still resume."""
    native_bf16(False, "AVX2")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_root), "--model", "resnet8", "--epochs", "2",
                 "--out", str(out), "-o", "train.max_steps_per_epoch=1", *TRAIN_ARGS]) == 0
    (out / "summary.json").unlink()
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["epoch"] == 2 and not state["scaler"]
    state["epoch"] = 1  # as if killed after epoch 1
    torch.save(state, out / "last.pt")
    monkeypatch.setattr(precision, "resolve", lambda *a, **k: precision.Precision(torch.float16, "stub: fp16"))
    assert main(["train", "--out", str(out), "--resume", *TRAIN_ARGS]) == 0
    assert json.loads((out / "summary.json").read_text())["precision"] == "fp16"
