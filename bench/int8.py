"""Issue 27 benchmark: int8 students, post-training (PTQ) and quantization-aware (QAT/QAD).

    .venv/bin/python bench/int8.py                 # every stage in order; rerun to continue
    .venv/bin/python bench/int8.py --list          # the stages and how far each got
    .venv/bin/python bench/int8.py --only latency  # comma-separated fnmatch patterns
    .venv/bin/python bench/int8.py --report        # tables and targets from what has finished
    .venv/bin/python bench/int8.py --smoke         # tiny data and schedules, throw-away cache, no write

**latency**: ONNX Runtime (CPU EP, ``ORT_ENABLE_ALL``), 1 thread and all threads, batch 1
and 32: the fp32 export against its PTQ int8 model (``kdistill.deploy.int8.int8_onnx``:
``quant_pre_process`` + ``quantize_static``, QDQ, calibrated on 64 random images: the
weights are random too, which is enough for speed) for the zoo's resnet20 at 32 px and
timm's resnet18 and mobilenetv3_large_100 at 224 px. fp32 and int8 are timed in
alternation (ABAB over ``--rounds`` rounds), each timing the median per-call time of
``--seconds`` of calls; the ratio is fp32 / int8.

**accuracy**: CIFAR-10, ``--train-images`` (stratified) training images, the whole val split
(5,000) for every number. A resnet32 teacher (``--teacher-epochs``) and, per student seed,
a float KD student (``--kd-epochs``, recipe cifar/kd_resnet56_resnet20: kd 0.9 at T = 4 + ce
0.1, SGD, cosine); then from that same float checkpoint, E = ``--epochs`` (5) more epochs of
each arm, all in fp32 (``train.amp=false``: QAT trains in fp32, and so does its reference):

* ``fp32``: KD continued (the reference), lr ``--lr`` (0.01), cosine;
* ``ptq``: ``kdistill export --int8`` of the ``fp32`` arm (512 calibration images);
* ``qad``: ``kdistill distill --qat`` (the same losses and schedule, fake-quantized student);
* ``qat``: ``kdistill train --qat`` (labels only, the same schedule);
* ``labels``: ``kdistill train`` (labels only, fp32, the same schedule): QAT's float
  reference, which tells the cost of quantization apart from the cost of the loss.

Every int8 number is the exported ONNX Runtime int8 model's top-1 on the 5,000 val images
(``kdistill export --int8 --parity-images 5000``); fp32's is the last epoch's val top-1.
resnet20 with seeds 0-2, mobilenetv2 (the zoo's) with seed 0. Targets, on the paired
per-seed differences: QAD - fp32 >= -0.5 points; QAD - QAT > 0 beyond its spread.

Runs live in ``--cache`` ($KDISTILL_BENCH_CACHE/int8, else ~/.cache/kdistill-bench/int8), each
resumable after a kill; results go to bench/results/int8.json and BENCHMARKS.md (section
int8) after every stage.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CIFAR, LONG_CACHE, ensure_run, machine, run_record,  # noqa: E402
                    run_stages, save_result, today, update_section)

LATENCY_MODELS = [("resnet20", 32), ("timm:resnet18", 224), ("timm:mobilenetv3_large_100", 224)]
STUDENTS = [("resnet20", 0), ("resnet20", 1), ("resnet20", 2), ("mobilenetv2", 0)]
RECIPE = "cifar/kd_resnet56_resnet20"
BASELINE = "cifar/resnet20_baseline"  # the same optimizer and augmentation, labels only


def cpu_flags() -> str:
    import torch

    try:
        flags = set(open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        flags = set()
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16") if f in flags]
    return f"{torch.backends.cpu.get_cpu_capability()} ({' '.join(have) or 'flags unknown'})"


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.work = Path(a.cache)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results_file = self.work / "results.json"

    # ---- bookkeeping
    def results(self) -> dict:
        return json.loads(self.results_file.read_text()) if self.results_file.is_file() else {}

    def store(self, key: str, value) -> None:
        d = self.results()
        d[key] = value
        tmp = self.results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(d, indent=1) + "\n")
        os.replace(tmp, self.results_file)

    def stages(self) -> list[str]:
        return ["latency", "profile", "teacher", *[f"{m}-s{s}" for m, s in self.students()]]

    def students(self):
        return STUDENTS[:2] if self.a.smoke else STUDENTS

    def progress(self, name: str) -> str:
        d = self.results()
        if name == "teacher":
            return "done" if run_record(self.work / "teacher") else "pending"
        return "done" if name in d and (name in ("latency", "profile") or "labels" in d[name]) else "pending"

    def run(self, name: str) -> None:
        if name == "latency":
            self.store("latency", latency(self.a))
        elif name == "profile":
            self.store("profile", profile(self.a))
        elif name == "teacher":
            self.teacher()
        else:
            arch, seed = name.rsplit("-s", 1)
            self.store(name, self.student(arch, int(seed)))

    # ---- data and runs
    def data_args(self, train_images: int | None = None) -> list[str]:
        return ["--data", CIFAR, "-o", f"data.max_train_images={train_images or self.a.train_images}",
                *(["-o", f"data.max_val_images={self.a.val_images}"] if self.a.val_images else []),
                "--workers", str(self.a.workers), "--batch-size", str(self.a.batch_size)]

    def teacher(self) -> Path:
        out = self.work / "teacher"
        ensure_run("train", out, self.a.teacher_epochs,
                   ["-c", BASELINE, "--model", "resnet32", *self.data_args(self.a.teacher_train_images), "--seed", "0"])
        return out

    def student(self, arch: str, seed: int) -> dict:
        teacher = str(self.teacher())
        base = self.work / f"{arch}-s{seed}"
        common = [*self.data_args(), "--model", arch, "--seed", str(seed)]
        kd = [*common, "-c", RECIPE, "--teacher", teacher, "-o", "model.channels_last=auto"]
        ensure_run("distill", base / "kd", self.a.kd_epochs, kd)
        ckpt = ["-o", f"model.checkpoint={base / 'kd' / 'last.safetensors'}"]
        cont = ["--lr", str(self.a.lr), "-o", "optim.warmup_epochs=0", "-o", "train.amp=false", *ckpt]
        runs = {"fp32": ("distill", [*kd, *cont]),
                "qad": ("distill", [*kd, *cont, "--qat"]),
                "qat": ("train", [*common, "-c", BASELINE, "-o", "model.channels_last=auto", *cont, "--qat"]),
                "labels": ("train", [*common, "-c", BASELINE, "-o", "model.channels_last=auto", *cont])}
        rec = {"kd": run_record(base / "kd")}
        for arm, (command, args) in runs.items():
            ensure_run(command, base / arm, self.a.epochs, args)
            rec[arm] = run_record(base / arm)
        exports = {"ptq": base / "fp32", "qad": base / "qad", "qat": base / "qat"}
        for arm, run in exports.items():
            rec[f"{arm}_int8"] = self.export(run, base / f"{arm}.int8.onnx")
        rec["commands"] = {arm: f"kdistill {c} " + " ".join(x) + f" -o train.epochs={self.a.epochs}"
                           for arm, (c, x) in runs.items()}
        rec["commands"]["kd"] = "kdistill distill " + " ".join(kd) + f" -o train.epochs={self.a.kd_epochs}"
        return rec

    def export(self, run: Path, out: Path) -> dict:
        from kdistill.deploy.export import export_checkpoint

        res = export_checkpoint(str(run / "last.safetensors"), "onnx", str(out), data=CIFAR,
                                n_images=self.a.val_images or 5000, card=False, int8=True, min_agreement=0.0)
        ag = res["agreement"]
        return {"int8_top1": ag["int8_top1"], "reference_top1": ag["reference_top1"],
                "agreement": ag["top1_agreement"], "n": ag["n"], "kernels": res["kernels"],
                "float_nodes": res["float_nodes"], "bytes": out.stat().st_size,
                "quantization": res["meta"].get("quantization", {}).get("method")}


# ---------------------------------------------------------------- latency


def _time(sess, x, seconds: float) -> float:
    """Median seconds per call over ``seconds`` of calls (after 3 warm-up calls)."""
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(3):
        sess.run(None, feed)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def latency(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from kdistill.data.transforms import Preprocessing
    from kdistill.deploy.export import export_meta, write_onnx
    from kdistill.deploy.int8 import int8_kernels, int8_onnx
    from kdistill.models import create_model, default_preprocessing
    from kdistill.models.onnx import Normalized, ort_session

    work = Path(a.cache) / "latency"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    models = LATENCY_MODELS[:1] if a.smoke else LATENCY_MODELS
    for name, size in models:
        torch.manual_seed(0)
        model = create_model(name, 10 if size == 32 else 1000).eval()
        pp = default_preprocessing(model, False, quiet=True) or Preprocessing(size, (0.5,) * 3, (0.25,) * 3, 1.0)
        pp = Preprocessing(size, pp.mean, pp.std, pp.crop_pct)
        meta = {"arch": model.kdistill_arch, "num_classes": 10 if size == 32 else 1000,
                "classes": [str(i) for i in range(10 if size == 32 else 1000)]}
        emeta = export_meta(meta, pp, "onnx", None)
        stem = name.replace(":", "_")
        fp32, int8 = work / f"{stem}.onnx", work / f"{stem}.int8.onnx"
        if not int8.is_file():
            write_onnx(Normalized(model, pp).eval(), emeta, fp32)
            gen = torch.Generator().manual_seed(0)
            calib = torch.rand(64, 3, size, size, generator=gen).numpy()
            int8_onnx(model, emeta, pp, fp32, lambda: calib, int8, emeta.get("opset", 17))
        kernels = int8_kernels(int8)
        for threads in (1, os.cpu_count()):
            sessions = {"fp32": ort_session(str(fp32), threads), "int8": ort_session(str(int8), threads)}
            for batch in (1, 32):
                x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
                per = {"fp32": [], "int8": []}
                for r in range(a.rounds):
                    for arm in (("fp32", "int8") if r % 2 == 0 else ("int8", "fp32")):
                        per[arm].append(_time(sessions[arm], x, a.seconds))
                med = {k: statistics.median(v) for k, v in per.items()}
                rows.append({"model": name, "size": size, "threads": threads, "batch": batch,
                             "fp32_ms": round(med["fp32"] * 1e3, 3), "int8_ms": round(med["int8"] * 1e3, 3),
                             "speedup": round(med["fp32"] / med["int8"], 2),
                             "fp32_mb": round(fp32.stat().st_size / 2**20, 2),
                             "int8_mb": round(int8.stat().st_size / 2**20, 2),
                             "int8_kernels": kernels.int8, "float_nodes": len(kernels.float_nodes)})
                print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "machine": machine(), "cpu": cpu_flags(), "date": today(),
            "rounds": a.rounds, "seconds_per_timing": a.seconds,
            "command": "python bench/int8.py --only latency"}


def profile(a: argparse.Namespace) -> dict:
    """Where ONNX Runtime spends the time of each latency model, fp32 and int8: its profiler's
    kernel time per op type, 1 thread, batch 8, 10 calls (shares, so a busy machine changes
    them little)."""
    import numpy as np
    import onnxruntime as ort

    work = Path(a.cache) / "latency"
    if not work.is_dir():
        raise SystemExit("run the latency stage first")
    out = {}
    for name, size in (LATENCY_MODELS[:1] if a.smoke else LATENCY_MODELS):
        stem = name.replace(":", "_")
        for prec, path in (("fp32", work / f"{stem}.onnx"), ("int8", work / f"{stem}.int8.onnx")):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.log_severity_level, opts.enable_profiling = 1, 3, True
            opts.profile_file_prefix = str(work / f"profile-{stem}-{prec}")
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            x = np.random.default_rng(0).random((8, 3, size, size), dtype=np.float32)
            for _ in range(10):
                sess.run(None, {sess.get_inputs()[0].name: x})
            trace = Path(sess.end_profiling())
            per_op: dict[str, float] = {}
            for e in json.loads(trace.read_text()):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    per_op[e["args"]["op_name"]] = per_op.get(e["args"]["op_name"], 0) + e["dur"]
            trace.unlink()
            total = sum(per_op.values())
            out[f"{name} {prec}"] = {"ms_per_call": round(total / 10 / 1e3, 2),
                                     "share": {k: round(v / total, 3) for k, v in
                                               sorted(per_op.items(), key=lambda kv: -kv[1])[:8]}}
            print(name, prec, json.dumps(out[f"{name} {prec}"]), flush=True)
    return {"models": out, "machine": machine(), "cpu": cpu_flags(), "date": today(),
            "setting": "ORT profiler kernel time per op type, 1 thread, batch 8, 10 calls",
            "command": "python bench/int8.py --only profile"}


# ---------------------------------------------------------------- report


def pts(x: float | None) -> str:
    return "pending" if x is None else f"{100 * x:+.2f}"


def pts_spread(xs: list[float]) -> str:
    """Mean ± sample standard deviation of differences, in points."""
    m = statistics.mean(xs)
    return f"{100 * m:+.2f}" + (f" ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else "") + " points"


def report(bench: Bench) -> tuple[str, dict]:
    d = bench.results()
    lines = ["## int8 students (`bench/int8.py`)", ""]
    out = {"latency": d.get("latency"), "students": {}}
    lat = d.get("latency")
    if lat:
        lines += [f"Measured {lat['date']} on {lat['machine']}; CPU capability {lat['cpu']}. "
                  f"ONNX Runtime CPU EP, ORT_ENABLE_ALL; median per-call time, fp32 and int8 timed in "
                  f"alternation ({lat['rounds']} rounds of {lat['seconds_per_timing']} s each). "
                  "Random weights; int8 = PTQ (`quant_pre_process` + `quantize_static`, QDQ, u8 activations, "
                  "s8 per-channel weights).", "",
                  "| model | px | threads | batch | fp32 ms | int8 ms | fp32/int8 | MB fp32 → int8 | int8 kernels | float Conv/Gemm left |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in lat["rows"]:
            k = ", ".join(f"{n} {c}" for n, c in sorted(r["int8_kernels"].items()))
            lines.append(f"| {r['model']} | {r['size']} | {r['threads']} | {r['batch']} | {r['fp32_ms']:.2f} | "
                         f"{r['int8_ms']:.2f} | {r['speedup']:.2f}x | {r['fp32_mb']} → {r['int8_mb']} | {k} | "
                         f"{r['float_nodes']} |")
        b32 = {r["model"]: r["speedup"] for r in lat["rows"] if r["batch"] == 32 and r["threads"] > 1}
        slowest = min(r["speedup"] for r in lat["rows"])
        targets = [("timm:resnet18", 2.0), ("timm:mobilenetv3_large_100", 1.3)]
        lines += [""] + [f"- target {m} int8 >= {t}x at batch 32 (all threads): " +
                         (f"{b32[m]:.2f}x -> {'met' if b32[m] >= t else 'MISSED'}" if m in b32 else "not measured")
                         for m, t in targets]
        lines.append(f"- target never slower: slowest fp32/int8 ratio {slowest:.2f}x -> "
                     f"{'met' if slowest >= 1.0 else 'MISSED'}")
    prof = d.get("profile")
    if prof:
        lines += ["", f"Where the time goes ({prof['setting']}; {prof['date']}, `{prof['command']}`):", "",
                  "| model | ms per call | op types (share of kernel time) |", "|---|---|---|"]
        for key, v in prof["models"].items():
            shares = ", ".join(f"{op} {100 * x:.0f}%" for op, x in v["share"].items() if x >= 0.01)
            lines.append(f"| {key} | {v['ms_per_call']:.1f} | {shares} |")
        lines.append("")
    rows = []
    for arch, seed in bench.students():
        r = d.get(f"{arch}-s{seed}")
        if not r:
            rows.append(f"| {arch} | {seed} | pending | | | | | | | | |")
            continue
        acc = {"fp32": r["fp32"]["top1"], "ptq": r["ptq_int8"]["int8_top1"], "qad": r["qad_int8"]["int8_top1"],
               "qat": r["qat_int8"]["int8_top1"], "labels": r.get("labels", {}).get("top1")}
        out["students"][f"{arch}-s{seed}"] = acc
        lab = acc["labels"]
        rows.append(f"| {arch} | {seed} | {r['kd']['top1']:.4f} | {acc['fp32']:.4f} | {acc['ptq']:.4f} | "
                    f"{acc['qad']:.4f} | " + (f"{lab:.4f}" if lab is not None else "pending") +
                    f" | {acc['qat']:.4f} | {pts(acc['qad'] - acc['fp32'])} | "
                    f"{pts(acc['qad'] - acc['qat'])} | " + (pts(acc['qat'] - lab) if lab is not None else "pending") + " |")
    a = bench.a
    teacher = run_record(bench.work / "teacher")
    teacher_top1 = f"{teacher['top1']:.4f}" if teacher else "pending"
    val = f"{a.val_images} val images" if a.val_images else "all 5,000 val images"
    lines += [f"Accuracy: CIFAR-10, {a.train_images} training images, {val}, last epoch; "
              f"resnet32 teacher ({a.teacher_epochs} epochs on {a.teacher_train_images or a.train_images} training "
              f"images, val top-1 {teacher_top1}), float KD student ({a.kd_epochs} epochs), then "
              f"{a.epochs} more epochs of each arm from that checkpoint, fp32. int8 columns are ONNX Runtime "
              "int8 models exported with `kdistill export --int8`.", "",
              "float KD, fp32 continued (KD) and fp32 labels only are the float students' last-epoch val top-1.", "",
              "| student | seed | float KD | fp32 continued (KD) | PTQ int8 | QAD int8 | fp32 labels only | QAT (labels) int8 | QAD − fp32 (pts) | QAD − QAT (pts) | QAT − fp32 labels (pts) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"] + rows
    r20 = [v for k, v in out["students"].items() if k.startswith("resnet20")]
    if r20:
        d1 = [v["qad"] - v["fp32"] for v in r20]
        d2 = [v["qad"] - v["qat"] for v in r20]
        m1, m2 = statistics.mean(d1), statistics.mean(d2)
        s2 = statistics.stdev(d2) if len(d2) > 1 else None
        lines += ["", f"- resnet20 ({len(r20)} seeds) QAD − fp32: {pts_spread(d1)} "
                      f"(target >= −0.5) -> {'met' if m1 >= -0.005 else 'MISSED'}",
                  f"- resnet20 QAD − QAT (labels only): {pts_spread(d2)} (target > 0 beyond "
                  f"its spread) -> " + ("pending (one seed)" if s2 is None else
                                        ('met' if m2 - s2 > 0 else 'MISSED'))]
        out["differences"] = {"qad_minus_fp32": d1, "qad_minus_qat": d2}
        d3 = [v["qat"] - v["labels"] for v in r20 if v["labels"] is not None]
        d4 = [v["fp32"] - v["labels"] for v in r20 if v["labels"] is not None]
        if d3:
            lines += [f"- resnet20 QAT − fp32 labels only (the cost of quantization with labels): {pts_spread(d3)}; "
                      f"fp32 KD − fp32 labels only (the cost of the loss, no quantization): {pts_spread(d4)}"]
            out["differences"].update(qat_minus_labels=d3, kd_minus_labels=d4)
    return "\n".join(lines) + "\n", out


def publish(bench: Bench, names: list[str], no_write: bool) -> None:
    text, out = report(bench)
    print(text)
    if not no_write and not bench.a.smoke:
        name = section_name(bench.a)
        update_section(name, text)
        save_result(name, out)


def section_name(a: argparse.Namespace) -> str:
    """``int8``, or ``int8-teacher<N>`` for a teacher trained on other images than the students."""
    t = a.teacher_train_images
    return "int8" if t in (None, a.train_images) else f"int8-teacher{t}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None, help="run folder root (default $KDISTILL_BENCH_CACHE/int8)")
    ap.add_argument("--only", help="comma-separated stage names or fnmatch patterns (see --list)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny data and schedules in a throw-away cache")
    ap.add_argument("--train-images", type=int, default=5000)
    ap.add_argument("--val-images", type=int, default=None, help="default: all (5,000)")
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--teacher-train-images", type=int, default=None,
                    help="the teacher's training images (default --train-images); with another value the "
                         "results go to their own BENCHMARKS section, int8-teacher<N> (give its own --cache)")
    ap.add_argument("--kd-epochs", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=5, help="E: epochs of each arm after the float checkpoint")
    ap.add_argument("--lr", type=float, default=0.01, help="the arms' learning rate (cosine from here)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4, help="latency: alternating timing rounds")
    ap.add_argument("--seconds", type=float, default=1.5, help="latency: seconds per timing")
    a = ap.parse_args()
    if a.smoke:
        a.cache = a.cache or "/tmp/kdistill-int8-smoke"
        a.train_images, a.val_images, a.teacher_epochs, a.kd_epochs, a.epochs = 200, 200, 1, 1, 1
        a.batch_size, a.rounds, a.seconds, a.workers = 32, 2, 0.2, 0
    a.cache = a.cache or str(LONG_CACHE / "int8")
    run_stages(Bench(a), a, publish, "bench/int8.py")


if __name__ == "__main__":
    main()
