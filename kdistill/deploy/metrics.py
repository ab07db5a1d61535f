"""Prometheus text-format metrics for ``kdistill serve``, written by hand (no dependency).

Exposed at ``GET /metrics`` (per server process: with ``--workers N`` each worker counts
its own requests, as with any multi-process Prometheus target without a shared store):

* ``kdistill_http_requests_total{path, code}``: requests by route and status code;
* ``kdistill_http_request_duration_seconds{path}``: latency histogram;
* ``kdistill_images_total``: images classified;
* ``kdistill_batch_size``: histogram of the inference batch sizes (micro-batching);
* ``kdistill_queue_depth``: images waiting for a micro-batch (gauge).
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PATHS = ("/predict", "/health", "/metadata", "/metrics")  # anything else is counted as "other"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_fmt(le)}"}} {c}' for le, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]
        return out


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


class Metrics:
    """Counters and histograms of one server process (thread-safe)."""

    def __init__(self, queue_depth: Callable[[], int] | None = None) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batches = Histogram(BATCH_BUCKETS)
        self.images = 0
        self.queue_depth = queue_depth
        self.started = time.time()

    def observe_request(self, path: str, code: int, seconds: float) -> None:
        path = path if path in PATHS else "other"
        with self.lock:
            self.requests[(path, code)] += 1
            self.latency.setdefault(path, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self.lock:
            self.batches.observe(size)
            self.images += size

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP kdistill_http_requests_total HTTP requests by route and status code.",
                     "# TYPE kdistill_http_requests_total counter"]
            lines += [f'kdistill_http_requests_total{{path="{p}",code="{c}"}} {n}'
                      for (p, c), n in sorted(self.requests.items())]
            lines += ["# HELP kdistill_http_request_duration_seconds Time to answer a request.",
                      "# TYPE kdistill_http_request_duration_seconds histogram"]
            for p, h in sorted(self.latency.items()):
                lines += h.lines("kdistill_http_request_duration_seconds", f'path="{p}"')
            lines += ["# HELP kdistill_images_total Images classified.", "# TYPE kdistill_images_total counter",
                      f"kdistill_images_total {self.images}",
                      "# HELP kdistill_batch_size Images per model call.", "# TYPE kdistill_batch_size histogram",
                      *self.batches.lines("kdistill_batch_size")]
            if self.queue_depth is not None:
                lines += ["# HELP kdistill_queue_depth Images waiting for a micro-batch.",
                          "# TYPE kdistill_queue_depth gauge", f"kdistill_queue_depth {self.queue_depth()}"]
            lines += ["# HELP kdistill_uptime_seconds Seconds since the server started.",
                      "# TYPE kdistill_uptime_seconds gauge",
                      f"kdistill_uptime_seconds {time.time() - self.started:.3f}"]
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """ASGI middleware timing every HTTP request and counting it by route and status code
    (also requests rejected by inner middleware, and 500s from unhandled errors)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(scope.get("path", ""), status["code"], time.perf_counter() - start)
