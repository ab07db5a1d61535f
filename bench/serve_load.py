"""Issue 6 benchmark: `kdistill serve` under load on loopback, with and without
micro-batching, and onnxruntime vs torch eager latency for two students.

    .venv/bin/python bench/serve_load.py                         # 2,000 requests x 2 server modes
    .venv/bin/python bench/serve_load.py --run bench/cache/cifar/resnet20
    .venv/bin/python bench/serve_load.py --requests 50 --no-write  # smoke run: prints, writes nothing

Load: a real `python -m kdistill serve MODEL.onnx` process (1 worker) on 127.0.0.1; CONCURRENCY
clients (httpx.AsyncClient in one process) send one CIFAR-10 val JPEG (32 px; generated PNGs
when the data is absent) per `POST /predict` until REQUESTS are answered or TIME_LIMIT
seconds pass. Reported: throughput (answered 200s per second), p50/p99 latency, errors and
the mean images per model call (from /metrics). The clients run on the same cores as the
server, so absolute numbers understate a dedicated server. Run it on an otherwise idle
machine: with the cores busy, torch's multi-threaded eager forward slows down by orders of
magnitude (threads wait at barriers for descheduled peers); the 1-minute load average at
the start is recorded beside the results. ``--threads N`` fixes torch's and onnxruntime's
thread counts for a like-for-like comparison.

Latency: ms per image at batch 1 and 32, torch eager (float32, no_grad) vs onnxruntime
(CPU provider), for the CIFAR resnet20 (32 px; `--run` or untrained: latency does not
depend on the weights) and a timm student (`--timm`, untrained, at its default input size).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR, ROOT, machine, save_result, today, update_section  # noqa: E402

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616]


# ------------------------------------------------------------------ models


def synthetic_meta(arch: str, pp) -> dict:
    from kdistill.deploy.export import export_meta

    classes = [f"class{i}" for i in range(10)]
    return export_meta({"arch": arch, "num_classes": 10, "classes": classes, "run": None,
                        "method": "untrained (benchmark)"}, pp, "onnx", None)


def build_student(name: str):
    """(model, Preprocessing) of an untrained student: CIFAR stats for the zoo, timm's own
    input size and normalisation for timm models."""
    from kdistill.data.transforms import Preprocessing
    from kdistill.models import create_model, default_preprocessing

    model = create_model(name, 10).eval()
    pp = default_preprocessing(model, True) if name.startswith("timm:") else None
    return model, pp or Preprocessing(32, CIFAR_MEAN, CIFAR_STD, 1.0)


def export_onnx(name: str, out: Path, run: str | None = None) -> Path:
    """An ONNX file to serve: ``run`` exported by `kdistill export`, else an untrained ``name``."""
    import numpy as np

    from kdistill.deploy.export import export_checkpoint, export_module

    if run:
        export_checkpoint(run, "onnx", str(out), n_images=16, card=False)
        return out
    model, pp = build_student(name)
    x = np.random.default_rng(0).random((8, 3, pp.image_size, pp.image_size), dtype=np.float32)
    parity, _ = export_module(model, synthetic_meta(model.kdistill_arch, pp), "onnx", out, x, "random inputs")
    print(parity.line("onnxruntime"), flush=True)
    return out


def runtime_latency(name: str, workdir: Path, seconds: float, threads: int | None = None) -> dict:
    """ms/image at batch 1 and 32: torch eager vs onnxruntime, same model, same inputs."""
    import numpy as np

    from kdistill.deploy.runtime import OnnxPredictor
    from kdistill.models.onnx import Normalized
    from kdistill.models.profile import callable_latency_ms, count_flops, latency_ms
    from kdistill.utils import count_params

    model, pp = build_student(name)
    path = export_onnx(name, workdir / f"{name.replace(':', '_')}.onnx")
    ort = OnnxPredictor(str(path), threads)
    eager = Normalized(model, pp).eval()
    size = pp.image_size

    def make(b: int):
        return np.random.default_rng(0).random((b, 3, size, size), dtype=np.float32)

    row = {"model": name, "image_size": size, "params": count_params(model), "flops": count_flops(model, size)}
    for b in (1, 32):
        row[f"eager_ms_b{b}"] = latency_ms(eager, size, b, min_seconds=seconds)
        row[f"ort_ms_b{b}"] = callable_latency_ms(ort.logits, make, b, min_seconds=seconds)
        row[f"ratio_b{b}"] = row[f"ort_ms_b{b}"] / row[f"eager_ms_b{b}"]
    return row


# ------------------------------------------------------------------ load test


def payloads(n: int = 64) -> list[tuple[str, bytes, str]]:
    files = sorted(Path(CIFAR, "val").glob("*/*.jpg"))[:: 97][:n] if Path(CIFAR, "val").is_dir() else []
    if files:
        return [(f.name, f.read_bytes(), "image/jpeg") for f in files]
    import numpy as np
    from PIL import Image

    rng, out = np.random.default_rng(0), []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append((f"{i}.png", buf.getvalue(), "image/png"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, max_batch: int, max_wait_ms: float,
                 threads: int | None = None) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kdistill", "serve", str(model), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                             "--log-level", "warning", *(["--threads", str(threads)] if threads else [])],
                            cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not answer /health within 120 s")


async def load(url: str, requests: int, concurrency: int, time_limit: float,
               files: list[tuple[str, bytes, str]]) -> dict:
    """Closed loop: ``concurrency`` clients, each sending its next request when answered."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        for f in files[:concurrency]:  # warm-up: connections and the model's first calls
            await client.post("/predict", files={"file": f})
        start = time.perf_counter()

        async def worker() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() - start < time_limit:
                f = files[sent % len(files)]
                sent += 1
                t = time.perf_counter()
                try:
                    r = await client.post("/predict", files={"file": f})
                    code = str(r.status_code)
                except httpx.HTTPError as err:
                    code = type(err).__name__
                if code == "200":
                    latencies.append(time.perf_counter() - t)
                else:
                    errors[code] = errors.get(code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        metrics = (await client.get("/metrics")).text
    values = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines() if ln and not ln.startswith("#")}
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"requests": sent, "ok": len(latencies), "errors": sum(errors.values()), "error_codes": errors,
            "seconds": elapsed, "throughput_rps": len(latencies) / elapsed,
            "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98],
            "mean_batch": values.get("kdistill_batch_size_sum", 0) / max(values.get("kdistill_batch_size_count", 1), 1)}


def serve_modes(model: Path, args: argparse.Namespace, files: list[tuple[str, bytes, str]]) -> list[dict]:
    rows = []
    for label, max_batch in (("no micro-batching", 1), ("micro-batching", args.max_batch)):
        proc, url = start_server(model, max_batch, args.max_wait_ms, args.threads)
        try:
            row = asyncio.run(load(url, args.requests, args.concurrency, args.time_limit, files))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        row.update({"mode": label, "max_batch": max_batch, "max_wait_ms": args.max_wait_ms if max_batch > 1 else 0})
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------ report


def report(result: dict, args: argparse.Namespace) -> str:
    lines = [f"Measured {result['date']} on {result['machine']} by `python bench/serve_load.py"
             + (f" --run {args.run}" if args.run else "") + (f" --threads {args.threads}" if args.threads else "")
             + f"` (1-minute load average {result['load_average_1min_at_start']:.1f} at the start: "
             "other jobs on the cores inflate multi-threaded torch latency most).", "",
             f"Serving {result['served']} (ONNX, onnxruntime, 1 worker) on loopback: {args.requests} requests "
             f"from {args.concurrency} concurrent clients (same machine), one image per request "
             f"({result['payload']}).", "",
             "| mode | requests | throughput (req/s) | p50 (ms) | p99 (ms) | errors | images per model call |",
             "|---|---|---|---|---|---|---|"]
    for r in result["serve"]:
        mode = r["mode"] + (f" (max {r['max_batch']}, {r['max_wait_ms']:g} ms)" if r["max_batch"] > 1 else "")
        lines.append(f"| {mode} | {r['requests']} | {r['throughput_rps']:.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['errors']} | {r['mean_batch']:.2f} |")
    plain, batched = result["serve"][0], result["serve"][-1]
    gain = batched["throughput_rps"] / plain["throughput_rps"]
    lines += ["", f"Micro-batching: {gain:.2f}x the throughput of one image per model call, with "
              f"{batched['mean_batch']:.1f} images per call. "
              + ("It does not pay here: the model takes well under a millisecond per image, so HTTP and "
                 "multipart handling dominate, and the clients share the same 2 cores; batching is for "
                 "models whose per-call cost dominates (bigger students, GPUs)." if gain < 1 else
                 "Grouping concurrent requests amortises the per-call cost of the model.")]
    lines += ["", "Latency per image, torch eager (float32) vs onnxruntime (CPU), untrained weights:", "",
              "| model | input | params | MFLOPs | eager b1 (ms) | ORT b1 (ms) | ORT/eager b1 | "
              "eager b32 (ms) | ORT b32 (ms) | ORT/eager b32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["latency"]:
        lines.append(f"| {r['model']} | {r['image_size']} | {r['params']:,} | {r['flops'] / 1e6:.1f} | "
                     f"{r['eager_ms_b1']:.3f} | {r['ort_ms_b1']:.3f} | {r['ratio_b1']:.2f} | "
                     f"{r['eager_ms_b32']:.3f} | {r['ort_ms_b32']:.3f} | {r['ratio_b32']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="serve this trained run (default: an untrained resnet20)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per server mode")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    ap.add_argument("--time-limit", type=float, default=300, help="seconds per server mode, at most")
    ap.add_argument("--max-batch", type=int, default=16, help="micro-batch size of the batching mode")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--timm", default="timm:mobilenetv3_small_050", help="timm student for the latency table")
    ap.add_argument("--latency-seconds", type=float, default=2.0, help="time per latency measurement")
    ap.add_argument("--threads", type=int, help="torch and onnxruntime threads (default: their own defaults)")
    ap.add_argument("--no-write", action="store_true",
                    help="print only: no bench/results/serve_load.json, no BENCHMARKS.md section")
    args = ap.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        raise SystemExit("--requests and --concurrency must be >= 1")

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        print(f"warning: 1-minute load average {load_before:.1f} on {os.cpu_count()} cores: other jobs are "
              "running and will inflate the latencies (multi-threaded torch most); rerun on an idle "
              "machine, or compare at --threads 1", flush=True)
    with tempfile.TemporaryDirectory(prefix="kdistill-bench-") as tmp:
        work = Path(tmp)
        served = export_onnx("resnet20", work / "served.onnx", args.run)
        files = payloads()
        serve = serve_modes(served, args, files)
        latency = [runtime_latency(name, work, args.latency_seconds, args.threads)
                   for name in ("resnet20", args.timm)]
    result = {"date": today(), "machine": machine(), "served": args.run or "resnet20 (untrained)",
              "load_average_1min_at_start": load_before,
              "payload": "CIFAR-10 val JPEGs (32 px)" if files[0][2] == "image/jpeg" else "generated 32 px PNGs",
              "settings": vars(args), "serve": serve, "latency": latency}
    text = report(result, args)
    print(text)
    if args.no_write:
        print("(--no-write: nothing saved)")
        return
    save_result("serve_load", result)
    update_section("serve-load", "## Serving the student (`kdistill serve`)\n\n" + text)


if __name__ == "__main__":
    main()
