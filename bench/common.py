"""Shared helpers for bench/ scripts: reusable cached runs, machine info, BENCHMARKS.md sections."""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from kdistill.models.profile import machine  # noqa: F401 - one machine line for bench/ and model cards

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("KDISTILL_BENCH_CACHE", ROOT / "bench" / "cache"))
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
    """Train ``out`` unless already finished; resume it when interrupted (cached in CACHE)."""
    from kdistill.engine.run import run_stage

    def start(resume: bool) -> dict:
        kdistill(command, *args, "--out", str(out), "-o", f"train.epochs={epochs}", "--no-progress",
                 *(["--resume"] if resume else []), log=out.with_suffix(".log"))
        return json.loads((out / "summary.json").read_text())

    return run_stage(out, epochs, start, out.name)


def update_section(name: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- name -->`` markers in BENCHMARKS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


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
