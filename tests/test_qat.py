"""Quantization-aware training (``--qat``, models/quant.py): the rewrite, its QDQ ONNX export
run by ONNX Runtime's int8 kernels, training and checkpoints, bad input."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TRAIN_ARGS, run_cli
from kdistill.cli import main
from kdistill.data.transforms import Preprocessing
from kdistill.errors import UserError
from kdistill.models import create_model
from kdistill.models.checkpoint import load_model, read_meta, resolve_checkpoint
from kdistill.models.onnx import Normalized
from kdistill.models.quant import ActQuant, QATModel, QuantConv2d, QuantConvBn2d, prepare_qat, qat_onnx_bytes

pytest.importorskip("onnxruntime")

PP = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 1.0)
FLOAT_KERNELS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}


def calibrated(arch: str, seed: int = 0) -> tuple[nn.Module, QATModel]:
    """A float ``arch`` with non-trivial BatchNorm statistics, and its QAT rewrite after a few
    observing batches."""
    torch.manual_seed(seed)
    model = create_model(arch, 10).train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 32, 32))
    q = prepare_qat(model.eval())
    q.train()
    with torch.no_grad():
        for _ in range(4):
            Normalized(q, PP)(torch.rand(16, 3, 32, 32))
    return model.eval(), q.eval()


def optimized_ops(raw: bytes, tmp_path) -> Counter:
    """Op types of ONNX Runtime's optimized graph (what actually runs)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(raw, opts, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


@pytest.mark.parametrize("arch", ["resnet8", "mobilenetv2"])
def test_rewrite_quantizes_every_conv_and_linear_and_export_runs_int8(arch, tmp_path):
    from kdistill.models.onnx import ort_session

    model, q = calibrated(arch)
    assert q.float_leftovers() == []
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum(isinstance(m, QuantConv2d) for m in q.modules()) == n_conv
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, QuantConvBn2d) for m in q.modules()) == n_bn  # BatchNorm kept for training
    kinds = Counter(a.kind for a in q.quantizers())
    assert kinds["relu"] > 0  # the ReLUs after convs/adds became ranges [0, max]
    assert all(int(a.zero_point) == 0 for a in q.quantizers() if a.kind == "relu")

    x = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        ref, sim = Normalized(model, PP)(x), Normalized(q, PP)(x)
    assert (ref.argmax(1) == sim.argmax(1)).float().mean() >= 0.9  # 8 bits stay close to float
    with torch.no_grad():  # quantization off, BatchNorm folded: the float model it came from
        torch.testing.assert_close(Normalized(prepare_qat(model).float_model(), PP)(x), ref, rtol=1e-4, atol=1e-4)

    raw = qat_onnx_bytes(Normalized(q, PP).eval(), 32, arch)
    ops = optimized_ops(raw, tmp_path)
    assert not FLOAT_KERNELS & set(ops) and "BatchNormalization" not in ops, ops
    assert ops["QLinearConv"] == n_conv and ops["QGemm"] == 1
    assert ops["QLinearAdd"] >= 1  # residual adds fused too (0-d scales)
    out = ort_session(raw).run(None, {"input": x.numpy()})[0]
    assert (out.argmax(1) == sim.numpy().argmax(1)).mean() >= 0.99
    step = float(q.quantizers()[-1].scale)  # the logits' quantization step
    assert np.abs(out - sim.numpy()).max() <= 2.01 * step  # the same arithmetic, up to requantization rounding


def test_export_holds_int8_weights_and_int32_biases(tmp_path):
    import onnx
    from onnx import TensorProto

    _, q = calibrated("resnet8")
    proto = onnx.load_from_string(qat_onnx_bytes(Normalized(q, PP).eval(), 32, "resnet8"))
    types = Counter(t.data_type for t in proto.graph.initializer)
    n_params = sum(p.numel() for p in q.parameters())
    int8 = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == TensorProto.INT8)
    assert int8 >= 0.95 * n_params and types[TensorProto.INT32] >= 9
    floats = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT)
    assert floats < 0.05 * n_params  # scales only: the float weights are gone


def test_qat_continues_a_converged_float_model_at_its_learning_rate():
    """QAT from a trained float model at the float run's learning rate keeps learning. With
    BatchNorm folded and frozen (the first version of this flow) the same steps diverged:
    loss 0.1 -> 2.3, accuracy 0.12."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    templates = torch.randn(10, 3, 32, 32, generator=gen)

    def batch(n=64):
        y = torch.randint(0, 10, (n,), generator=gen)
        return templates[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=gen), y

    def train(model, steps, lr, wd=0.0):
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        losses = []
        for _ in range(steps):
            x, y = batch()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    model = create_model("resnet8", 10).train()
    train(model, 30, 0.05)
    q = prepare_qat(model.eval()).train()
    losses = train(q, 30, 0.05, wd=5e-4)
    assert max(losses) < 1.5 and sum(losses[-5:]) / 5 < 0.2, losses
    x, y = batch(512)
    with torch.no_grad():
        assert (q.eval()(x).argmax(1) == y).float().mean() >= 0.95


def test_quantizer_observes_while_training_only():
    a = ActQuant("any")
    a.train()
    a(torch.tensor([-1.0, 3.0]))
    assert float(a.min_val) == -1.0 and float(a.max_val) == 3.0
    a(torch.tensor([-2.0, 5.0]))
    assert float(a.max_val) == pytest.approx(3.02)  # moving average, momentum 0.01
    scale = float(a.scale)
    a.eval()
    y = a(torch.tensor([-10.0, 0.1, 100.0]))
    assert float(a.scale) == scale
    assert float(y[0]) == pytest.approx(float(a.min_val), abs=scale) and float(y[2]) <= float(a.max_val) + scale
    r6 = ActQuant("relu6")
    r6.train()
    r6(torch.tensor([-3.0, 9.0]))
    assert int(r6.zero_point) == 0 and float(r6.scale) * 255 == pytest.approx(6.0)


def test_layers_without_int8_kernel_are_named():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.up = nn.ConvTranspose2d(4, 4, 2)

        def forward(self, x):
            return self.up(self.conv(x)).mean((2, 3))

    with pytest.raises(UserError, match="layer 'up' is a ConvTranspose2d"):
        prepare_qat(Up(), "up-net")

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    with pytest.raises(UserError, match="torch.fx cannot trace it"):
        prepare_qat(Branchy(), "branchy")


@pytest.fixture(scope="module")
def qat_run(tiny_root, trained_run, tmp_path_factory):
    """1 epoch of QAD (kd from ``trained_run``) starting from the float ``trained_run``."""
    out = tmp_path_factory.mktemp("qat") / "qad"
    assert main(["distill", "--data", str(tiny_root), "--model", "resnet8", "--teacher", str(trained_run),
                 "--loss", "kd:0.9", "--loss", "ce:0.1", "--epochs", "1", "--out", str(out), "--qat",
                 "--lr", "0.01", "-o", f"model.checkpoint={trained_run}", *TRAIN_ARGS]) == 0
    return out


def test_qat_run_saves_a_checkpoint_that_reloads_as_the_same_model(qat_run, tiny_root):
    meta = read_meta(resolve_checkpoint(str(qat_run)))
    assert meta["qat"]["weights"].startswith("int8") and meta["precision"] == "fp32"
    model, _ = load_model(str(qat_run))
    assert isinstance(model, QATModel) and not model.training
    scales = [float(a.scale) for a in model.quantizers()]
    assert len(set(scales)) > 1  # learned ranges, not the initial scale of 1
    # the reloaded model scores what the run recorded for its val split
    proc = run_cli("eval", str(qat_run), "--data", str(tiny_root), "--json", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["top1"] == pytest.approx(meta["metrics"]["top1"], abs=1e-6)


def test_qat_resume_and_float_checkpoint_rules(qat_run, tiny_root, tmp_path):
    # a QAT checkpoint cannot continue as a float model by accident
    r = run_cli("train", "--data", str(tiny_root), "--model", "resnet8", "--epochs", "1", "--out",
                str(tmp_path / "f"), "-o", f"model.checkpoint={qat_run}", *TRAIN_ARGS)
    assert r.returncode == 2 and "continue it with --qat" in r.stderr and "Traceback" not in r.stderr
    # with --qat it does, and a QAT checkpoint is a valid model.checkpoint for more QAT
    assert main(["train", "--data", str(tiny_root), "--model", "resnet8", "--epochs", "1", "--qat", "--out",
                 str(tmp_path / "q"), "-o", f"model.checkpoint={qat_run}", "--lr", "0.001", *TRAIN_ARGS]) == 0
    assert read_meta(resolve_checkpoint(str(tmp_path / "q")))["qat"]


def test_qat_bad_input(tiny_root, trained_run, tmp_path):
    base = ["--data", str(tiny_root), "--model", "resnet8", "--epochs", "1", "--qat", *TRAIN_ARGS]
    r = run_cli("train", *base, "--amp", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "--qat trains in fp32" in r.stderr
    r = run_cli("distill", *base, "--teacher", str(trained_run), "--loss", "at:1", "--loss", "kd:1",
                "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "logit losses" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_int8_export_of_a_qat_run_uses_its_ranges_without_calibrating(qat_run, tiny_root, tmp_path, monkeypatch):
    import onnx

    import kdistill.deploy.export as export_mod

    def no_calibration(*a, **k):
        raise AssertionError("a QAT checkpoint is not calibrated")

    monkeypatch.setattr(export_mod, "calibration_inputs", no_calibration)
    out = tmp_path / "qad.int8.onnx"
    res = export_mod.export_checkpoint(str(qat_run), "onnx", str(out), data=str(tiny_root), int8=True,
                                       card=False)
    ag = res["agreement"]
    assert ag["min_agreement"] == 0.99 and ag["top1_agreement"] >= 0.99
    assert res["float_nodes"] == [] and res["kernels"]["QLinearConv"] == 9
    meta = json.loads(next(p.value for p in onnx.load(str(out)).metadata_props if p.key == "kdistill"))
    assert meta["precision"] == "int8" and meta["quantization"]["method"] == "qat"
    # the fp32 beside it is the same folded graph without quantization: it agrees with the int8 model
    # roughly, and exactly with the float copy in torch (the fp32 parity the export printed)
    assert res["parity"]["max_abs_diff"] <= 1e-4


def test_a_qat_checkpoint_of_the_folded_batchnorm_flow_is_refused_by_name(qat_run, tiny_root, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from kdistill.models.checkpoint import META_KEY

    src = resolve_checkpoint(str(qat_run))
    with safe_open(str(src), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = json.loads(fh.metadata()[META_KEY])
    meta["qat"]["batchnorm"] = "folded"  # what kdistill wrote before BatchNorm trained in QAT
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={META_KEY: json.dumps(meta)})
    r = run_cli("eval", str(old), "--data", str(tiny_root), "--workers", "0")
    assert r.returncode == 2 and "BatchNorm 'folded'" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(UserError, match="train it again with --qat"):
        create_model("resnet8", 10, checkpoint=str(old), qat=True)
