"""Quantization-aware training (``model.qat``): a student that trains in fp32 with the very
fake quantization its int8 ONNX export runs, and that export.

Why this flow and not torchao's PT2E or NNCF: see docs/ARCHITECTURE.md ("int8"). In short,
both give ONNX graphs in which ONNX Runtime keeps many Conv/Gemm nodes in float (PT2E's x86
quantizer leaves the outputs of convolutions that feed a residual add unquantized, NNCF
quantizes the inputs of ops, OpenVINO's way, and keeps BatchNorm), so "what trained" would
not be "what ships". Here the placement is ONNX Runtime's QDQ placement, decided once on the
traced graph, and the export is the same graph.

:func:`prepare_qat` traces the model with ``torch.fx`` and rewrites it:

* a convolution followed by BatchNorm becomes one :class:`QuantConvBn2d`, which keeps the
  BatchNorm training: its weight is fake-quantized as folded with the running statistics
  (what the export runs), its output rescaled and normalised with the batch statistics
  (the "simulated fold" of Jacob et al. 2018 and of PyTorch's ConvBn QAT modules). With the
  statistics folded and frozen instead, gradients are no longer normalised and training at
  the float run's learning rate diverges; in eval it computes the folded, quantized
  convolution, and the export folds it for good;
* every other Conv2d / Linear becomes :class:`QuantConv2d` / :class:`QuantLinear`: weights
  fake-quantized int8 symmetric per output channel (scale ``max|w| / 127``), the bias int32
  at the scale ``s_in * s_w`` (what ``QLinearConv`` adds);
* every tensor a Conv/Linear/Add reads, and every Conv/Add output, gets one
  :class:`ActQuant` (uint8 asymmetric per tensor, ranges from a moving average of batch
  min/max while training, frozen in eval). A ReLU / ReLU6 that is a Conv's or Add's only
  user is removed and its clamp becomes the quantizer's range (zero point 0, and at most
  6 for ReLU6), which is exactly what ONNX Runtime's fused int8 kernel computes;
* everything else (pooling, flatten, hard-swish, concat, ...) runs in float between a
  DequantizeLinear and a QuantizeLinear.

The checkpoint of such a model holds the float weights, BatchNorm and every quantizer's state
(``min_val``, ``max_val``, ``scale``, ``zero_point``); :func:`qat_onnx_bytes` exports them
as QDQ ONNX without recalibrating.
"""
from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import UserError
from ..utils import first_line

#: what a QAT checkpoint records under its ``qat`` metadata key
QAT_SPEC = {"flow": "fx fake-quant (ONNX Runtime QDQ placement)", "activations": "uint8 asymmetric per tensor",
            "weights": "int8 symmetric per output channel", "bias": "int32",
            "batchnorm": "trained with batch statistics, folded at export"}
QAT_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear
#: the int8 export of a QAT model must agree with the fake-quantized model on this fraction
#: of top-1s: both compute the same int8 arithmetic, only requantization rounding differs
QAT_MIN_AGREEMENT = 0.99
_EPS = 2.0 ** -24


# ------------------------------------------------------------------ quantizers


def act_qparams(lo: torch.Tensor, hi: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 asymmetric scale and zero point for the range [lo, hi] (0 always inside, as
    ONNX Runtime's quantizer makes it); ``relu``: [0, hi]; ``relu6``: [0, min(hi, 6)]."""
    lo = torch.zeros_like(lo) if kind != "any" else lo.clamp(max=0)
    hi = hi.clamp(min=0)
    if kind == "relu6":
        hi = hi.clamp(max=6.0)
    scale = ((hi - lo) / 255).clamp(min=_EPS)
    zp = torch.round(-lo / scale).clamp(0, 255).to(torch.int32)
    return scale.float().reshape(()), zp.reshape(())


class ActQuant(nn.Module):
    """uint8 per-tensor fake quantization (= ONNX QuantizeLinear + DequantizeLinear).

    While training it observes the moving average (``momentum``) of each batch's min/max, the
    first batch setting it; in eval its scale stays."""

    def __init__(self, kind: str = "any", momentum: float = 0.01) -> None:
        super().__init__()
        if kind not in ("any", "relu", "relu6"):
            raise ValueError(kind)
        self.kind, self.momentum, self.enabled = kind, momentum, True
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.int64))
        # 0-d: ONNX Runtime fuses an Add only between scalar scales (QLinearAdd)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    def extra_repr(self) -> str:
        return f"kind={self.kind}"

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        first = self.observed == 0
        m = self.momentum
        self.min_val.copy_(torch.where(first, lo, self.min_val + m * (lo - self.min_val)))
        self.max_val.copy_(torch.where(first, hi, self.max_val + m * (hi - self.max_val)))
        self.observed.add_(1)
        scale, zp = act_qparams(self.min_val, self.max_val, self.kind)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:  # float, but still the ReLU / ReLU6 this quantizer's range replaced
            return x if self.kind == "any" else x.clamp(0, 6.0 if self.kind == "relu6" else None)
        if self.training:
            self.observe(x)
        x = x if x.dtype == torch.float32 else x.float()  # (no Cast in the exported graph)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)


def weight_qparams(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel int8 symmetric scales: ``max|w| / 127``."""
    amax = w.detach().abs().amax(dim=tuple(range(1, w.dim())))
    return (amax / 127).clamp(min=_EPS).float()


def fake_weight(w: torch.Tensor) -> torch.Tensor:
    scale = weight_qparams(w)
    zp = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -128, 127)


def fake_bias(b: torch.Tensor | None, in_scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """The bias as ONNX Runtime's int8 kernels add it: int32 at ``s_in * s_w`` (gradient
    straight through)."""
    if b is None:
        return None
    s = (in_scale * weight_qparams(w)).detach()
    return b + (torch.round(b / s) * s - b).detach()


class QuantConv2d(nn.Conv2d):
    """A Conv2d whose weight and bias are fake-quantized as ``QLinearConv`` runs them; its
    input (already quantized by an :class:`ActQuant`) comes with that quantizer's scale.
    ``enabled = False``: plain float (:meth:`QATModel.float_model`)."""

    enabled = True

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w, b = _quantized_params(self, in_scale)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class QuantConvBn2d(QuantConv2d):
    """Conv2d + BatchNorm2d trained as one quantized convolution (see the module docstring).

    Training: ``y = bn(conv(x, fq(w * f)) / f + b)`` with ``f = gamma / sqrt(running_var +
    eps)``: the weight is quantized exactly as the folded export's, while ``bn`` normalises
    with the batch statistics (and updates its running ones). Eval: the folded convolution
    ``conv(x, fq(w * f), fq_int32(beta + (b - running_mean) * f))``, which is what
    :meth:`folded_conv` gives the export."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=conv.bias is not None)
        with torch.no_grad():
            self.weight.copy_(conv.weight.float())
            if conv.bias is not None:
                self.bias.copy_(conv.bias.float())
        self.bn = copy.deepcopy(bn).float()

    def _factor(self) -> torch.Tensor:
        bn = self.bn
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        return gamma / torch.sqrt(bn.running_var + bn.eps)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias with the BatchNorm's running statistics folded in."""
        bn, f = self.bn, self._factor()
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        b = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        return self.weight * f.reshape(-1, 1, 1, 1), beta + (b - bn.running_mean) * f

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        conv = lambda w, b: F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)  # noqa: E731
        if self.training:
            f = self._factor().reshape(-1, 1, 1, 1)
            w = self.weight * f
            y = conv(fake_weight(w) if self.enabled else w, None) / f.reshape(1, -1, 1, 1)
            return self.bn(y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1))
        w, b = self.folded()
        return conv(w, b) if not self.enabled else conv(fake_weight(w), fake_bias(b, in_scale, w))

    def folded_conv(self) -> QuantConv2d:
        """The plain :class:`QuantConv2d` this layer computes in eval (what is exported)."""
        q = _plain_conv(self, *self.folded())
        q.enabled = self.enabled
        return q.train(self.training)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every :class:`QuantConvBn2d` replaced, in place, by its folded
    convolution; returns ``module``."""
    for name, layer in list(module.named_modules()):
        if isinstance(layer, QuantConvBn2d):
            _set_module(module, name, layer.folded_conv())
    return module


class QuantLinear(nn.Linear):
    """A Linear fake-quantized as ``QGemm`` runs it (see :class:`QuantConv2d`)."""

    enabled = True

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.linear(x, *_quantized_params(self, in_scale))


def _quantized_params(layer: nn.Module, in_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fake-quantized weight and bias of a Quant* layer. While it is exported, the
    weight's scale and the bias are constants of the graph (``layer.export_constants``,
    set by :func:`qat_onnx_bytes`), so that the exported weight becomes an int8 initializer."""
    if not getattr(layer, "enabled", True):
        return layer.weight, layer.bias
    frozen = getattr(layer, "export_constants", None)
    if frozen is None:
        return fake_weight(layer.weight), fake_bias(layer.bias, in_scale, layer.weight)
    scale, bias = frozen
    zp = torch.zeros(scale.shape, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(layer.weight, scale, zp, 0, -128, 127), bias


# ------------------------------------------------------------------ the rewrite


def _plain_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> QuantConv2d:
    """A :class:`QuantConv2d` of ``conv``'s geometry holding ``weight`` and ``bias`` (zeros if None)."""
    q = QuantConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True)
    with torch.no_grad():
        q.weight.copy_(weight.float())
        q.bias.copy_(bias.float() if bias is not None else torch.zeros(conv.out_channels))
    return q


def _quant_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> QuantConv2d:
    return QuantConvBn2d(conv, bn) if bn is not None else _plain_conv(conv, conv.weight, conv.bias)


def _as_linear(lin: nn.Linear) -> QuantLinear:
    q = QuantLinear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    q.load_state_dict(lin.state_dict())
    return q


_RELU = {F.relu, torch.relu, torch.relu_}
_ADD = {operator.add, operator.iadd, torch.add}


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _activation(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'relu' / 'relu6' when ``node`` is one (module, function or method), else None."""
    mod = _module(gm, node)
    if isinstance(mod, nn.ReLU6) or (node.op == "call_function" and node.target is F.relu6):
        return "relu6"
    if isinstance(mod, nn.ReLU) or (node.op == "call_function" and node.target in _RELU) or \
            (node.op == "call_method" and node.target in ("relu", "relu_")):
        return "relu"
    if isinstance(mod, nn.Hardtanh) and (mod.min_val, mod.max_val) == (0.0, 6.0):
        return "relu6"
    return None


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD and len(node.args) == 2
            and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs)


class _Rewriter:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm, self.graph = gm, gm.graph
        self.quantized: dict[fx.Node, fx.Node] = {}  # a value -> its ActQuant node
        self.count = 0

    def new_quant(self, kind: str) -> str:
        name = f"act_quant_{self.count}"
        self.count += 1
        self.gm.add_submodule(name, ActQuant(kind))
        return name

    def quantize_input(self, value: fx.Node) -> fx.Node:
        """``value`` as a quantized tensor (one ActQuant per value, shared by its readers)."""
        if value in self.quantized.values():
            return value
        if value not in self.quantized:
            with self.graph.inserting_after(value):
                self.quantized[value] = self.graph.call_module(self.new_quant("any"), (value,))
        return self.quantized[value]

    def quantize_output(self, node: fx.Node) -> None:
        """One ActQuant after ``node``; a ReLU/ReLU6 that is its only user becomes its range."""
        users = list(node.users)
        kind = _activation(self.gm, users[0]) if len(users) == 1 else None
        source = node
        if kind is not None:
            act = users[0]
            act.replace_all_uses_with(node)
            self.graph.erase_node(act)
        with self.graph.inserting_after(source):
            q = self.graph.call_module(self.new_quant(kind or "any"), (source,))
        source.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
        self.quantized[source] = q

    def scale_of(self, qnode: fx.Node, before: fx.Node) -> fx.Node:
        with self.graph.inserting_before(before):
            return self.graph.get_attr(f"{qnode.target}.scale")

    def run(self) -> None:
        for node in list(self.graph.nodes):
            mod = _module(self.gm, node)
            if isinstance(mod, (QuantConv2d, QuantLinear)):
                x = self.quantize_input(node.args[0])
                node.args = (x, self.scale_of(x, node))
                self.quantize_output(node)
            elif _is_add(node):
                node.args = tuple(self.quantize_input(a) for a in node.args)
                self.quantize_output(node)


def _check_layers(gm: fx.GraphModule, arch: str) -> None:
    for name, mod in gm.named_modules():
        bad = None
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            bad = type(mod).__name__
        elif isinstance(mod, (nn.Conv1d, nn.Conv3d)):
            bad = f"{type(mod).__name__} (only 2-d convolutions are quantized)"
        elif isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
            bad = f"Conv2d with padding_mode='{mod.padding_mode}'"
        if bad:
            raise UserError(f"{arch} cannot be quantized: layer '{name}' is a {bad}, which has no int8 "
                            "kernel in this flow; train it without --qat")
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (F.conv2d, F.linear):
            raise UserError(f"{arch} cannot be quantized: '{node.name}' calls {node.target.__name__} "
                            "directly instead of through a module; train it without --qat")


def prepare_qat(model: nn.Module, arch: str | None = None) -> QATModel:
    """``model`` (float, its BatchNorm statistics as they are) rewritten for
    quantization-aware training; see the module docstring. Raises :class:`UserError` for a
    model this flow cannot quantize, naming the layer."""
    arch = arch or getattr(model, "kdistill_arch", type(model).__name__)
    was_training = model.training
    try:
        gm = fx.symbolic_trace(model.eval())
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{arch} cannot be quantized: torch.fx cannot trace it ({first_line(err)[:160]}); "
                        "train it without --qat") from None
    _check_layers(gm, arch)
    for node in list(gm.graph.nodes):  # nn.Identity (e.g. a plain shortcut) is no value of its own
        if isinstance(_module(gm, node), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):  # conv (+ bn) -> QuantConv(Bn)2d, linear -> QuantLinear
        mod = _module(gm, node)
        if type(mod) is nn.Conv2d:
            users = list(node.users)
            bn = _module(gm, users[0]) if len(users) == 1 else None
            bn = bn if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats else None
            _set_module(gm, node.target, _quant_conv(mod, bn))
            if bn is not None:
                users[0].replace_all_uses_with(node)
                gm.graph.erase_node(users[0])
        elif type(mod) is nn.Linear:
            _set_module(gm, node.target, _as_linear(mod))
    _Rewriter(gm).run()
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    out = QATModel(gm, arch)
    for attr in ("kdistill_weights", "default_cfg", "pretrained_cfg"):
        if hasattr(model, attr):
            setattr(out, attr, getattr(model, attr))
    return out.train(was_training)


def _set_module(root: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


class QATModel(nn.Module):
    """The rewritten student: ``net`` is the fx graph; ``kdistill_qat`` goes into the
    checkpoint's metadata so that :func:`kdistill.models.checkpoint.load_model` rebuilds it."""

    def __init__(self, net: fx.GraphModule, arch: str) -> None:
        super().__init__()
        self.net = net
        self.kdistill_arch = arch
        self.kdistill_qat = dict(QAT_SPEC)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def quantizers(self) -> list[ActQuant]:
        return [m for m in self.modules() if isinstance(m, ActQuant)]

    def float_model(self) -> QATModel:
        """A copy that computes in float: the same graph and folded weights, every fake
        quantization off: the fp32 model an int8 export is compared with in its card."""
        copy_ = fold_batchnorm(copy.deepcopy(self).eval())
        for m in copy_.modules():
            if isinstance(m, (ActQuant, QuantConv2d, QuantLinear)):
                m.enabled = False
        return copy_

    def float_leftovers(self) -> list[str]:
        """Conv/Linear modules left in float (none after :func:`prepare_qat`)."""
        return [n for n, m in self.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def is_qat(meta: dict[str, Any]) -> bool:
    return bool(meta.get("qat"))


def check_qat_spec(meta: dict[str, Any], path: str) -> None:
    """A QAT checkpoint made by another version of this flow (kdistill before 2026-12-04
    folded and froze BatchNorm) does not fit today's rewrite: say so instead of a key error."""
    got = meta["qat"].get("batchnorm")
    if got != QAT_SPEC["batchnorm"]:
        raise UserError(f"'{path}' holds a quantization-aware student made with BatchNorm '{got}', which this "
                        f"kdistill no longer builds (BatchNorm '{QAT_SPEC['batchnorm']}'); train it again "
                        "with --qat from its float run")


# ------------------------------------------------------------------ export


def qat_onnx_bytes(module: nn.Module, size: int, what: str) -> bytes:
    """``module`` (``Normalized(QATModel)``, eval) as a QDQ ONNX graph that ONNX Runtime runs
    with int8 kernels: the exporter turns every fake quantization into QuantizeLinear +
    DequantizeLinear (weights folded to int8 initializers); each Conv/Gemm's float bias then
    becomes the int32 tensor + DequantizeLinear its int8 kernel takes."""
    import onnx

    from .onnx import onnx_bytes

    module = fold_batchnorm(copy.deepcopy(module).eval())
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (QuantConv2d, QuantLinear)):
                layer.export_constants = None
        scales = {}  # each layer's input scale, as its forward sees it
        hooks = [m.register_forward_pre_hook(lambda m, args: scales.__setitem__(m, args[1].clone()))
                 for m in module.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
        module(torch.rand(1, 3, size, size))
        for h in hooks:
            h.remove()
        for layer, s_in in scales.items():
            layer.export_constants = (weight_qparams(layer.weight).clone(),
                                      fake_bias(layer.bias, s_in, layer.weight).clone()
                                      if layer.bias is not None else None)
    proto = onnx.load_from_string(onnx_bytes(module, size, QAT_OPSET, what))
    fold_constant_quantize(proto)
    int32_biases(proto)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _constants(g) -> dict:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:  # in topological order: an Identity of a constant is one too
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in out:
            out[n.output[0]] = out[n.input[0]]
    return out


def fold_constant_quantize(proto) -> None:
    """Fold, in place, the Cast and QuantizeLinear nodes whose inputs are all constants (the
    zero points' casts, the weights' quantization) into initializers, then drop what no node
    reads any more (the float weights): the file holds int8 weights."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = proto.graph
    consts = _constants(g)
    have = {t.name for t in g.initializer}
    folded = []
    for n in g.node:
        if n.op_type not in ("Cast", "QuantizeLinear", "Identity") or not all(i in consts for i in n.input if i):
            continue
        if n.op_type == "Identity":
            val = consts[n.input[0]]
        elif n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            val = consts[n.input[0]].astype(helper.tensor_dtype_to_np_dtype(to))
        else:
            x, scale, zp = (consts[i] for i in n.input[:3])
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * x.ndim
            if scale.ndim == 1 and scale.size > 1:
                shape[axis] = scale.size
            info = np.iinfo(zp.dtype)
            q = np.round(x / scale.reshape(shape)) + zp.astype(np.int64).reshape(shape)
            val = np.clip(q, info.min, info.max).astype(zp.dtype)
        consts[n.output[0]] = val
        folded.append(n)
        if n.output[0] not in have:
            g.initializer.append(numpy_helper.from_array(np.asarray(val), n.output[0]))
    for n in folded:
        g.node.remove(n)
    while True:  # constants nothing reads any more
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def int32_biases(proto) -> int:
    """Rewrite, in place, each Conv/Gemm whose inputs are DequantizeLinear(x) and
    DequantizeLinear(w) with a float bias initializer: the bias becomes int32 at
    ``s_x * s_w`` behind its own DequantizeLinear. Returns how many were rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    producer = {o: n for n in g.node for o in n.output}

    def value(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    rewritten, new_nodes = 0, []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or value(node.input[2]) is None:
            continue
        dq = [producer.get(node.input[i]) for i in (0, 1)]
        if any(d is None or d.op_type != "DequantizeLinear" for d in dq):
            continue
        sx, sw = value(dq[0].input[1]), value(dq[1].input[1])
        if sx is None or sw is None:
            continue
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i == 0 for a in node.attribute):
            continue
        scale = (np.float32(sx).reshape(()) * sw.astype(np.float32).reshape(-1)).astype(np.float32)
        bias = value(node.input[2]).astype(np.float64).reshape(-1)
        q = np.clip(np.round(bias / scale), -2**31, 2**31 - 1).astype(np.int32)
        base = f"{node.name or node.output[0]}_bias"
        g.initializer.extend([numpy_helper.from_array(q, f"{base}_int32"),
                              numpy_helper.from_array(scale, f"{base}_scale"),
                              numpy_helper.from_array(np.zeros_like(q), f"{base}_zp")])
        new_nodes.append((node, helper.make_node("DequantizeLinear", [f"{base}_int32", f"{base}_scale", f"{base}_zp"],
                                                 [f"{base}_dq"], name=f"{base}_dq", axis=0)))
        node.input[2] = f"{base}_dq"
        rewritten += 1
    for consumer, dq in new_nodes:  # keep the node list topologically sorted
        idx = list(g.node).index(consumer)
        g.node.insert(idx, dq)
    return rewritten
