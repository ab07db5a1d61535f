"""Command line: one function per subcommand; each parses, builds a config, calls the library.

Errors a user can fix end with exit status 2 and one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import KdistillError, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UserError(f"{message} (see `{self.prog} --help`)")


# ------------------------------------------------------------------ shared options

#: flag -> dotted config key; flags are shortcuts, every key also takes `-o key=value`
TRAIN_FLAGS = {
    "data": "data.root", "model": "model.name", "epochs": "train.epochs",
    "batch_size": "train.batch_size", "out": "train.out", "lr": "optim.lr", "opt": "optim.name",
    "seed": "train.seed", "device": "train.device", "workers": "data.workers",
    "ema": "train.ema_decay", "image_size": "data.image_size",
}
TRAIN_SWITCHES = {"resume": "train.resume", "amp": "train.amp", "pretrained": "model.pretrained",
                  "no_progress": None}


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                   help="YAML config (repeatable; later files win)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key, e.g. -o train.epochs=3 (repeatable)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="ROOT", help="folder with train/ val/, a list file, or fashion-mnist")
    p.add_argument("--model", metavar="NAME", help="see `kdistill list models`")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<model>-<time>)")
    p.add_argument("--lr", type=float)
    p.add_argument("--opt", metavar="NAME", help="timm optimizer name: sgd, adamw, ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--ema", type=float, metavar="DECAY", help="weight EMA decay, e.g. 0.999")
    p.add_argument("--image-size", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU)")
    p.add_argument("--pretrained", action="store_true", help="start from published weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_args(p)


def train_config(args: argparse.Namespace, cls=None, extra_flags: dict | None = None):
    """Defaults < run's own config.yaml (on --resume) < -c files < flags < -o overrides."""
    from .config import Config, build_config

    flags = {key: getattr(args, name) for name, key in TRAIN_FLAGS.items()}
    flags.update({key: True for name, key in TRAIN_SWITCHES.items() if key and getattr(args, name)})
    if args.no_progress:
        flags["train.progress"] = False
    flags.update(extra_flags or {})
    files = list(args.config)
    if args.resume and args.out and (Path(args.out) / "config.yaml").is_file():
        files.insert(0, str(Path(args.out) / "config.yaml"))
    return build_config(cls or Config, files, flags, args.override)


# ------------------------------------------------------------------ subcommands


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.run import train

    summary = train(train_config(args))
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    from .engine import distributed as dist

    if not dist.is_main():
        return
    best = summary.get("best") or {}
    line = f"done: {summary['out']}  epochs {summary['epochs']}"
    if best:
        line += f"  best epoch {summary['best_epoch']}: top1 {best['top1']:.4f}  mpa {best['mpa']:.4f}"
    print(line)


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine.run import evaluate_run

    if not args.data:
        raise UserError("eval needs --data ROOT (the data to evaluate on)")
    summary, report = evaluate_run(args.run, args.data, args.split, args.tta, args.batch_size,
                                   args.workers, args.device, args.report)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['checkpoint']} on {args.split}{' (TTA)' if args.tta else ''}: "
              f"top1 {summary['top1']:.4f}  top5 {summary['top5']:.4f}  mpa {summary['mpa']:.4f}  "
              f"n {summary['n']}")
        print(f"report: {report}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "models":
        from .models import list_models

        groups = list_models(args.pattern)
        for source, names in groups.items():
            if args.pattern or source == "zoo":
                print(f"# {source} ({len(names)})")
                for n in names:
                    print(n)
            else:
                print(f"# {source}: {len(names)} models; filter with a pattern, "
                      f"e.g. `kdistill list models 'resnet*'`")
    elif args.what == "recipes":
        for path, cmd in list_recipes(args.pattern):
            print(f"{path}\n    {cmd}")
    return 0


def list_recipes(pattern: str | None = None) -> list[tuple[str, str]]:
    """``configs/**/*.yaml`` with the command each one opens with."""
    import fnmatch

    root = Path(__file__).resolve().parent.parent / "configs"
    out = []
    for path in sorted(root.rglob("*.yaml")):
        rel = str(path.relative_to(root.parent))
        if pattern and not fnmatch.fnmatch(rel, f"*{pattern}*"):
            continue
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "#")
        out.append((rel, first.lstrip("# ").strip()))
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, args.data, quick=args.quick, progress=not args.no_progress)
    return 0


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kdistill", description="Knowledge distillation for image classifiers: "
                "train a teacher, distil a small student, ship it.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"kdistill {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a classifier (teacher or baseline student)")
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="top-1/top-5/MPA, per-class accuracy and confusion matrix")
    e.add_argument("run", metavar="RUN_OR_CKPT")
    e.add_argument("--data", metavar="ROOT")
    e.add_argument("--split", default="val", choices=["val", "test", "train"])
    e.add_argument("--tta", action="store_true", help="average flips and corner crops")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--device", default="auto")
    e.add_argument("--report", metavar="DIR", help="report folder (default beside the checkpoint)")
    e.set_defaults(func=cmd_eval)

    ls = sub.add_parser("list", help="list models, losses or recipes")
    ls.add_argument("what", choices=["models", "recipes"])
    ls.add_argument("pattern", nargs="?", help="shell wildcard, e.g. 'resnet*'")
    ls.set_defaults(func=cmd_list)

    d = sub.add_parser("demo", help="teacher vs student on Fashion-MNIST in a few minutes")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data", default="fashion-mnist")
    d.add_argument("--quick", action="store_true", help="a smaller, faster run (smoke test)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KdistillError as err:
        print(f"kdistill: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("kdistill: interrupted; the last completed epoch is saved (continue with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
