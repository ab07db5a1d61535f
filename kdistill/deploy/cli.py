"""``kdistill export | predict | serve``: parsers and thin command functions."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import DEFAULT_OPSET, DEFAULT_TOLERANCE, FORMATS
from ..models.quant import QAT_MIN_AGREEMENT
from .int8 import DEFAULT_CALIB_IMAGES, DEFAULT_MIN_AGREEMENT, INT8_PARITY_IMAGES, MIN_CALIB_IMAGES


def add_deploy_parsers(subparsers) -> None:
    """Add ``export``, ``predict`` and ``serve`` to a ``kdistill`` sub-command table."""
    e = subparsers.add_parser(
        "export", help="export a run's student to ONNX or TorchScript, with parity check and model card",
        description="The exported graph takes float32 NCHW RGB in [0, 1] at the model's input size "
                    "(resized + centre-cropped, not normalised: mean/std are inside), dynamic batch, "
                    "and returns logits; class names and preprocessing are embedded.")
    e.add_argument("run", metavar="RUN_OR_CKPT", help="run folder (its best checkpoint) or .safetensors file")
    e.add_argument("--format", choices=FORMATS, help="default: from --out's suffix (.onnx; .pt .pth .ts .jit)")
    e.add_argument("--out", required=True, metavar="FILE", help="file to write (card beside it: FILE.card.md/.json)")
    e.add_argument("--image-size", type=int, metavar="S", help="input size (default: the size it was trained at)")
    e.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset (default {DEFAULT_OPSET})")
    e.add_argument("--data", metavar="ROOT", help="parity images from ROOT's val split, --int8 calibration "
                                                  "images from its train split (default: the run's data)")
    e.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="T",
                   help=f"max |probability difference| torch vs export (default {DEFAULT_TOLERANCE:g})")
    e.add_argument("--parity-images", type=int, default=64, metavar="N",
                   help=f"val images in the parity check (default 64; with --int8 at least {INT8_PARITY_IMAGES}, "
                        "as many as the split has)")
    e.add_argument("--int8", action="store_true",
                   help="int8 (ONNX only). A float run: post-training, ONNX Runtime's static QDQ "
                        "quantization, uint8 activations, int8 per-channel weights, calibrated on training "
                        "images. A --qat run: its own fake quantization, no calibration. Checked for int8 "
                        "kernels and for agreement with the fp32 (or fake-quantized) student")
    e.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES, metavar="N",
                   help=f"--int8: training images to calibrate on (default {DEFAULT_CALIB_IMAGES}, "
                        f"at least {MIN_CALIB_IMAGES}; from the run's data or --data)")
    e.add_argument("--min-agreement", type=float, default=None, metavar="A",
                   help=f"--int8: fail (exit 1, nothing written) when int8 and its reference agree on the "
                        f"top-1 of fewer than this fraction of val images (default {DEFAULT_MIN_AGREEMENT:g} "
                        "against the fp32 student: PTQ keeps most top-1s, a broken quantization far fewer; "
                        f"see README; {QAT_MIN_AGREEMENT:g} for a "
                        "--qat run against its fake-quantized self, which computes the same int8 arithmetic)")
    e.add_argument("--no-card", action="store_true", help="skip the model card (and its latency measurements)")
    e.add_argument("--bench-seconds", type=float, default=0.5, metavar="S",
                   help="time spent per latency measurement of the card")
    e.set_defaults(func=cmd_export)

    p = subparsers.add_parser("predict", help="classify images with an exported model or a run")
    p.add_argument("model", metavar="MODEL", help="ONNX or TorchScript file, run folder or .safetensors")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="files, or folders searched recursively")
    p.add_argument("--top-k", type=int, default=5, metavar="K")
    p.add_argument("--json", action="store_true", help="JSON lines: one object per image")
    p.add_argument("--batch-size", type=int, default=32, metavar="B")
    p.add_argument("--int8", action="store_true", help="run folder or checkpoint MODEL: export it to int8 "
                                                      "ONNX first (as `export --int8`) and predict with that")
    p.add_argument("--data", metavar="ROOT", help="with --int8: calibration and parity images (default: the "
                                                  "run's data)")
    p.set_defaults(func=cmd_predict)

    s = subparsers.add_parser("serve", help="serve a model over HTTP (POST /predict, /health, /metadata, /metrics)")
    s.add_argument("model", metavar="MODEL", help="ONNX or TorchScript file, run folder or .safetensors "
                                                  "(exported to ONNX first)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1, help="server processes")
    s.add_argument("--max-batch", type=int, default=8, metavar="B", help="micro-batch size (1: off)")
    s.add_argument("--max-wait-ms", type=float, default=5.0, metavar="W", help="micro-batch wait")
    s.add_argument("--queue-size", type=int, default=256, metavar="N", help="images waiting before 503")
    s.add_argument("--max-body-mb", type=float, default=10.0, metavar="MB", help="request body limit")
    s.add_argument("--max-pixels", type=int, default=40_000_000, metavar="N", help="pixels per image limit")
    s.add_argument("--max-files", type=int, default=32, metavar="N", help="files per request")
    s.add_argument("--threads", type=int, metavar="N", help="onnxruntime threads per worker")
    s.add_argument("--data", metavar="ROOT", help="run/checkpoint MODEL: parity (and --int8 calibration) "
                                                  "images for its export")
    s.add_argument("--int8", action="store_true", help="run folder or checkpoint MODEL: export it to int8 "
                                                      "ONNX first (as `export --int8`) and serve that")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)


TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript")


def format_from_suffix(out: str) -> str:
    suffix = Path(out).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    from ..errors import UserError

    raise UserError(f"cannot tell the format from '{out}'; add --format onnx|torchscript "
                    f"(or name it .onnx, {', '.join(TORCHSCRIPT_SUFFIXES)})")


def cmd_export(args: argparse.Namespace) -> int:
    from ..utils import ensure_writable_file_parent
    from .export import export_checkpoint

    fmt = args.format or format_from_suffix(args.out)
    ensure_writable_file_parent(args.out, "--out")  # the export and its card go there
    export_checkpoint(args.run, fmt, args.out, args.image_size, args.opset, args.data, args.tolerance,
                      args.parity_images, not args.no_card, args.bench_seconds, args.int8, args.calib_images,
                      args.min_agreement)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    return run_predict(args.model, args.images, args.top_k, args.json, args.batch_size, int8=args.int8,
                       data=args.data)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeSettings, serve

    settings = ServeSettings(max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
                             max_files=args.max_files, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             queue_size=args.queue_size, threads=args.threads)
    serve(args.model, args.host, args.port, args.workers, settings, args.data, args.log_level, int8=args.int8)
    return 0
