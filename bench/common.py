"""Shared helpers for bench/ scripts: reusable cached runs, machine info, BENCHMARKS.md sections."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from kdistill.models.profile import machine  # noqa: F401 - one machine line for bench/ and model cards

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("KDISTILL_BENCH_CACHE", ROOT / "bench" / "cache"))
# Multi-hour runs (teachers, multi-seed arms) live outside the work tree, so that no checkout,
# clean or copy of the repository touches them; KDISTILL_BENCH_CACHE overrides both.
LONG_CACHE = Path(os.environ.get("KDISTILL_BENCH_CACHE", Path.home() / ".cache" / "kdistill-bench"))
CIFAR = os.environ.get("KDISTILL_CIFAR", str(ROOT.parent / "shared" / "data" / "cifar10"))
BENCHMARKS = ROOT / "BENCHMARKS.md"
RESULTS = ROOT / "bench" / "results"


def today() -> str:
    return _dt.date.today().isoformat()


def kdistill(*args: str, log: Path | None = None) -> None:
    """Run the kdistill CLI in a subprocess (its output to ``log``); raise on failure."""
    cmd = [sys.executable, "-m", "kdistill", *args]
    print("$", " ".join(cmd), flush=True)
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    else:
        proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}" + (f"; see {log}" if log else ""))


def ensure_run(command: str, out: Path, epochs: int, args: list[str]) -> dict:
    """Train ``out`` unless already finished; resume it when interrupted (cached in CACHE;
    kdistill itself refuses a resume with other settings)."""
    summary = out / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("epochs") == epochs:
        print(f"reusing finished run {out}", flush=True)
        return json.loads(summary.read_text())
    kdistill(command, *args, "--out", str(out), "-o", f"train.epochs={epochs}", "--no-progress",
             *(["--resume"] if (out / "last.pt").exists() else []), log=out.with_suffix(".log"))
    return json.loads(summary.read_text())


def distill_trainer(argv: list[str]):
    """The Trainer that ``kdistill ARGV`` (a distill command) would run, without a val
    loader, for timing capped epochs (``train_epoch``). Pinned memory and persistent workers
    on CUDA, as ``kdistill`` itself. Works with a baseline checkout from before the teacher
    abstraction and the data stages (bench/throughput.py --baseline-src)."""
    from kdistill.cli import build_parser, distill_config
    from kdistill.data.loader import EpochLoader
    from kdistill.engine import distill
    from kdistill.engine.run import prepare
    from kdistill.engine.trainer import Trainer
    try:
        from kdistill.data.datasets import train_dataset
    except ImportError:  # before the data stages were split
        from kdistill.data.loader import train_dataset

    cfg = distill_config(build_parser().parse_args(argv))
    ctx = prepare(cfg)
    if hasattr(distill, "build_teacher"):
        teacher = distill.build_teacher(ctx, cfg.distill)
        method, crop = distill.build_method(ctx, cfg.distill, teacher)
    else:  # before the teacher abstraction
        method, crop = distill.build_method(ctx, cfg.distill)
        teacher = method.teachers
    ds = distill.train_views(ctx, cfg.distill, teacher, crop) or train_dataset(
        cfg.data, ctx.splits.train, ctx.splits.native_size, crop)
    cuda = ctx.device.type == "cuda"
    loader = EpochLoader(ds, cfg.train.batch_size, cfg.data.workers, cfg.train.seed,
                         **({"pin_memory": True, "persistent": True} if cuda else {}))
    return Trainer(cfg, method.to(ctx.device), loader, None, ctx.device, ctx.out, ctx.classes, ctx.preprocessing)


def update_section(name: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- name -->`` markers in BENCHMARKS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


def fit_steps(target: int, per_epoch: int) -> tuple[int, int]:
    """``(epochs, steps per epoch)`` whose product is closest to ``target`` optimizer steps,
    with at most ``per_epoch`` steps (the loader's full batches) per epoch; ties: fewer epochs.
    Arms over datasets of different sizes then see the same number of images."""
    first = max(math.ceil(target / per_epoch), 1)
    plans = [(e, min(per_epoch, max(round(target / e), 1))) for e in range(max(first - 1, 1), first + 4)]
    return min(plans, key=lambda es: (abs(es[0] * es[1] - target), es[0]))


def run_record(out: Path) -> dict | None:
    """A finished run's last-epoch val metrics, images seen, precision and time, read from its
    ``summary.json`` and ``metrics.jsonl``; None while it has not finished. Nothing here is
    chosen on the val split: ``final`` is the last epoch's evaluation."""
    if not (out / "summary.json").is_file():
        return None
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    final = s.get("final") or {}
    return {"top1": final.get("top1"), "mpa": final.get("mpa"), "agreement": final.get("agreement"),
            "kl_to_teacher": final.get("kl_to_teacher"), "epochs": s["epochs"],
            "images": sum(round(r["train.images_per_s"] * r["train.seconds"]) for r in rows),
            "precision": sorted({_precision(r) for r in rows}),
            "train_seconds": round(sum(r["train.seconds"] for r in rows)),
            "images_per_s": s.get("train_images_per_s"),
            "finished": _dt.datetime.fromtimestamp((out / "summary.json").stat().st_mtime).date().isoformat()}


def _precision(row: dict) -> str:
    """An epoch's precision with the CPU capability it ran on (``bf16 on AVX512``), as its
    metrics.jsonl row logged them: speed columns beside it then name their machine."""
    cap = row.get("cpu_capability")
    return f"{row.get('precision', '?')} on {cap}" if cap else row.get("precision", "?")


def run_progress(out: Path) -> str:
    """'done', 'epoch i of a run in progress or interrupted', or 'pending'."""
    if (out / "summary.json").is_file():
        return "done"
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        return f"interrupted or running after epoch {sum(1 for ln in metrics.read_text().splitlines() if ln.strip())}"
    return "pending"


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def fmt_mean_std(values: list[float]) -> str:
    if not values:
        return "pending"
    m, sd = mean_std(values)
    return f"{m:.4f}" if sd is None else f"{m:.4f} ± {sd:.4f}"


def save_result(name: str, obj) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(obj, indent=2) + "\n")


def load_result(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def memoize_splits() -> None:
    """Decode each dataset once per process when a benchmark builds many trainers."""
    import kdistill.engine.run as run_mod

    orig, memo = run_mod.open_splits, {}

    def cached(dc, *a, **k):
        key = (dc.root, dc.train, dc.val, dc.max_train_images, dc.max_val_images, dc.unlabeled)
        if key not in memo:
            memo[key] = orig(dc, *a, **k)
        return memo[key]

    run_mod.open_splits = cached


def run_stages(bench, args, publish, script: str) -> None:
    """The stage runner of a resumable multi-run benchmark (bench/ssld.py, bench/patience.py):
    ``--list`` prints each stage's state, ``--only`` picks stages by fnmatch patterns,
    ``--report`` only publishes; otherwise the stages run in order under a lock on the
    cache, a failed one does not stop the rest, and ``publish(bench, names, no_write)``
    rewrites the outputs after every stage. ``bench`` has ``work``, ``stages()``,
    ``progress(name)`` and ``run(name)``."""
    import fcntl
    import fnmatch

    names = bench.stages()
    if args.list:
        width = max(len(n) for n in names) + 2
        for n in names:
            print(f"{n:{width}s} {bench.progress(n)}")
        return
    chosen = names
    if args.only:
        pats = args.only.split(",")
        chosen = [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]
        if not chosen:
            raise SystemExit(f"no stage matches {args.only}; stages: {', '.join(names)}")
    failed = []
    if not args.report:
        lock = open(bench.work / "lock", "w")  # noqa: SIM115 - held until the process ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another {script} is training in {bench.work}; wait for it or use --report")
        for n in chosen:
            print(f"== {today()} stage {n}: {bench.progress(n)}", flush=True)
            try:
                bench.run(n)
            except SystemExit as e:  # a failed stage does not stop the others; rerun to retry it
                print(f"== stage {n} FAILED: {e}", flush=True)
                failed.append(n)
            publish(bench, names, args.no_write)
    publish(bench, names, args.no_write)
    if failed:
        raise SystemExit(f"failed stages: {', '.join(failed)}")
