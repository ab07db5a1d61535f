"""Model card written beside every export: ``<out>.card.json`` (machine-readable) and
``<out>.card.md`` (for people).

It records what was shipped (file, format, sha256, input convention, classes), its cost
(parameters, FLOPs, single-thread latency per image at batch 1 and 32 in torch eager and in
the exported runtime: onnxruntime for ONNX, TorchScript for TorchScript), its accuracy (the checkpoint's
own val metrics and the run's ``summary.json``), how it was made (method, loss terms,
teachers, the run's config.yaml) and when and where the numbers were measured.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..data.transforms import Preprocessing
from ..models.profile import count_flops, latency_table, machine
from ..utils import atomic_write_text, count_params, file_sha256, write_json
from ..models.onnx import Normalized
from .runtime import OnnxPredictor, Predictor

LATENCY_BATCHES = (1, 32)
LATENCY_THREADS = 1  # see measure_latency
CONFIG_KEYS = {"model": ("name", "pretrained"), "train": ("epochs", "batch_size", "ema_decay", "amp"),
               "optim": ("name", "lr", "weight_decay"), "data": ("root", "image_size", "mixup", "cutmix")}


def card_paths(out: str | Path) -> tuple[Path, Path]:
    """(markdown, json) card paths of an export."""
    return Path(f"{out}.card.md"), Path(f"{out}.card.json")


def read_json(path: Path) -> dict | None:
    """A run's JSON file (summary.json), or None when missing or unreadable."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def read_config(path: Path) -> dict | None:
    """A run's config.yaml as a dict, or None when missing or unreadable."""
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def measure_latency(model: nn.Module, exported: Predictor, image_size: int,
                    seconds: float = 0.5, fp32_onnx: str | None = None) -> dict[str, dict[str, float]]:
    """ms per image at each of :data:`LATENCY_BATCHES` for torch eager and the export (and,
    for an int8 export, the fp32 ONNX it was made from: ``onnxruntime_fp32``), all on
    :data:`LATENCY_THREADS` thread (see :func:`~kdistill.models.profile.latency_table`)."""
    eager = Normalized(model, exported.pp).eval()
    if isinstance(exported, OnnxPredictor):
        exported = OnnxPredictor(exported.path, threads=LATENCY_THREADS)
    others = {exported.backend: exported.logits}
    if fp32_onnx:
        others["onnxruntime_fp32"] = OnnxPredictor(fp32_onnx, threads=LATENCY_THREADS).logits
    return latency_table(eager, image_size, others, LATENCY_BATCHES, seconds, LATENCY_THREADS)


def build_card(model: nn.Module, exported: Predictor, meta: dict, checkpoint: Path, parity: Any,
               bench_seconds: float = 0.5, int8: dict | None = None) -> dict:
    """The card's content for ``exported`` (written from ``model``, loaded from ``checkpoint``);
    ``int8``: an int8 export's :func:`~kdistill.deploy.int8.int8_summary` plus ``fp32_path``,
    the fp32 ONNX it was made from (timed beside it)."""
    pp = Preprocessing.from_dict(meta["preprocessing"])
    run_dir = checkpoint.parent
    summary = read_json(run_dir / "summary.json")
    config = read_config(run_dir / "config.yaml")
    from ..models.checkpoint import read_meta

    ckpt_meta = read_meta(checkpoint)
    path = Path(exported.path)
    return {
        "model": {"arch": meta["arch"], "num_classes": meta["num_classes"], "classes": meta["classes"],
                  "params": count_params(model), "flops": count_flops(model, pp.image_size),
                  "preprocessing": pp.to_dict(), "input": meta["input"], "output": meta["output"]},
        "file": {"path": str(path), "format": meta["format"], "precision": meta.get("precision", "fp32"),
                 "bytes": path.stat().st_size,
                 "sha256": file_sha256(path), "opset": meta.get("opset")},
        "source": {"checkpoint": str(checkpoint), "run": meta.get("run"), "epoch": ckpt_meta.get("epoch"),
                   "ema": ckpt_meta.get("ema"), "trained": ckpt_meta.get("created"),
                   "trained_with": ckpt_meta.get("kdistill_version"),
                   "precision": ckpt_meta.get("precision"), "cpu_capability": ckpt_meta.get("cpu_capability")},
        "recipe": {"method": ckpt_meta.get("method"), "losses": ckpt_meta.get("losses"),
                   "teachers": ckpt_meta.get("teachers"), "config": config},
        "accuracy": {"checkpoint_val": ckpt_meta.get("metrics") or None,
                     "run_best": (summary or {}).get("best"), "run_best_epoch": (summary or {}).get("best_epoch"),
                     "run_epochs": (summary or {}).get("epochs")},
        "parity": asdict(parity) if parity is not None else None,
        "int8": {k: v for k, v in int8.items() if k != "fp32_path"} if int8 else None,
        "latency_ms_per_image": measure_latency(model, exported, pp.image_size, bench_seconds,
                                                int8.get("fp32_path") if int8 else None),
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "kdistill_version": meta["kdistill_version"],
    }


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "n/a"


def render_markdown(card: dict) -> str:
    m, f, src, rec, acc = card["model"], card["file"], card["source"], card["recipe"], card["accuracy"]
    pp = m["preprocessing"]
    int8 = card.get("int8")
    lines = [f"# Model card: {m['arch']} ({f['format']}{', int8' if int8 else ''})", "",
             f"`{Path(f['path']).name}`, {f['bytes']:,} bytes, sha256 `{f['sha256'][:16]}…`"
             + (f", ONNX opset {f['opset']}" if f.get("opset") else ""), "",
             "## Use", "",
             f"- Input `{m['input']['name']}`: float32 NCHW RGB in [0, 1], shape (batch, 3, "
             f"{pp['image_size']}, {pp['image_size']}); resize the short side to "
             f"{math.floor(pp['image_size'] / pp['crop_pct'])} and centre-crop {pp['image_size']}; "
             f"mean {pp['mean']} / std {pp['std']} are applied inside the graph.",
             f"- Output `{m['output']['name']}`: logits over {m['num_classes']} classes (apply softmax).",
             f"- Classes: {', '.join(m['classes'][:20])}" + (" …" if len(m["classes"]) > 20 else ""),
             "- `kdistill predict FILE IMAGES...` and `kdistill serve FILE` read all of this from the file.",
             "", "## Cost", "",
             f"- Parameters: {m['params']:,}; FLOPs per image: {m['flops'] / 1e6:,.1f} M",
             "", f"| runtime ({LATENCY_THREADS} thread) | ms/image, batch 1 | ms/image, batch 32 |", "|---|---|---|"]
    names = {"onnxruntime": "onnxruntime, int8 (this file)", "onnxruntime_fp32": "onnxruntime, fp32"} if int8 else {}
    for runtime, row in card["latency_ms_per_image"].items():
        lines.append(f"| {names.get(runtime, runtime)} | {row.get('1', float('nan')):.3f} | "
                     f"{row.get('32', float('nan')):.3f} |")
    load = card.get("load_average_1min")
    lines += ["", f"Measured {card['date']} on {card['machine']}"
              + (f" (1-minute load average {load:.1f})" if load is not None else "")
              + ".", "", "## Accuracy", ""]
    ck = acc.get("checkpoint_val") or {}
    if ck:
        lines.append(f"- This checkpoint (epoch {src.get('epoch')}), val: top-1 {_pct(ck.get('top1'))}, "
                     f"MPA {_pct(ck.get('mpa'))}, top-5 {_pct(ck.get('top5'))}, n={ck.get('n')}")
    best = acc.get("run_best") or {}
    if best:
        lines.append(f"- Run best (epoch {acc.get('run_best_epoch')} of {acc.get('run_epochs')}), val: "
                     f"top-1 {_pct(best.get('top1'))}, MPA {_pct(best.get('mpa'))}")
    if not ck and not best:
        lines.append("- No val metrics recorded with this checkpoint.")
    par = card.get("parity")
    if par:
        what = "fp32 ONNX parity (the graph quantized)" if card.get("int8") else "Export parity"
        lines.append(f"- {what} on {par['n']} {par['source']}: max |Δprob| {par['max_abs_diff']:.2e} "
                     f"(tolerance {par['tolerance']:.0e}), top-1 agreement {_pct(par['top1_agreement'])}")
    if int8:
        lines += int8_lines(int8, card["latency_ms_per_image"])
    lines += ["", "## How it was made", "",
              f"- Method: {rec.get('method') or 'unknown'}" + (f"; loss terms: {', '.join(rec['losses'])}"
                                                              if rec.get("losses") else "")]
    if src.get("precision"):
        lines.append(f"- Trained in {src['precision']}" + (f" on a {src['cpu_capability']} CPU"
                                                          if src.get("cpu_capability") else ""))
    for t in rec.get("teachers") or []:
        lines.append(f"- Teacher: {t.get('teacher')}" + (f" (weight {t['weight']})" if "weight" in t else ""))
    cfg = rec.get("config") or {}
    for section, keys in CONFIG_KEYS.items():
        values = {k: cfg.get(section, {}).get(k) for k in keys if (cfg.get(section) or {}).get(k) is not None}
        if values:
            lines.append(f"- {section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    lines += [f"- Checkpoint: `{src['checkpoint']}`; run `{src.get('run')}`; trained {src.get('trained')} "
              f"with kdistill {src.get('trained_with')}; exported with kdistill {card['kdistill_version']}", ""]
    return "\n".join(lines)


def int8_lines(int8: dict, latency: dict) -> list[str]:
    """The card's int8 section: fp32 beside int8 (size, latency, accuracy), the kernels ONNX
    Runtime runs and how the model was quantized."""
    a, q = int8["agreement"], int8["quantization"]
    fp32_ms, int8_ms = latency.get("onnxruntime_fp32", {}), latency.get("onnxruntime", {})

    def ms(row: dict, b: str) -> str:
        return f"{row[b]:.3f}" if b in row else "n/a"

    lines = ["", "## int8", "", "| | fp32 ONNX | int8 ONNX (this file) |", "|---|---|---|",
             f"| file size | {int8['fp32_bytes']:,} bytes | {int8['int8_bytes']:,} bytes "
             f"({int8['int8_bytes'] / max(1, int8['fp32_bytes']):.2f}x) |",
             *[f"| ms/image, batch {b} ({LATENCY_THREADS} thread) | {ms(fp32_ms, b)} | {ms(int8_ms, b)} |"
               for b in map(str, LATENCY_BATCHES)]]
    qat = q.get("method") == "qat"  # the reference is the fake-quantized student, not a float one
    reference = "fake-quantized student, torch eager" if qat else "torch eager"
    if a.get("reference_top1") is not None:
        lines.append(f"| top-1 on {a['n_labeled']} {a['source']} | {_pct(a['reference_top1'])} ({reference}) "
                     f"| {_pct(a['int8_top1'])} |")
    kernels = ", ".join(f"{op} x{n}" for op, n in sorted(int8["kernels"].items())) or "none"
    lines += ["", f"- Top-1 agreement with the {'fake-quantized' if qat else 'fp32'} student: "
                  f"{_pct(a['top1_agreement'])} of {a['n']} "
                  f"{a['source']} (the export fails below {_pct(a['min_agreement'])}); max |Δprob| "
                  f"{a['max_abs_diff']:.2e}",
              f"- ONNX Runtime ({int8['optimization_level']}, CPU) runs int8 kernels: {kernels}"]
    left = int8.get("float_nodes") or []
    lines.append(f"- Still in float: {', '.join(f'`{n}`' for n in left)}" if left
                 else "- No Conv/Gemm/MatMul left in float.")
    ranges = (f", {q.get('calibration')} ranges from {q['calibration_images']} training images"
              if q.get("calibration_images") else "")
    if qat:
        lines.append(f"- Quantization-aware training ({q.get('flow')}): activations {q.get('activations')}, "
                     f"weights {q.get('weights')}, bias {q.get('bias')}, BatchNorm {q.get('batchnorm')}; "
                     "ranges learned in training, not calibrated. The fp32 ONNX beside it is the same "
                     "graph with the fake quantization off.")
    else:
        lines.append(f"- Quantized by {q.get('method')} ({q.get('format')}): activations {q.get('activations')}, "
                     f"weights {q.get('weights')}{ranges}; onnxruntime {q.get('onnxruntime')}")
    return lines


def write_card(out: str | Path, card: dict) -> tuple[Path, Path]:
    """Write ``<out>.card.md`` and ``<out>.card.json`` atomically; returns (md, json)."""
    md, js = card_paths(out)
    write_json(js, card)
    atomic_write_text(md, render_markdown(card))
    return md, js
