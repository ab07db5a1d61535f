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
    "ema": "train.ema_decay", "image_size": "data.image_size", "amp": "train.amp",
}
TRAIN_SWITCHES = {"resume": "train.resume", "pretrained": "model.pretrained", "qat": "model.qat",
                  "no_progress": None}


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                   help="YAML file or recipe name, e.g. cifar/kd_resnet56_resnet20 (repeatable; later files win)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key, e.g. -o train.epochs=3 (repeatable)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    from .config import workers_flag

    p.add_argument("--data", metavar="ROOT", help="folder with train/ val/, a list file, or fashion-mnist")
    p.add_argument("--model", metavar="NAME", help="see `kdistill list models`")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<model>-<time>)")
    p.add_argument("--lr", type=float)
    p.add_argument("--opt", metavar="NAME", help="timm optimizer name: sgd, adamw, ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--workers", type=workers_flag, help="DataLoader worker processes (a count or auto)")
    p.add_argument("--ema", type=float, metavar="DECAY", help="weight EMA decay, e.g. 0.999")
    p.add_argument("--image-size", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast on (--amp) or off (--no-amp); default train.amp=auto: on for CUDA "
                        "and CPUs with native bf16, fp32 elsewhere")
    p.add_argument("--pretrained", action="store_true", help="start from published weights")
    p.add_argument("--qat", action="store_true",
                   help="quantization-aware: train in fp32 with the fake quantization the int8 export "
                        "(kdistill export --int8) runs; start from a float run with -o model.checkpoint=RUN")
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


def in_run_folder(cfg, run):
    """``run(cfg)`` in its run folder, fixed once (default runs/<model>-<time>) and checked
    writable before any data, model or teacher is loaded. A folder made here that is still
    empty when a user error stops the run (a typo in --model, say) is removed again.

    Under torchrun the process group comes up first and stays up for the whole command:
    rank 0 names the folder and every rank takes that name (a clock read on each rank can
    differ by a second, or by more between nodes)."""
    import contextlib

    from . import distributed as dist
    from .engine.run import run_folder
    from .utils import ensure_writable_dir, resolve_device

    with dist.one_group(resolve_device(cfg.train.device)):
        out = run_folder(cfg)
        made = not out.exists()
        cfg.train.out = str(ensure_writable_dir(out, "--out"))
        set_run_folder(cfg.train.out)
        try:
            return run(cfg)
        except UserError:
            if made:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only while empty
            raise


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.run import train

    summary = in_run_folder(train_config(args), train)
    _print_summary(summary)
    return 0


def add_teacher_runtime(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--teacher-runtime (None: the config's distill.teacher_runtime)."""
    from typing import get_args

    from .config import TEACHER_RUNTIME_HELP, TeacherRuntime

    p.add_argument("--teacher-runtime", choices=get_args(TeacherRuntime), default=default,
                   help=TEACHER_RUNTIME_HELP + (f" (default {default})" if default else ""))


def add_distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", action="append", metavar="RUN_OR_CKPT",
                   help="teacher: run folder, checkpoint, NAME@WEIGHTS or model name (repeatable: ensemble)")
    add_teacher_runtime(p)
    p.add_argument("--loss", action="append", metavar="NAME[:WEIGHT]",
                   help="loss term, e.g. kd:0.9 (repeatable; see `kdistill list losses`)")
    p.add_argument("--feature-pairs", metavar="S:T,...", help="student:teacher layer names")
    p.add_argument("--self-distill", choices=["none", "ema", "born_again"])
    p.add_argument("--generations", type=int, help="born_again: number of generations")
    p.add_argument("--view", choices=["consistent", "fixed", "independent", "funmatch"],
                   help="what the teacher sees (default consistent: the student's crop)")
    p.add_argument("--soft-labels", metavar="DIR", help="replay a kdistill cache instead of running a teacher")
    p.add_argument("--unlabeled", metavar="LIST_OR_DIR", help="extra images without labels (SSLD)")
    p.add_argument("--unlabeled-fraction", type=float, metavar="F",
                   help="share of unlabeled images in each batch (default: by counts)")
    p.add_argument("--ignore-labels", action="store_true",
                   help="treat every training row as unlabeled (PaddleClas SSLD lists with label 0)")


def distill_config(args: argparse.Namespace):
    from .engine.distill import DistillConfig

    pairs = [p for p in (args.feature_pairs or "").split(",") if p.strip()] or None
    return train_config(args, DistillConfig, {
        "distill.teachers": args.teacher, "distill.losses": args.loss, "distill.feature_pairs": pairs,
        "distill.self_distill": args.self_distill, "distill.generations": args.generations,
        "distill.view": args.view, "distill.soft_labels": args.soft_labels,
        "distill.teacher_runtime": args.teacher_runtime,
        "data.unlabeled": args.unlabeled, "data.unlabeled_fraction": args.unlabeled_fraction,
        "data.ignore_labels": True if args.ignore_labels else None})


def cmd_distill(args: argparse.Namespace) -> int:
    from .engine.distill import distill

    _print_summary(in_run_folder(distill_config(args), distill))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .config import build_config
    from .engine.cache import build_cache
    from .engine.distill import DistillConfig

    flags = {"data.root": args.data, "distill.teachers": args.teacher, "train.device": args.device,
             "data.workers": args.workers, "eval.batch_size": args.batch_size, "train.seed": args.seed,
             "train.progress": False if args.no_progress else None,
             "distill.teacher_runtime": args.teacher_runtime}
    cfg = build_config(DistillConfig, args.config, flags, args.override)
    if not cfg.data.root and not cfg.data.train:
        raise UserError("cache needs --data ROOT")
    if args.views is None or args.out is None:
        raise UserError("cache needs --views N and --out DIR")
    m = build_cache(cfg, args.views, args.top_k, args.out, mix=args.view == "funmatch")
    print(f"cached {m['views']} view(s) x {m['data']['n']} images, top-{m['k']}: "
          f"{m['bytes_per_image']:.0f} bytes per image -> {args.out}")
    return 0


#: MineConfig fields that are also flags of `kdistill ssld` (as ssld.<field>)
SSLD_MINE_FLAGS = ("top_k", "min_prob", "phash_threshold", "embed_threshold")


def ssld_config(args: argparse.Namespace):
    from .engine.ssld import SSLDConfig

    return train_config(args, SSLDConfig, {
        "distill.teachers": args.teacher, "ssld.pool": args.pool,
        **{f"ssld.{name}": getattr(args, name) for name in SSLD_MINE_FLAGS},
        "ssld.dedup_against": args.dedup_against, "ssld.finetune_epochs": args.finetune_epochs,
        "ssld.losses": args.loss, "ssld.unlabeled_fraction": args.unlabeled_fraction})


def cmd_ssld(args: argparse.Namespace) -> int:
    from .engine.ssld import ssld

    _print_summary(in_run_folder(ssld_config(args), ssld))
    return 0


def _print_summary(summary: dict) -> None:
    from . import distributed as dist

    if not dist.is_main():
        return
    best = summary.get("best") or {}
    line = f"done: {summary['out']}  epochs {summary['epochs']}"
    if best:
        line += f"  best epoch {summary['best_epoch']}: top1 {best['top1']:.4f}  mpa {best['mpa']:.4f}"
        if "agreement" in best:
            line += f"  agreement {best['agreement']:.4f}"
    print(line)


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import EvalConfig, eval_workers, from_args
    from .engine.run import evaluate_run

    if not args.data:
        raise UserError("eval needs --data ROOT (the data to evaluate on)")
    ec = from_args(EvalConfig, args)
    summary, report = evaluate_run(args.run, args.data, ec.split, ec.tta, ec.batch_size,
                                   eval_workers(args.workers, args.device), args.device, args.report, args.teacher or [],
                                   args.teacher_runtime)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['checkpoint']} on {ec.split}{' (TTA)' if ec.tta else ''}: "
              f"top1 {summary['top1']:.4f}  top5 {summary['top5']:.4f}  mpa {summary['mpa']:.4f}  "
              f"n {summary['n']}" + (f"  agreement {summary['agreement']:.4f}  KL to teacher "
                                     f"{summary['kl_to_teacher']:.4f}" if "agreement" in summary else ""))
        print(f"report: {report}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from .engine.pack import PackConfig, pack

    cfg = PackConfig(source=args.source, out=args.out, shard_size=args.shard_size,
                     max_shard_bytes=args.max_shard_bytes, pool=args.pool, workers=args.workers,
                     class_map=args.class_map, progress=not args.no_progress)
    s = pack(cfg)
    splits = ", ".join(f"{name} {v['samples']} ({v['shards']} shards)" for name, v in s["splits"].items())
    line = f"packed {splits} -> {s['out']}: {s['bytes'] / 1e6:.1f} MB"
    if s["written_now"]:
        line += f", {s['written_now']} samples in {s['seconds']:.1f} s ({s['images_per_s']:.0f} images/s, {s['workers']} workers)"
    if s["already_done"]:
        line += f"; {s['already_done']} were already packed"
    if s["skipped"]:
        line += f"; {s['skipped']} unreadable files left out (listed in _pack.json)"
    print(line)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "models":
        from .models import list_models
        from .models.describe import annotate

        groups = list_models(args.pattern)
        if args.pattern and not any(groups.values()):
            raise UserError(f"no model name matches '{args.pattern}' (a bare word matches anywhere in "
                            "a name; wildcards work too, e.g. 'res*18')")
        for source, names in groups.items():
            if args.pattern and not names:
                continue
            if args.pattern or source == "zoo":
                print(f"# {source} ({len(names)})" + ("; a bare name picks the zoo first, then timm, "
                                                      "then torchvision" if source == "zoo" else ""))
                for row in annotate(source, names):
                    print(row)
            else:
                print(f"# {source}: {len(names)} models; filter with a word or a pattern, "
                      f"e.g. `kdistill list models resnet`")
    elif args.what == "losses":
        from .losses import LOSSES

        for name in LOSSES.names(args.pattern):
            spec = LOSSES.get(name)
            params = ", ".join(f"{k}={v}" for k, v in spec.params().items())
            flags = "label-free" if spec.label_free else "needs labels"
            print(f"{name:8s} {spec.family:9s} {flags:12s} {spec.summary}" + (f" [{params}]" if params else ""))
    elif args.what == "recipes":
        from .config import list_recipes

        for path, cmd in list_recipes(args.pattern):
            print(f"{path}\n    {cmd}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, args.data, quick=args.quick, progress=not args.no_progress)
    return 0


# ------------------------------------------------------------------ parser


# what Ctrl-C tells the user, per subcommand (set_defaults(on_interrupt=...)); for RESUME,
# main() says instead whether the run folder holds a completed epoch (resume_hint)
RESUME = "each completed epoch is saved in the run folder (continue with --resume --out DIR)"
RERUN = "finished work is kept (run the same command again to continue)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kdistill", description="Knowledge distillation for image classifiers: "
                "train a teacher, distil a small student, ship it.")
    from . import __version__
    from .config import DataConfig, EvalConfig, TrainConfig, add_flags, workers_flag

    p.add_argument("--version", action="version", version=f"kdistill {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a classifier (teacher or baseline student)")
    add_train_args(t)
    t.set_defaults(func=cmd_train, on_interrupt=RESUME)

    ds = sub.add_parser("distill", help="distil a student from one or several teachers (or itself)")
    add_train_args(ds)
    add_distill_args(ds)
    ds.set_defaults(func=cmd_distill, on_interrupt=RESUME)

    from .mining.cli import MineConfig, add_mine_parser

    add_mine_parser(sub)
    from .deploy.cli import add_deploy_parsers

    add_deploy_parsers(sub)
    from .report.cli import add_report_parser

    add_report_parser(sub)

    c = sub.add_parser("cache", help="store a teacher's soft labels for N augmented views of the data")
    c.add_argument("--teacher", action="append", metavar="RUN_OR_CKPT", help="repeatable: ensemble")
    add_teacher_runtime(c)
    c.add_argument("--data", metavar="ROOT")
    c.add_argument("--views", type=int, metavar="N", help="augmented views per image")
    c.add_argument("--top-k", type=int, default=10, metavar="K", help="probabilities kept per view")
    c.add_argument("--view", choices=["consistent", "funmatch"], default="consistent",
                   help="funmatch: also store a mixup partner and lambda per view")
    c.add_argument("--out", metavar="DIR")
    c.add_argument("--batch-size", type=int)
    c.add_argument("--workers", type=workers_flag, help="DataLoader worker processes (a count or auto)")
    c.add_argument("--device")
    c.add_argument("--seed", type=int)
    c.add_argument("--no-progress", action="store_true")
    add_config_args(c)
    c.set_defaults(func=cmd_cache, on_interrupt=RERUN)

    sl = sub.add_parser("ssld", help="SSLD: mine unlabeled images, distil on labeled + mined, fine-tune")
    add_train_args(sl)
    sl.add_argument("--teacher", action="append", metavar="RUN_OR_CKPT", help="the mining and teaching model")
    sl.add_argument("--pool", metavar="DIR_OR_LIST", help="unlabeled images to mine")
    add_flags(sl, MineConfig, SSLD_MINE_FLAGS, defaults=False)  # --top-k, --min-prob, ...
    sl.add_argument("--dedup-against", action="append", metavar="DIR_OR_LIST",
                    help="evaluation images whose near-copies are removed (default: the data's val/ and test/)")
    sl.add_argument("--loss", action="append", metavar="NAME[:WEIGHT]", help="distill-stage terms (default kd:1.0 at T = 4, ssld.loss_params)")
    sl.add_argument("--unlabeled-fraction", type=float, metavar="F", help="share of mined images per batch")
    sl.add_argument("--finetune-epochs", type=int, help="epochs of the labeled-only fine-tune (0: none)")
    sl.set_defaults(func=cmd_ssld, on_interrupt=RERUN)

    from .engine.pack import DEFAULT_SHARD_SIZE as PACK_SHARD_SIZE
    from .engine.pack import MAX_BYTES_HELP as PACK_BYTES_HELP
    from .engine.pack import SHARD_SIZE_HELP as PACK_SIZE_HELP

    pk = sub.add_parser("pack", help="write a data root, list file or image pool as WebDataset shards")
    pk.add_argument("source", metavar="ROOT_OR_LIST_OR_POOL",
                    help="folder with train/ [val/ test/ unlabeled/], a list file (its val/test "
                         "lists beside it), fashion-mnist, or unlabeled images (with --pool, or "
                         "a folder without subfolders)")
    pk.add_argument("--out", metavar="DIR", help="folder for <split>-NNNNNN.tar and _info.json")
    pk.add_argument("--shard-size", type=int, default=PACK_SHARD_SIZE, metavar="N", help=PACK_SIZE_HELP)
    pk.add_argument("--max-shard-bytes", default="512MiB", metavar="SIZE", help=PACK_BYTES_HELP)
    pk.add_argument("--pool", action="store_true",
                    help="the source is unlabeled images (a nested folder or a list of paths): "
                         "one split 'unlabeled', no labels")
    pk.add_argument("--workers", type=workers_flag, default="auto",
                    help="processes reading, checking and writing shards, one shard each (a count; "
                         "0 or 1: this process alone; auto: the CPUs available, at most 8)")
    pk.add_argument("--class-map", metavar="FILE", help="'<id> <name>' lines naming a list file's classes")
    pk.add_argument("--no-progress", action="store_true", help="no progress bar")
    pk.set_defaults(func=cmd_pack, on_interrupt=RERUN)

    e = sub.add_parser("eval", help="top-1/top-5/MPA, per-class accuracy and confusion matrix")
    e.add_argument("run", metavar="RUN_OR_CKPT")
    e.add_argument("--data", metavar="ROOT")
    add_flags(e, EvalConfig)  # --split, --tta, --batch-size
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--workers", type=workers_flag, default=DataConfig.workers,
                   help="DataLoader worker processes (a count or auto)")
    e.add_argument("--device", default=TrainConfig.device, help="auto, cpu, cuda, cuda:N")
    e.add_argument("--report", metavar="DIR", help="report folder (default beside the checkpoint)")
    e.add_argument("--teacher", action="append", metavar="RUN_OR_CKPT",
                   help="also report student-teacher agreement and KL (repeatable: ensemble)")
    add_teacher_runtime(e, "auto")
    e.set_defaults(func=cmd_eval)

    ls = sub.add_parser("list", help="list models, losses or recipes")
    ls.add_argument("what", choices=["models", "losses", "recipes"])
    ls.add_argument("pattern", nargs="?", help="shell wildcard, e.g. 'resnet*'")
    ls.set_defaults(func=cmd_list)

    d = sub.add_parser("demo", help="teacher vs student on Fashion-MNIST in a few minutes")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data", default="fashion-mnist")
    d.add_argument("--quick", action="store_true", help="a smaller, faster run (smoke test)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)
    return p


#: the run folder of the command in progress, for what Ctrl-C says (see set_run_folder)
_run_folder: Path | None = None


def set_run_folder(out: str | Path | None) -> None:
    """Record the folder the running command trains in, once it is fixed (``in_run_folder``),
    so that Ctrl-C can say whether an epoch was saved there; ``--out`` is used without it."""
    global _run_folder
    _run_folder = Path(out) if out else None


def resume_hint(out: Path | None) -> str:
    """What Ctrl-C says of run folder ``out``: saved epochs and how to continue, or nothing saved."""
    if out is None:
        return RESUME
    if (out / "last.pt").is_file() or any(out.glob("*/last.pt")):  # born-again's gen<g>/
        return f"the last completed epoch is saved in {out} (continue with --resume --out {out})"
    return f"no epoch had completed, so nothing was saved in {out} (run the same command again to start it)"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    args = None
    set_run_folder(None)
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KdistillError as err:
        print(f"kdistill: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # e.g. `kdistill predict ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", "")
        if hint == RESUME:
            hint = resume_hint(_run_folder or (Path(args.out) if getattr(args, "out", None) else None))
        print(f"kdistill: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
