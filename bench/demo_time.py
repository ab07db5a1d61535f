"""How long the first run takes: `kdistill demo` (what `make demo` runs after install), from
scratch, timed wall-clock, with its table.

    .venv/bin/python bench/demo_time.py                  # this CPU as it is
    .venv/bin/python bench/demo_time.py --as-avx2        # also as a CPU without native bf16

``--as-avx2`` caps PyTorch's kernels at AVX2 (``ATEN_CPU_CAPABILITY=avx2``) and oneDNN's at
AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``), so bf16 would be emulated there and ``train.amp=auto``
picks fp32, as on a laptop or server with AVX2 only. It runs the same instructions such a CPU
has, on this CPU's cores and caches: a simulation, named as such in the results.

    .venv/bin/python bench/demo_time.py --seeds 3       # and the KD gain over seeds, T = 2 and 4

Targets (issues 13 and 18): under 4.5 minutes as AVX2/fp32 on 2 cores, the closing report of
the three arms included (issue 18), and the KD student beats the
baseline student in the demo's table. ``--seeds N`` re-runs the two student arms with seeds
0..N-1 (the demo's own teacher, KD at T = 2 as shipped and at T = 4), to show that the gain
is not one lucky seed. Results: bench/results/demo_time.json and the "demo"
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
from common import CACHE, ROOT, load_result, machine, save_result, today, update_section  # noqa: E402

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
TARGET_S = 270  # 4.5 minutes, the report included


def probe(env: dict) -> dict:
    code = ("import json, torch; from kdistill.engine import precision as p; "
            "print(json.dumps({'cpu_capability': p.cpu_capability(), 'native_bf16': p.cpu_native_bf16(), "
            "'precision': p.resolve(torch.device('cpu')).name}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def time_demo(name: str, extra_env: dict) -> dict:
    out = CACHE / "demo-time" / ("avx2" if extra_env else "native")
    shutil.rmtree(out, ignore_errors=True)  # from scratch: the demo reuses finished arms
    env = {**os.environ, **extra_env}
    info = probe(env)
    cmd = [sys.executable, "-m", "kdistill", "demo", "--out", str(out), "--no-progress"]
    print("$", " ".join(f"{k}={v}" for k, v in extra_env.items()), " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    if not (out / "report.html").is_file():
        raise SystemExit(f"the demo wrote no report in {out}")
    rows = json.loads((out / "demo.json").read_text())
    top1 = {r["arm"]: r["top1"] for r in rows}
    return {"mode": name, **info, "seconds": round(seconds, 1), "rows": rows,
            "kd_gain": top1["kd-student"] - top1["student"],
            "meets_time": seconds < TARGET_S, "kd_beats_student": top1["kd-student"] > top1["student"]}


def seed_sweep(seeds: int, teacher: Path) -> dict:
    """KD student minus baseline student (last-epoch val top-1), per seed and temperature."""
    from kdistill.demo import FULL, KD, arms, demo_config

    work = CACHE / "demo-time" / "seeds"
    size = {**FULL, "progress": False}
    student, kd = [a for a in arms(size, work) if a.name != "teacher"]
    gains: dict[str, list[float]] = {"T=2": [], "T=4": []}
    for seed in range(seeds):
        runs = {}
        for name, arm, extra in (("student", student, []), ("T=2", kd, KD), ("T=4", kd, [
                KD[0], "distill.loss_params={kd: {temperature: 4.0}}"])):
            out = work / f"seed{seed}-{name.replace('=', '')}"
            done = out / "summary.json"
            if not done.is_file():
                shutil.rmtree(out, ignore_errors=True)
                over = [*extra, f"train.seed={seed}"] + ([f"distill.teachers=[{teacher}]"] if extra else [])
                arm.run(demo_config(out, "fashion-mnist", arm, size, over))
            runs[name] = json.loads(done.read_text())["final"]["top1"]
        for t in gains:
            gains[t].append(runs[t] - runs["student"])
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in runs.items()), flush=True)
    return gains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--as-avx2", action="store_true", help="also time it as a CPU without native bf16")
    ap.add_argument("--only-avx2", action="store_true", help="time it only as a CPU without native bf16")
    ap.add_argument("--seeds", type=int, default=0, help="also the KD gain over this many seeds")
    args = ap.parse_args()
    modes = ([] if args.only_avx2 else [("this CPU", {})]) + (
        [("as AVX2 (simulated)", AVX2)] if args.as_avx2 or args.only_avx2 else [])
    runs = [time_demo(name, env) for name, env in modes]
    gains = seed_sweep(args.seeds, CACHE / "demo-time" / ("avx2" if args.only_avx2 else "native") / "teacher") \
        if args.seeds else None
    seeds_date = today()
    if gains is None:  # keep the last seed sweep (its training is what the timed demo runs)
        try:
            old = load_result("demo_time")
        except FileNotFoundError:
            old = {}
        gains, seeds_date = old.get("seed_gains"), old.get("seeds_date", old.get("date"))
        args.seeds = len(next(iter(gains.values()))) if gains else 0
    save_result("demo_time", {"date": today(), "machine": machine(), "runs": runs, "seed_gains": gains,
                              "seeds_date": seeds_date})
    lines = ["## The first run: `make demo` (Fashion-MNIST)", "", f"Measured {today()} on {machine()} by `python bench/demo_time.py"
             + (" --as-avx2" if args.as_avx2 else "") + "`: `kdistill demo` from scratch (what `make demo` "
             "runs once installed), wall-clock. \"As AVX2\" caps PyTorch and oneDNN at AVX2 on this CPU "
             "(a simulation of a CPU without native bf16). Accuracy: val top-1 of each arm's last epoch, "
             "5,000 Fashion-MNIST val images.", "",
             "| CPU | precision (auto) | wall time | target < 4.5 min (with the report) | teacher | student | KD student | KD - student |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        t = {row["arm"]: row["top1"] for row in r["rows"]}
        lines.append(f"| {r['mode']}: {r['cpu_capability']}, native bf16 {'yes' if r['native_bf16'] else 'no'} "
                     f"| {r['precision']} | {r['seconds'] / 60:.1f} min ({r['seconds']:.0f} s) "
                     f"| {'met' if r['meets_time'] else 'missed'} | {t['teacher']:.4f} | {t['student']:.4f} "
                     f"| {t['kd-student']:.4f} | {r['kd_gain'] * 100:+.2f} points |")
    if gains:
        import statistics

        lines += ["", f"KD student minus baseline student over seeds 0-{args.seeds - 1} on this CPU (measured "
                  f"{seeds_date}), precision "
                  "auto (the timed run's teacher, same recipe, last-epoch val top-1; the demo ships T = 2; "
                  "T = 2 was picked after an earlier sweep on these same val images, so its edge over T = 4 "
                  "is selected on the reported split and is no evidence that T = 2 is better in general):", "",
                  "| KD temperature | per seed (points) | mean ± sd |", "|---|---|---|"]
        for t, g in gains.items():
            sd = statistics.stdev(g) * 100 if len(g) > 1 else 0.0
            lines.append(f"| {t[2:]} | {', '.join(f'{100 * v:+.2f}' for v in g)} | "
                         f"{100 * statistics.mean(g):+.2f} ± {sd:.2f} |")
    update_section("demo", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
