"""GPU check: kdistill's training loop on one GPU, on synthetic data, in under 5 minutes.

    bash bench/gpu_check.sh                    # on the GPU machine (the header says the exact call)
    python3 bench/gpu_check.py --tiny          # anywhere: tiny models on the CPU, CUDA-only arms skipped

Pairs: resnet56 -> resnet20 at 32 px, timm resnet50 -> mobilenetv3_large_100 at 224 px
(random weights: speed does not depend on them), on synthetic JPEGs decoded into memory once
per worker process (``data.in_memory=yes``, 8 loader workers). For each pair and precision
(bf16; fp16 with GradScaler: ``train.amp_dtype``), channels_last, arms: the student alone;
a plain PyTorch loop (same model, uint8 data already on the GPU, same precision,
channels_last, fused SGD, cuDNN autotuning, no compile; the target is kdistill's student
>= 0.95x it); KD with the eager
teacher; KD with the compiled teacher (``distill.teacher_runtime=compile``); KD from stored
teacher outputs (view ``fixed``); and one ``torchrun --nproc_per_node=1`` arm with
``KDISTILL_FORCE_DDP=1`` (nccl DDP at world size 1).

Columns: img/s (steady state: images of a 60-step epoch minus those of a 30-step one, over
the time difference, after a warm-up epoch), ratio to the student alone, the loader alone
(img/s of its batches moved to the GPU, no model: shows whether an arm is data-bound),
teacher forward alone (eager vs compiled, same precision and layout, img/s), graphs each
compiled teacher compiled (CompileRunner.graphs), host syncs per steady-state step (syncs
in 60 steps minus syncs in 30, over 30, counted with ``set_sync_debug_mode("warn")``;
``train.sync_every`` is 1000 so the loop's periodic check is left out), peak GPU memory,
and the teacher runtime that ran (CompiledTeacher.runtime, else eager; ``table`` for view
fixed, whose table an eager teacher fills).

Each pair's arms run in one worker process (data decoded once); this parent process is a
watchdog: an arm that overruns its limit (75 s, 150 s with a compiled teacher) or the whole
budget (290 s) is killed with its worker, recorded as a timeout, and a new worker takes the
remaining arms (those past the budget are reported skipped; ``--only`` reruns a subset). Each row is appended to
the JSON file (``--out``; default ``$OUT/gpu_check.json`` when ``OUT`` is set, else
``runs/gpu_check.json``) the moment its arm ends, so a killed run still returns rows;
workers' logs go beside it (``.log``). Exit status 1 when an arm failed or timed out.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "@@gpu_check "
PAIRS = {"resnet56->resnet20/32px": ("resnet56", "resnet20", 32),
         "resnet50->mobilenetv3_large_100/224px": ("timm:resnet50", "timm:mobilenetv3_large_100", 224)}
TINY = {"resnet8->resnet8/16px": ("resnet8", "resnet8", 16)}
PRECISIONS = ("bf16", "fp16")
ARMS = ("student", "plain", "KD eager", "KD compiled", "KD fixed")
DDP_ARM = "student DDP"  # torchrun --nproc_per_node=1, KDISTILL_FORCE_DDP=1; on the first pair, bf16
GPU = dict(batch=128, steps=(10, 30, 60), workers=8, budget=290, setup=150, arm=75, compile_arm=150)
SMALL = dict(batch=4, steps=(1, 2, 4), workers=0, budget=240, setup=120, arm=60, compile_arm=60)
COLUMNS = [("pair", 38), ("prec", 4), ("arm", 11), ("img/s", 7), ("x stud", 6), ("loader", 7), ("tfwd eag", 8),
           ("tfwd cmp", 8), ("graphs", 6), ("syncs/st", 8), ("peak GB", 7), ("runtime", 7), ("status", 0)]


# ------------------------------------------------------------------ parent: data, watchdog, table


def synthetic(root: Path, size: int, n_train: int, classes: int = 10) -> Path:
    """An ImageFolder of smooth random JPEGs: 64 distinct images, hard-linked to ``n_train``
    training files (speed does not depend on content; small files decode fast)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):
        img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    for split, n in (("train", n_train), ("val", 2 * classes)):
        for i in range(n):
            path = root / split / f"c{i % classes}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # the same bytes as training image i % 64
                os.link(root / "train" / f"c{i % 64 % classes}" / f"{i % 64}.jpg", path)
            except OSError:  # the first 64 training files, or a file system without hard links
                path.write_bytes(blobs[i % 64])
    return root


def fmt(row: dict, ratio: float | None) -> str:
    def num(v, spec: str = ".0f") -> str:
        return "-" if v is None else format(v, spec)

    graphs = row.get("graphs")
    cells = [row["pair"], row["precision"], row["arm"], num(row.get("img_s")), num(ratio, ".2f"),
             num(row.get("loader_img_s")), num(row.get("tfwd_eager")), num(row.get("tfwd_compiled")),
             "-" if not graphs else ",".join(str(g) for g in graphs), num(row.get("syncs_per_step"), ".2f"),
             num(row.get("peak_gb"), ".2f"), row.get("runtime") or "-", row["status"]]
    return " ".join(f"{c:>{w}s}" if i else f"{c:{w}s}" for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS))).rstrip()


def ratio_of(row: dict, rows: list[dict]) -> float | None:
    base = next((r for r in rows if r["pair"] == row["pair"] and r["precision"] == row["precision"]
                 and r["arm"] == "student" and r.get("img_s")), None)
    return row["img_s"] / base["img_s"] if base and row.get("img_s") else None


def header() -> str:
    return " ".join(f"{n:>{w}s}" if i else f"{n:{w}s}" for i, (n, w) in enumerate(COLUMNS))


def table(rows: list[dict]) -> str:
    lines = [header()] + [fmt(r, ratio_of(r, rows)) for r in rows]
    for r in rows:
        plain = ratio_of(r, rows) if r["arm"] == "plain" else None  # plain / student
        if plain:
            lines.append(f"target: kdistill student / plain PyTorch loop, {r['pair']} {r['precision']}: "
                         f"{1 / plain:.2f}x ({'met' if 1 / plain >= 0.95 else 'NOT met'}, target >= 0.95x)")
    return "\n".join(lines)


class Report:
    """The rows so far, rewritten atomically to ``path`` after each one (a killed run keeps them)."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.meta, self.rows = path, meta, []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, row: dict) -> None:
        row.setdefault("status", "ok")
        self.rows.append(row)
        self.write()
        print(fmt(row, ratio_of(row, self.rows)), flush=True)

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1) + "\n")
        os.replace(tmp, self.path)


def _reader(stream, q: queue.Queue, log, tail: deque | None) -> None:
    for line in iter(stream.readline, ""):
        i = line.find(PREFIX)
        if i >= 0 and tail is None:
            q.put(json.loads(line[i + len(PREFIX):]))
            continue
        log.write(line)
        log.flush()
        if tail is not None:
            tail.append(line.rstrip())
    if tail is None:
        q.put(None)  # stdout closed: the worker ended


def run_group(group: dict, spec: dict, limits: dict, deadline: float, report: Report, log, hang: str) -> None:
    """The arms of ``group`` in worker processes, each arm under its time limit."""
    pending = list(group["arms"])
    while pending:
        if deadline - time.time() < 5:
            for prec, arm in pending:
                report.add(dict(pair=group["pair"], precision=prec, arm=arm, status="skipped: over the time budget"))
            return
        spec_file = Path(spec["work"]) / f"spec-{time.time_ns()}.json"
        spec_file.write_text(json.dumps({**spec, **group, "arms": pending, "hang": hang}))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if group.get("torchrun"):
            cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
            env["KDISTILL_FORCE_DDP"] = "1"
        log.write(f"\n==== {' '.join(cmd)}\n")
        # its own process group (killed as one), in this session (the device tool ends it with us)
        group_kw = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **group_kw)
        launcher = " under torchrun" if group.get("torchrun") else ""
        print(f"-- {group['pair']}: worker for {len(pending)} arm(s){launcher}", flush=True)
        q: queue.Queue = queue.Queue()
        tail: deque = deque(maxlen=20)
        threads = [threading.Thread(target=_reader, args=(proc.stdout, q, log, None), daemon=True),
                   threading.Thread(target=_reader, args=(proc.stderr, q, log, tail), daemon=True)]
        for t in threads:
            t.start()
        current, started_any = None, False
        limit_at = time.time() + limits["setup"]
        while True:
            try:
                msg = q.get(timeout=max(min(limit_at, deadline) - time.time(), 0.01))
            except queue.Empty:  # over the limit: kill the worker and its children
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                waited = "the time budget" if deadline <= limit_at else "its limit"
                if current is None:
                    for prec, arm in pending:
                        report.add(dict(pair=group["pair"], precision=prec, arm=arm,
                                        status=f"timeout: worker setup overran {waited}"))
                    return
                report.add(dict(pair=group["pair"], precision=current[0], arm=current[1],
                                status=f"timeout: killed after {time.time() - started:.0f} s ({waited})"))
                pending.remove(current)
                break
            if msg is None:  # the worker ended
                rc = proc.wait()
                for t in threads:
                    t.join(5)
                why = f"worker exited with status {rc}: {tail[-1] if tail else 'no output'}"
                if current is not None:
                    report.add(dict(pair=group["pair"], precision=current[0], arm=current[1], status=f"error: {why}"))
                    pending.remove(current)
                elif pending and not started_any:
                    for prec, arm in pending:
                        report.add(dict(pair=group["pair"], precision=prec, arm=arm, status=f"error: {why}"))
                    return
                break
            if "meta" in msg:
                report.meta.update(msg["meta"])
                report.write()
            elif "start" in msg:
                current, started_any, started = tuple(msg["start"]), True, time.time()
                limit = limits["compile_arm"] if current[1] == "KD compiled" else limits["arm"]
                limit_at = time.time() + (5 if hang == "/".join(current) else limit)
            elif "row" in msg:
                report.add(msg["row"])
                pending.remove((msg["row"]["precision"], msg["row"]["arm"]))
                current, limit_at = None, time.time() + limits["arm"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models and steps on the CPU (the smoke test)")
    ap.add_argument("--out", help="JSON file for the rows (default $OUT/gpu_check.json, else runs/gpu_check.json)")
    ap.add_argument("--budget", type=float, help="seconds for the whole check (default 290; --tiny 240)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--only", help="comma-separated fnmatch patterns over PAIR/PREC/ARM, e.g. 'resnet50*/fp16/*' "
                    "(a second call for the arms a first one left out)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--hang", default="", help=argparse.SUPPRESS)  # 'PREC/ARM' sleeps: tests the watchdog
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(Path(args.worker).read_text()))
    limits = dict(SMALL if args.tiny else GPU)
    batch = args.batch_size or limits["batch"]
    out = Path(args.out or Path(os.environ.get("OUT") or ROOT / "runs") / "gpu_check.json")
    deadline = time.time() + (args.budget or limits["budget"])
    pairs = TINY if args.tiny else PAIRS
    groups = [dict(pair=p, arms=[(prec, a) for prec in PRECISIONS for a in ARMS]) for p in pairs]
    groups.insert(1, dict(pair=next(iter(pairs)), arms=[("bf16", DDP_ARM)], torchrun=True))
    if args.only:
        pats = args.only.split(",")
        for g in groups:
            g["arms"] = [(p, a) for p, a in g["arms"] if any(fnmatch(f"{g['pair']}/{p}/{a}", x) for x in pats)]
        groups = [g for g in groups if g["arms"]]
    report = Report(out, {"command": " ".join(sys.argv), "tiny": args.tiny, "batch": batch,
                          "steps": limits["steps"], "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"gpu_check: rows -> {out}, logs -> {out.with_suffix('.log')}; budget {deadline - time.time():.0f} s",
          flush=True)
    print(header(), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work, open(out.with_suffix(".log"), "w") as log:
        for group in groups:
            if group.get("torchrun") and args.tiny:  # nccl needs CUDA: no torchrun launch in the smoke test
                report.add(dict(pair=group["pair"], precision="bf16", arm=DDP_ARM,
                                status="skipped: CUDA only (nccl DDP)"))
                continue
            t_arch, s_arch, size = pairs[group["pair"]]
            data = Path(work) / f"data{size}"
            if not data.exists():
                synthetic(data, size, batch * (limits["steps"][2] + 4))
            spec = dict(work=work, data=str(data), teacher=str(Path(work) / f"teacher{size}"), t_arch=t_arch,
                        s_arch=s_arch, size=size, batch=batch, steps=limits["steps"], workers=limits["workers"],
                        tiny=args.tiny)
            run_group(group, spec, limits, deadline, report, log, args.hang)
    print(f"\n== gpu_check: {report.meta.get('device', '?')}, torch {report.meta.get('torch', '?')}, batch {batch}, "
          f"steps {limits['steps']}{' (smoke test: the numbers mean nothing)' if args.tiny else ''}\n"
          f"{table(report.rows)}", flush=True)
    bad = [r for r in report.rows if r["status"].startswith(("error", "timeout"))]
    return 1 if bad else 0


# ------------------------------------------------------------------ worker: one pair's arms


def emit(**msg) -> None:
    import kdistill.distributed as dist

    if dist.is_main():
        print(PREFIX + json.dumps(msg), flush=True)


def measure(run, steps, cuda: bool) -> dict:
    """Steady-state img/s and host syncs per step from ``run(n)`` (n steps -> images), after
    a warm-up; peak GPU memory over the two timed epochs."""
    import warnings

    import torch

    def timed(n: int):
        if cuda:
            torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            t0 = time.perf_counter()
            try:
                images = run(n)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
            if cuda:
                torch.cuda.synchronize()
            return images, time.perf_counter() - t0, sum("synchroniz" in str(w.message) for w in caught)

    warm, short, long = steps
    run(warm)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    (i_s, t_s, s_s), (i_l, t_l, s_l) = timed(short), timed(long)
    steady = (i_l - i_s) / (t_l - t_s) if t_l > t_s and i_l > i_s else i_l / t_l
    return dict(img_s=steady, img_s_epoch=i_l / t_l, syncs_per_step=(s_l - s_s) / (long - short) if cuda else None,
                peak_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def rate(fn, x, iters: int, cuda: bool) -> float:
    """img/s of ``fn(x)``."""
    import torch

    for _ in range(3):
        fn(x)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    if cuda:
        torch.cuda.synchronize()
    return iters * len(x) / (time.perf_counter() - t0)


def kdistill_arm(spec: dict, prec: str, arm: str, device: str, run_dir: Path) -> dict:
    import torch

    import kdistill.distributed as dist
    from common import distill_trainer
    from kdistill.methods.teachers import FrozenTeachers, Teacher

    cuda, batch = device == "cuda", spec["batch"]
    teacher = ["--teacher", spec["teacher"]]
    args = {"student": ["--loss", "ce"], DDP_ARM: ["--loss", "ce"],
            "KD eager": teacher + ["--teacher-runtime", "eager"],
            "KD compiled": teacher + ["--teacher-runtime", "compile"],
            "KD fixed": teacher + ["--view", "fixed", "--teacher-runtime", "eager"]}[arm]
    overrides = [f"train.max_steps_per_epoch={spec['steps'][0]}", f"train.device={device}", "distill.agreement=false",
                 f"data.image_size={spec['size']}", f"data.workers={spec['workers']}", "data.in_memory=yes",
                 "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "train.sync_every=1000",
                 "train.epochs=3", "train.amp=true", f"train.amp_dtype={prec}", "model.channels_last=true"]
    t = distill_trainer(["distill", "--data", spec["data"], "--model", spec["s_arch"], "--no-progress",
                         "--batch-size", str(batch), "--out", str(run_dir), *args,
                         *[a for o in overrides for a in ("-o", o)]])
    epoch = iter(range(100))

    def run(n: int) -> int:
        t.cfg.train.max_steps_per_epoch = n
        return t.train_epoch(next(epoch)).images

    row = measure(run, spec["steps"], cuda)
    n, t0 = 0, time.perf_counter()
    for b in t.train_loader:  # the loader alone: batches to the device, no model
        t._to_device(b)
        n += 1
        if n == spec["steps"][1]:
            break
    if cuda:
        torch.cuda.synchronize()
    row["loader_img_s"] = n * batch / (time.perf_counter() - t0)
    row.update(precision_ran=t.precision.name, scaler=t.scaler.is_enabled(),
               ddp=f"{torch.distributed.get_backend()}, world {dist.world_size()}" if t.method.ddp_modules() else None)
    if arm == DDP_ARM and not row["ddp"]:
        row["status"] = "error: no DDP wrap under torchrun with KDISTILL_FORCE_DDP=1"
    src = t.method.teacher
    if isinstance(src, FrozenTeachers):
        x = torch.randint(0, 256, (batch, 3, spec["size"], spec["size"]), dtype=torch.uint8, device=device)
        iters = 20 if cuda else 2
        row["runtime"] = ",".join(getattr(te, "runtime", "eager") for te in src.teachers)
        row["eager_weights"] = [str(getattr(te, "dtype", None) or "as loaded") for te in src.teachers]
        row["graphs"] = [te.runner.graphs for te in src.teachers if hasattr(getattr(te, "runner", None), "graphs")]
        with t.autocast():
            row["tfwd_eager"] = rate(lambda v: [Teacher.forward(te, v) for te in src.teachers], x, iters, cuda)
            if any(hasattr(te, "runner") for te in src.teachers):
                row["tfwd_compiled"] = rate(lambda v: [te(v) for te in src.teachers], x, iters, cuda)
    elif arm == "KD fixed":
        row["runtime"] = "table"
    it = getattr(t.train_loader.loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()  # persistent workers: end them before the next arm
    return row


def plain_arm(spec: dict, prec: str, device: str) -> dict:
    """A plain PyTorch loop as one would write it by hand: the same student, uint8 images
    already on the device, the same normalisation, precision and channels_last, SGD
    (nesterov; fused on CUDA) and cuDNN autotuning, no compile, no loader."""
    import torch
    import torch.nn.functional as F

    from kdistill.models import create_model

    size, batch, dev = spec["size"], spec["batch"], torch.device(device)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float16
    model = create_model(spec["s_arch"], 10).to(dev, memory_format=torch.channels_last).train()
    fused = dev.type == "cuda"
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          **({"fused": True} if fused else {}))
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, fused
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype is torch.float16)
    n = batch * 8
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (n,), device=dev)
    mean, std = torch.full((1, 3, 1, 1), 0.5, device=dev), torch.full((1, 3, 1, 1), 0.25, device=dev)

    def run(steps: int) -> int:
        for _ in range(steps):
            idx = torch.randint(0, n, (batch,), device=dev)
            x = ((images[idx].float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=dtype):
                loss = F.cross_entropy(model(x), labels[idx])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        return steps * batch

    try:
        return dict(measure(run, spec["steps"], fused), precision_ran=prec, scaler=scaler.is_enabled(),
                    fused_sgd=fused, cudnn_benchmark=fused)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def worker(spec: dict) -> int:
    """Run ``spec['arms']`` in order, one row each on stdout; returns when done."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import gc
    import traceback

    import torch

    import kdistill.distributed as dist
    from common import memoize_splits
    from kdistill.cli import main as kdistill_main
    from kdistill.methods import compiled

    cuda = torch.cuda.is_available() and not spec["tiny"]
    device = "cuda" if cuda else "cpu"
    if not cuda:  # the CPU smoke test: Dynamo without a C++ build; one thread (fast on a busy CPU)
        compiled.BACKEND = "aot_eager"
        torch.set_num_threads(1)
    import timm

    emit(meta=dict(device=torch.cuda.get_device_name() if cuda else "CPU (CUDA-only parts skipped)",
                   torch=torch.__version__, timm=timm.__version__, python=sys.version.split()[0],
                   cpus=os.cpu_count(), capability=torch.cuda.get_device_capability() if cuda else None,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None))
    if not (Path(spec["teacher"]) / "best.safetensors").is_file():  # a 1-step run: weights do not matter
        rc = kdistill_main(["train", "--data", spec["data"], "--model", spec["t_arch"], "--epochs", "1", "--out",
                            spec["teacher"], "--no-progress", "--batch-size", "8", "-o", "train.max_steps_per_epoch=1",
                            "-o", f"data.image_size={spec['size']}", "-o", f"train.device={device}",
                            "-o", "data.workers=0",
                            "-o", "data.max_train_images=64", "-o", "data.in_memory=no",
                            "-o", "data.mean=[0.5,0.5,0.5]", "-o", "data.std=[0.25,0.25,0.25]"])
        if rc:
            raise SystemExit(f"teacher run failed ({rc})")
    memoize_splits()  # the data is decoded once in this process, not once per arm
    for prec, arm in spec["arms"]:
        emit(start=[prec, arm])
        base = dict(pair=spec["pair"], precision=prec, arm=arm)
        started = time.perf_counter()
        if spec.get("hang") == f"{prec}/{arm}":
            time.sleep(3600)
        try:
            if arm == "plain":
                row = plain_arm(spec, prec, device)
            else:
                row = kdistill_arm(spec, prec, arm, device, Path(spec["work"]) / f"run-{time.time_ns()}")
        except Exception as err:  # noqa: BLE001 - one arm's failure is a row; the others go on
            traceback.print_exc()
            row = dict(status=f"error: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}")
        emit(row={**base, **row, "seconds": round(time.perf_counter() - started, 1)})
        if cuda and any(k in row.get("status", "") for k in ("CUDA error", "AcceleratorError")):
            return 3  # the GPU is unusable in this process: the parent starts a new worker for the rest
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
