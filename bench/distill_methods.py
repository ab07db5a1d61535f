"""Distillation methods on CIFAR-10 over several seeds, the last epoch reported (issue 16, item 4).

    .venv/bin/python bench/distill_methods.py [--seeds 3] [--epochs 4] [--student resnet8]
        [--methods baseline,kd,dkd,mgd] [--teacher RUN_OR_CKPT] [--throughput]

Teacher: a resnet56 trained on all of CIFAR-10 train by bench/train_baselines.py if one is
cached on this machine, else the resnet20 that bench/ssld.py trains on half A of train (run
``bench/ssld.py --only teacher`` first); its last checkpoint either way, never the one best on
val. Every arm trains on the full training set (50,000 images) for the same epochs with the
shipped recipe ``cifar/<method>_resnet56_resnet20`` (student and teacher overridden; baseline:
``cifar/resnet20_baseline``), ``train.amp=auto``; seeds change initialisation and batch order.
Val top-1 is the last epoch's: val selects nothing. Runs are cached under
``$KDISTILL_BENCH_CACHE/distill`` (default ~/.cache/kdistill-bench/distill), resumed after a
kill; results go to bench/results/distill_methods.json and BENCHMARKS.md after every run.
``--throughput`` also measures each method's training img/s against a plain PyTorch KD loop,
interleaved in one process.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CACHE, CIFAR, LONG_CACHE, RESULTS, ensure_run, fmt_mean_std, machine, mean_std,  # noqa: E402
                    memoize_splits, run_record, save_result, today, update_section)


def find_teacher(explicit: str | None) -> tuple[str, str, str]:
    """(checkpoint, short tag, description): --teacher, else a cached resnet56, else
    bench/ssld.py's resnet20."""
    if explicit:
        return explicit, Path(explicit).stem, f"`{explicit}` (given)"
    for root in (LONG_CACHE, CACHE):
        run = root / "cifar" / "resnet56"
        if (run / "summary.json").is_file():
            return str(run / "last.safetensors"), "resnet56", (f"resnet56 on all of CIFAR-10 train (bench/train_baselines.py, "
                                                   f"`{run}`, last epoch)")
    ckpt = LONG_CACHE / "ssld" / "teacher" / "last.safetensors"
    if (ckpt.parent / "summary.json").is_file():
        return str(ckpt), "resnet20A", (f"resnet20 trained 30 epochs on half A of CIFAR-10 train (25,000 images) by "
                           f"bench/ssld.py (`{ckpt}`, last epoch); the students train on all 50,000")
    raise SystemExit("no teacher: train one with `python bench/ssld.py --only teacher` "
                     "(or bench/train_baselines.py for a resnet56), or pass --teacher")


def arm_args(method: str, student: str, teacher: str) -> tuple[str, list[str]]:
    common = ["--data", CIFAR, "--model", student]
    if method == "baseline":
        return "train", ["-c", "cifar/resnet20_baseline", *common]
    # the recipes pair resnet layer names; other students take the default pairs
    extra = [] if student.startswith("resnet") else ["-o", "distill.feature_pairs=[]"]
    return "distill", ["-c", f"cifar/{method}_resnet56_resnet20", "--teacher", teacher, *common, *extra]


def recipe_terms(out: Path) -> str:
    """The loss terms (and warm-ups) a run actually used, from its config.yaml."""
    d = (yaml.safe_load((out / "config.yaml").read_text()) or {}).get("distill") or {}
    terms = ", ".join(d.get("losses") or ["ce"])
    warm = d.get("warmup_epochs") or {}
    return terms + (f"; warm-up {', '.join(f'{k} {v} epochs' for k, v in warm.items())}" if warm else "")


def throughput(student: str, teacher_ckpt: str, methods: list[str], steps: int) -> dict:
    """img/s of each method's kdistill loop and of a plain PyTorch KD loop, interleaved."""
    import torch
    from throughput import alternate, kdistill_loop, plain_loop

    memoize_splits()

    from kdistill.cli import build_parser, distill_config
    from kdistill.data.datasets import train_dataset
    from kdistill.data.loader import EpochLoader
    from kdistill.engine.distill import build_method
    from kdistill.engine.run import prepare
    from kdistill.engine.trainer import Trainer
    from kdistill.models import create_model
    from kdistill.models.checkpoint import load_model

    def cfg_for(method):
        command, args = arm_args(method, student, teacher_ckpt)
        args = [command, *args, "--out", str(CACHE / "throughput_distill"), "--resume", "--no-progress",
                "-o", f"train.max_steps_per_epoch={steps}"]
        return distill_config(build_parser().parse_args(args))

    ctx0 = prepare(cfg_for("kd"))

    def factory(method):
        def make():
            ctx = prepare(cfg_for(method))
            m, crop = build_method(ctx, ctx.cfg.distill)
            loader = EpochLoader(train_dataset(ctx.cfg.data, ctx.splits.train, ctx.splits.native_size, crop),
                                 ctx.cfg.train.batch_size, ctx.cfg.data.workers, ctx.cfg.train.seed)
            return Trainer(ctx.cfg, m, loader, None, ctx.device, ctx.out, ctx.classes, ctx.preprocessing)
        return make

    teacher, _ = load_model(teacher_ckpt)
    teacher = teacher.to(memory_format=torch.channels_last)
    pp = ctx0.preprocessing

    def plain():
        s = create_model(student, 10).to(memory_format=torch.channels_last)
        return plain_loop(ctx0.splits.train, s, pp.mean, pp.std, steps, 128, 2, teacher=teacher)

    fns = {"plain_kd": plain, **{m: (lambda m=m: kdistill_loop(factory(m))) for m in methods if m != "baseline"}}
    return alternate(fns, rounds=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--methods", default="baseline,kd,dkd,mgd")
    ap.add_argument("--teacher", help="checkpoint or run folder (default: see above)")
    ap.add_argument("--cache", default=str(LONG_CACHE / "distill"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra -o for every run")
    ap.add_argument("--throughput", action="store_true", help="also measure img/s per method")
    ap.add_argument("--steps", type=int, default=25, help="steps per throughput measurement")
    ap.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md and bench/results alone")
    args = ap.parse_args()
    methods = args.methods.split(",")
    teacher, tag, described = find_teacher(args.teacher)
    root = Path(args.cache) / f"{tag}-{args.student}-e{args.epochs}"
    result = {"date": today(), "machine": machine(), "epochs": args.epochs, "student": args.student,
              "teacher": teacher, "teacher_described": described, "seeds": args.seeds, "cache": str(root),
              "runs": {f"{m}-s{s}": None for s in range(args.seeds) for m in methods}, "recipes": {}}
    old = RESULTS / "distill_methods.json"
    if old.is_file():  # throughput measured earlier is kept, with its own date, until remeasured
        prev = json.loads(old.read_text())
        if prev.get("throughput"):
            result["throughput"] = prev["throughput"]
            result["throughput_date"] = prev.get("throughput_date", prev.get("date"))
            result["throughput_pair"] = prev.get("throughput_pair", "resnet56 -> resnet20")
    extra = [x for kv in args.set for x in ("-o", kv)]
    for s in range(args.seeds):
        for m in methods:
            command, a = arm_args(m, args.student, teacher)
            out = root / f"{m}-s{s}"
            ensure_run(command, out, args.epochs, [*a, "--seed", str(s), *extra])
            result["runs"][f"{m}-s{s}"] = run_record(out)
            result["recipes"][m] = recipe_terms(out)
            if not args.no_write:
                save_result("distill_methods", result)
                write_section(result)
    if args.throughput:
        result["throughput"] = throughput(args.student, teacher, methods, args.steps)
        result["throughput_date"], result["throughput_pair"] = today(), f"{tag} -> {args.student}"
    if not args.no_write:
        save_result("distill_methods", result)
    write_section(result, write=not args.no_write)


def write_section(r: dict, write: bool = True) -> None:
    methods = list(dict.fromkeys(name.rpartition("-s")[0] for name in r["runs"]))
    recs = {m: [v for n, v in r["runs"].items() if n.rpartition("-s")[0] == m and v] for m in methods}
    base = [v["top1"] for v in recs.get("baseline", [])]
    done = sum(len(v) for v in recs.values())
    lines = [f"Written {r['date']} on {r['machine']} by `python bench/distill_methods.py --seeds {r['seeds']}` "
             f"({done} of {len(r['runs'])} runs done; cached in `{r['cache']}`).",
             f"Teacher: {r['teacher_described']}. Student {r['student']}, all 50,000 training images, "
             f"{r['epochs']} epochs, SGD + cosine, batch 128, the shipped recipes; seeds 0 to {r['seeds'] - 1} change "
             "initialisation and batch order. Val top-1 is the last epoch's on CIFAR-10 val; no checkpoint is "
             "chosen on val (nor on any split it is reported on).", "",
             "| method | loss terms (recipe) | seeds | val top-1, last epoch | val MPA | vs baseline (means) | "
             "agreement | KL to teacher | precision | train img/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        v = recs[m]
        if not v:
            lines.append(f"| {m} | | 0 of {r['seeds']} | pending | | | | | | |")
            continue
        t1 = [x["top1"] for x in v]
        diff = f"{100 * (mean_std(t1)[0] - mean_std(base)[0]):+.1f} points" if base and m != "baseline" else "-"
        agree = [x["agreement"] for x in v if x.get("agreement") is not None]
        kl = [x["kl_to_teacher"] for x in v if x.get("kl_to_teacher") is not None]
        rate = sum(x["images_per_s"] or 0 for x in v) / len(v)
        lines.append(f"| {m} | {r['recipes'].get(m, '')} | {len(v)} of {r['seeds']} | {fmt_mean_std(t1)} | "
                     f"{fmt_mean_std([x['mpa'] for x in v])} | {diff} | {fmt_mean_std(agree) if agree else '-'} | "
                     f"{fmt_mean_std(kl) if kl else '-'} | {', '.join(sorted({p for x in v for p in x['precision']}))} "
                     f"| {rate:.0f} |")
    lines.append("")
    if len(base) == r["seeds"]:
        sb = mean_std(base)[1] or 0
        for m in methods[1:]:
            t1 = [x["top1"] for x in recs[m]]
            if len(t1) == r["seeds"]:
                mm, sm = mean_std(t1)
                d = mm - mean_std(base)[0]
                call = "larger than" if abs(d) > sb + (sm or 0) else "within"
                lines.append(f"- {m} − baseline: {100 * d:+.1f} points on the {r['seeds']}-seed means, {call} the "
                             f"spread (standard deviations {100 * sb:.1f} and {100 * (sm or 0):.1f} points).")
        lines.append("")
    lines.append("(img/s columns come from runs that may have shared the 2 cores with other work.)")
    speed = r.get("throughput") or {}
    if speed:
        plain = speed["plain_kd"]
        lines += ["", f"Throughput on {r.get('throughput_pair')}, measured {r.get('throughput_date')} in one process "
                  "(best of 2 interleaved rounds; the plain loop is a hand-written PyTorch KD loop on the same data, "
                  "AMP and channels_last):", "", "| loop | img/s | ÷ plain PyTorch KD |", "|---|---|---|"]
        lines += [f"| {name} | {v:.0f} | {v / plain:.2f} |" for name, v in speed.items()]
    text = "## Distillation methods (CIFAR-10)\n\n" + "\n".join(lines)
    print(text, flush=True)
    if write:
        update_section("distill-methods", text)


if __name__ == "__main__":
    main()
