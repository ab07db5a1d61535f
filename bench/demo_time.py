"""How long the first run takes: `kdistill demo` (what `make demo` runs after install), from
scratch, timed wall-clock, with its table.

    .venv/bin/python bench/demo_time.py                  # this CPU as it is
    .venv/bin/python bench/demo_time.py --as-avx2        # also as a CPU without native bf16

``--as-avx2`` caps PyTorch's kernels at AVX2 (``ATEN_CPU_CAPABILITY=avx2``) and oneDNN's at
AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``), so bf16 would be emulated there and ``train.amp=auto``
picks fp32, as on a laptop or server with AVX2 only. It runs the same instructions such a CPU
has, on this CPU's cores and caches: a simulation, named as such in the results.

Targets (issue 13): under 4 minutes as AVX2/fp32 on 2 cores, and the KD student beats the
baseline student in the demo's table. Results: bench/results/demo_time.json and the "demo"
section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, ROOT, machine, save_result, today, update_section  # noqa: E402

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
TARGET_S = 240


def probe(env: dict) -> dict:
    code = ("import json, torch; from kdistill.engine import precision as p; "
            "print(json.dumps({'cpu_capability': p.cpu_capability(), 'native_bf16': p.cpu_native_bf16(), "
            "'precision': p.resolve(torch.device('cpu')).name}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def time_demo(name: str, extra_env: dict) -> dict:
    out = CACHE / "demo-time" / name
    shutil.rmtree(out, ignore_errors=True)  # from scratch: the demo reuses finished arms
    env = {**os.environ, **extra_env}
    info = probe(env)
    cmd = [sys.executable, "-m", "kdistill", "demo", "--out", str(out), "--no-progress"]
    print("$", " ".join(f"{k}={v}" for k, v in extra_env.items()), " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    rows = json.loads((out / "demo.json").read_text())
    top1 = {r["arm"]: r["top1"] for r in rows}
    return {"mode": name, **info, "seconds": round(seconds, 1), "rows": rows,
            "kd_gain": top1["kd-student"] - top1["student"],
            "meets_time": seconds < TARGET_S, "kd_beats_student": top1["kd-student"] > top1["student"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--as-avx2", action="store_true", help="also time it as a CPU without native bf16")
    ap.add_argument("--only-avx2", action="store_true", help="time it only as a CPU without native bf16")
    args = ap.parse_args()
    modes = ([] if args.only_avx2 else [("this CPU", {})]) + (
        [("as AVX2 (simulated)", AVX2)] if args.as_avx2 or args.only_avx2 else [])
    runs = [time_demo(name, env) for name, env in modes]
    save_result("demo_time", {"date": today(), "machine": machine(), "runs": runs})
    lines = [f"Measured {today()} on {machine()} by `python bench/demo_time.py"
             + (" --as-avx2" if args.as_avx2 else "") + "`: `kdistill demo` from scratch (what `make demo` "
             "runs once installed), wall-clock. \"As AVX2\" caps PyTorch and oneDNN at AVX2 on this CPU "
             "(a simulation of a CPU without native bf16). Accuracy: val top-1 of each arm's last epoch, "
             "5,000 Fashion-MNIST val images.", "",
             "| CPU | precision (auto) | wall time | target < 4 min | teacher | student | KD student | KD - student |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        t = {row["arm"]: row["top1"] for row in r["rows"]}
        lines.append(f"| {r['mode']}: {r['cpu_capability']}, native bf16 {'yes' if r['native_bf16'] else 'no'} "
                     f"| {r['precision']} | {r['seconds'] / 60:.1f} min ({r['seconds']:.0f} s) "
                     f"| {'met' if r['meets_time'] else 'missed'} | {t['teacher']:.4f} | {t['student']:.4f} "
                     f"| {t['kd-student']:.4f} | {r['kd_gain'] * 100:+.2f} points |")
    update_section("demo", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
