"""``kdistill report``: parser and command function."""
from __future__ import annotations

import argparse


def add_report_parser(subparsers) -> None:
    """Add ``report`` to a ``kdistill`` sub-command table."""
    from ..config import DataConfig, EvalConfig, TrainConfig, add_flags, workers_flag

    r = subparsers.add_parser(
        "report", help="one self-contained HTML page comparing runs: accuracy, latency, agreement, calibration",
        description="Evaluate each run on a split of --data (per-image probabilities are cached in the "
                    "run's eval-<split>/ by checkpoint SHA-256), measure its cost, and write one HTML file "
                    "with everything inline.")
    r.add_argument("runs", nargs="+", metavar="RUN_OR_CKPT", help="run folders (best checkpoint) or checkpoints")
    r.add_argument("--data", metavar="ROOT", help="folder with val/ [test/], a list file, or fashion-mnist")
    add_flags(r, EvalConfig)  # --split, --tta, --batch-size
    r.add_argument("--teacher", metavar="RUN_OR_CKPT",
                   help="the teacher for agreement, KL and the plot marker (default: the one recorded "
                        "in the students' checkpoints)")
    r.add_argument("--export", action="append", default=[], metavar="FILE",
                   help="an .onnx file written by `kdistill export` (fp32 or int8) to add as a row: accuracy "
                        "on this data, agreement with the teacher, ONNX Runtime latency, file size "
                        "(repeatable)")
    r.add_argument("--out", default="report.html", metavar="FILE", help="HTML file to write (default report.html)")
    r.add_argument("--workers", type=workers_flag, default=DataConfig.workers,
                   help="DataLoader worker processes (a count or auto)")
    r.add_argument("--device", default=TrainConfig.device, help="auto, cpu, cuda, cuda:N (evaluation only; "
                   "latency is measured on the CPU)")
    r.add_argument("--bench-seconds", type=float, default=0.5, metavar="S",
                   help="time spent per latency measurement (default 0.5)")
    r.set_defaults(func=cmd_report, on_interrupt="cached probabilities are kept (run it again to continue)")


def cmd_report(args: argparse.Namespace) -> int:
    from ..config import EvalConfig, eval_workers, from_args
    from ..errors import UserError
    from .build import build_report

    if not args.data:
        raise UserError("report needs --data ROOT (the data to evaluate on)")
    ec = from_args(EvalConfig, args)
    result = build_report(args.runs, args.data, args.out, ec.split, ec.tta, args.teacher, args.device,
                          ec.batch_size, eval_workers(args.workers, args.device), args.bench_seconds,
                          args.export)
    for row in result["rows"]:
        print(f"{row['name']:>16s}  {row['role']:7s}  top1 {row['top1']:.4f}  mpa {row['mpa']:.4f}  "
              f"{row['eager_ms_b1']:.3f} ms/img" + (f"  agreement {row['agreement']:.4f}"
                                                    if row["agreement"] is not None else ""))
    for row in result["exports"]:
        print(f"{row['name']:>16s}  export   top1 {row['top1']:.4f}  mpa {row['mpa']:.4f}  "
              f"{row['ort_ms_b1']:.3f} ms/img (onnxruntime, {row['precision']})"
              + (f"  agreement {row['agreement']:.4f}" if row["agreement"] is not None else ""))
    print(f"report: {result['out']}")
    return 0
