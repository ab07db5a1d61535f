"""Frozen teachers compiled for inference (distill.teacher_runtime): ONNX Runtime on the CPU,
checked against eager at start, eager when the export fails or disagrees."""
import json

import pytest
import torch
from torch import nn

from kdistill.cli import main
from kdistill.data.datasets import eval_dataset, first_images
from kdistill.data.sources import open_split
from kdistill.methods import compiled
from kdistill.methods.teachers import FrozenTeachers, Teacher, load_teachers
from kdistill.models import create_model

from conftest import TRAIN_ARGS

CPU = torch.device("cpu")


def _teacher_and_images(tiny_root, trained_run):
    src = open_split(str(tiny_root / "val"), "val")
    teacher = load_teachers([str(trained_run)], src.classes, CPU)
    return teacher, first_images(eval_dataset(src, teacher.preprocessing), 16)


def test_onnx_teacher_reproduces_eager(tiny_root, trained_run, capsys):
    teacher, images = _teacher_and_images(tiny_root, trained_run)
    eager = teacher.teachers[0]
    compiled.compile_teachers(teacher, "onnx", CPU, lambda: images)
    t = teacher.teachers[0]
    assert isinstance(t, compiled.CompiledTeacher) and t.runtime == "onnx"
    assert "onnx runtime (max |dprob|" in capsys.readouterr().err
    x = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)  # another size: resized first
    torch.testing.assert_close(t(x).softmax(-1), eager(x).softmax(-1), atol=1e-4, rtol=0)
    assert not t(x).requires_grad and teacher.logits(x).shape == (5, 3)


def test_auto_rule():
    assert compiled.resolve_runtime("auto", CPU) == "onnx"  # fp32; onnxruntime is a core dependency
    assert compiled.resolve_runtime("auto", CPU, torch.bfloat16) == "eager"  # native bf16 beats it
    assert compiled.resolve_runtime("auto", torch.device("cuda")) == "compile"
    assert compiled.resolve_runtime("eager", CPU) == "eager"


class _Frozen(nn.Module):
    """Logits scaled by the batch's largest pixel: tracing freezes that scale to the export
    example's, so the graph silently computes something else on other images."""

    def __init__(self) -> None:
        super().__init__()
        self.net = create_model("resnet8", 3)

    def forward(self, x):
        return self.net(x) * 10 * float(x.abs().max())


class _Unexportable(nn.Module):
    """An op without an ONNX symbolic (aten::cummax at opset 17)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = create_model("resnet8", 3)

    def forward(self, x):
        return self.net(torch.cummax(x, 3)[0])


@pytest.mark.parametrize("model, says", [(_Frozen, "disagrees with eager"),
                                         (_Unexportable, "'aten::cummax'")])
def test_a_teacher_the_runtime_gets_wrong_stays_eager(model, says, capsys):
    from kdistill.data.transforms import Preprocessing

    eager = Teacher(model(), Preprocessing(32, [0.5] * 3, [0.25] * 3), "odd")
    source = FrozenTeachers([eager])
    images = torch.randint(64, 192, (8, 3, 32, 32), dtype=torch.uint8)  # |normalised| <= 1, not 2
    compiled.compile_teachers(source, "onnx", CPU, lambda: images)
    assert source.teachers[0] is eager
    err = capsys.readouterr()
    lines = [line for line in err.err.splitlines() if "teacher odd" in line]
    assert len(lines) == 1 and says in lines[0] and "running eager" in lines[0]
    assert "Torch IR graph" not in err.out + err.err  # the exporter's dump stays out of the log


def test_captured_features_keep_the_teacher_eager(tiny_root, trained_run, tmp_path, capsys):
    out = tmp_path / "at"
    assert main(["distill", "--data", str(tiny_root), "--teacher", str(trained_run), "--model", "resnet8",
                 "--loss", "at", "--loss", "ce", "--epochs", "1", "--out", str(out), "--teacher-runtime", "onnx",
                 *TRAIN_ARGS]) == 0
    assert "the teacher stays eager instead of onnx" in capsys.readouterr().err


def test_onnx_and_eager_teachers_train_the_same(tiny_root, trained_run, tmp_path):
    """fp32: the same seed gives the same losses (within 1e-3) with either runtime."""
    rows = {}
    for runtime in ("eager", "onnx"):
        out = tmp_path / runtime
        assert main(["distill", "--data", str(tiny_root), "--teacher", str(trained_run), "--model", "resnet8",
                     "--epochs", "2", "--out", str(out), "--teacher-runtime", runtime, "--no-amp",
                     *TRAIN_ARGS]) == 0
        rows[runtime] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows["eager"], rows["onnx"]):
        assert abs(a["train.kd"] - b["train.kd"]) < 1e-3 and abs(a["train.loss"] - b["train.loss"]) < 1e-3
        assert a["val.agreement"] == b["val.agreement"]


def test_unknown_runtime_is_one_line(tiny_root, trained_run, tmp_path):
    from conftest import run_cli

    proc = run_cli("distill", "--data", str(tiny_root), "--teacher", str(trained_run), "--model", "resnet8",
                   "--out", str(tmp_path / "x"), "-o", "distill.teacher_runtime=tensorrt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "teacher_runtime" in proc.stderr


def test_gpu_check_runs_on_cpu_with_tiny_models(tmp_path):
    """bench/gpu_check.py is ready for a GPU: here it runs its CPU parts end to end (the
    nccl DDP arm is reported skipped), appends each arm's row to the JSON file as the arm
    ends, prints the table, and its watchdog kills an arm that hangs (one is made to)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--out", str(out),
                           "--hang", "fp16/KD fixed"], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:] + proc.stdout[-3000:]  # 1: the arm made to hang timed out
    doc = json.loads(out.read_text())
    rows = {(r["precision"], r["arm"]): r for r in doc["rows"]}
    arms = ["student", "plain", "KD eager", "KD compiled", "KD fixed"]
    assert list(rows) == [(p, a) for p in ("bf16", "fp16") for a in arms] + [("bf16", "student DDP")], \
        (doc["rows"], (out.with_suffix(".log")).read_text()[-3000:])
    assert rows["fp16", "KD fixed"]["status"].startswith("timeout: killed after")
    assert rows["bf16", "student DDP"]["status"] == "skipped: CUDA only (nccl DDP)"
    ran = [r for k, r in rows.items() if k not in {("fp16", "KD fixed"), ("bf16", "student DDP")}]
    assert all(r["status"] == "ok" and r["img_s"] > 0 and r["precision_ran"] == r["precision"] for r in ran), ran
    assert all(r["loader_img_s"] > 0 for r in ran if r["arm"] != "plain")
    assert rows["fp16", "student"]["scaler"] and not rows["bf16", "student"]["scaler"]  # fp16 runs a GradScaler
    assert rows["bf16", "KD fixed"]["runtime"] == "table"
    for p in ("bf16", "fp16"):
        assert rows[p, "KD eager"]["runtime"] == "eager" and rows[p, "KD eager"]["tfwd_eager"] > 0
        comp = rows[p, "KD compiled"]  # Dynamo (aot_eager on the CPU): one graph per teacher
        assert comp["runtime"] == "compile" and comp["graphs"] == [1] and comp["tfwd_compiled"] > 0
    lines = proc.stdout.splitlines()
    final = lines[lines.index(next(x for x in lines if x.startswith("== gpu_check:"))) + 1:]
    assert final[0].split()[:4] == ["pair", "prec", "arm", "img/s"]
    assert len([x for x in final if x.startswith("resnet8->resnet8/16px")]) == len(rows)
    assert sum(x.startswith("target: kdistill student / plain PyTorch loop") for x in final) == 2
