"""``kdistill serve``: an HTTP server (FastAPI + uvicorn) for an exported student.

MODEL is served with the runtime of its format: an ONNX file (fp32 or int8, as it is) with
onnxruntime, a TorchScript file with torch. A run folder or .safetensors checkpoint is first
exported to ONNX in a temporary folder (with the same parity check as ``kdistill export``;
int8 with ``--int8``, as ``kdistill export --int8``), so what is served is exactly what
would be shipped.

Endpoints:

* ``POST /predict`` (multipart/form-data, field ``file``, one or several files; query
  ``top_k``, default 5) -> ``{"model": arch, "predictions": [{"filename": ...,
  "top_k": [{"label", "index", "prob"}, ...]}, ...]}`` in upload order. A request is
  all-or-nothing: if any file is bad, it gets ``{"error": "..."}`` with a 4xx status and
  names the file: 400 empty/corrupt/not an image, 413 body or image (pixels, read from the
  header before decoding) over the limit, 415 wrong content type, 422 bad query, 503
  queue full. Images are decoded with PIL (never torchvision's native decoders, which
  crash the process on some corrupt PNGs; see :func:`runtime.read_rgb`).
* ``GET /health`` -> ``{"status": "ok"}``; ``GET /metadata`` -> the model's embedded
  metadata plus the server's limits; ``GET /metrics`` -> Prometheus text (see metrics.py).
"""
import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..errors import UserError
from .batching import MicroBatcher, QueueFull
from .metrics import Metrics, MetricsMiddleware
from .runtime import ImageError, Predictor, Preparer, detect_format, load_predictor, read_rgb
from .runtime import top_k as top_k_items

ENV_SETTINGS = "KDISTILL_SERVE_SETTINGS"  # JSON ServeSettings for worker processes
ALLOWED_PART_TYPES = ("image/", "application/octet-stream")


@dataclass
class ServeSettings:
    model: str = ""
    max_body_bytes: int = 10 * 2**20  # whole request
    max_pixels: int = 40_000_000  # per image, from its header (decompression bombs)
    max_files: int = 32  # files per request
    max_batch: int = 8  # images per model call; 1 disables micro-batching
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for company
    queue_size: int = 256  # images waiting (or requests in flight without batching)
    threads: int | None = None  # onnxruntime intra-op threads per worker

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_pixels", "max_files", "max_batch", "queue_size"):
            if getattr(self, name) < 1:
                raise UserError(f"serve: {name.replace('_', '-')} must be >= 1")
        if self.max_wait_ms < 0:
            raise UserError("serve: max-wait-ms must be >= 0")


class BodyTooLarge(Exception):
    """The request body grew past the limit while streaming in (HTTP 413)."""


class Reject(Exception):
    """A request answered with ``{"error": message}`` and a 4xx ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (by Content-Length up front, else
    counted while it streams in)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                await _send_json(send, 400, {"error": "invalid Content-Length"})
                return
            if too_big:
                await _send_json(send, 413, {"error": f"request body of {int(length)} bytes is over "
                                                      f"the limit of {self.max_bytes}"})
                return
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)


async def _send_json(send, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(predictor: Predictor, settings: ServeSettings) -> FastAPI:
    """The FastAPI application serving ``predictor`` under ``settings``' limits."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and settings.max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = settings.max_pixels  # else PIL's own bomb limit would be lower
    batcher = MicroBatcher(predictor.probs, settings.max_batch, settings.max_wait_ms, settings.queue_size)
    metrics = Metrics(batcher.depth)
    batcher.on_batch = metrics.observe_batch
    prep = Preparer(predictor.pp)

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="kdistill", version=str(predictor.meta.get("kdistill_version")), lifespan=lifespan,
                  docs_url=None, redoc_url=None)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_req, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_req, _exc):
        return error(413, f"request body over the limit of {settings.max_body_bytes} bytes")

    def decode(data: bytes) -> np.ndarray:
        return prep(read_rgb(data, settings.max_pixels))

    async def read_uploads(form) -> tuple[list[str], list[np.ndarray]]:
        """Names and prepared images of the form's ``file`` parts; :class:`Reject` on the first
        bad one."""
        uploads = form.getlist("file")
        if not uploads:
            raise Reject(400, "no file: send the image(s) in multipart field 'file'")
        names, images = [], []
        for n, up in enumerate(uploads):
            if not isinstance(up, UploadFile):
                raise Reject(400, f"field 'file' #{n + 1} is text, not a file upload")
            name = up.filename or f"file #{n + 1}"
            part_type = (up.content_type or "").split(";")[0].strip().lower()
            if part_type and not part_type.startswith(ALLOWED_PART_TYPES):
                raise Reject(415, f"'{name}' has content type '{part_type}'; send an image "
                                  "(image/* or application/octet-stream)")
            data = await up.read()
            try:
                images.append(await run_in_threadpool(decode, data))
            except ImageError as err:
                raise Reject(err.status, f"'{name}': {err}") from None
            names.append(name)
        return names, images

    @app.post("/predict")
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000)):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return error(415, "send images as multipart/form-data with field 'file' "
                              f"(got content type '{ctype or 'none'}')")
        try:
            form = await request.form(max_files=settings.max_files, max_fields=settings.max_files)
        except BodyTooLarge:
            return error(413, f"request body over the limit of {settings.max_body_bytes} bytes")
        except Exception as err:  # noqa: BLE001 - malformed multipart, too many files
            detail = getattr(err, "detail", None) or str(err) or type(err).__name__
            return error(400, f"bad multipart body: {detail}")
        try:
            names, images = await read_uploads(form)
        except Reject as rej:
            return error(rej.status, rej.message)
        finally:
            await form.close()
        try:
            probs = await batcher.submit(images)
        except QueueFull as err:
            return error(503, f"server busy ({err}); retry later", {"Retry-After": "1"})
        except Exception as err:  # noqa: BLE001 - a model failure answers 500, the server goes on
            return error(500, f"inference failed: {type(err).__name__}: {str(err)[:200]}")
        return {"model": predictor.meta["arch"],
                "predictions": [{"filename": name, "top_k": top_k_items(p, predictor.classes, top_k)}
                                for name, p in zip(names, probs)]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": predictor.meta["arch"], "backend": predictor.backend}

    @app.get("/metadata")
    async def metadata():
        return {**predictor.meta, "backend": predictor.backend, "model_file": predictor.path,
                "limits": {k: v for k, v in asdict(settings).items() if k != "model"},
                "batching": batcher.enabled}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: sees every answer
    app.state.metrics, app.state.batcher = metrics, batcher
    return app


# ------------------------------------------------------------------ running


def model_for_serving(model: str, workdir: str, data: str | None = None, int8: bool = False) -> str:
    """A checkpoint or run folder exported to ONNX (int8 with ``int8``) in ``workdir``
    (parity-checked)."""
    from .export import export_to_folder

    return export_to_folder(model, workdir, data, int8)


class _Stop(Exception):
    """SIGTERM after uvicorn's graceful shutdown (uvicorn re-raises the signal it caught)."""


def _raise_stop(_signum, _frame) -> None:
    raise _Stop()


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: settings come from ``$KDISTILL_SERVE_SETTINGS``."""
    settings = ServeSettings(**json.loads(os.environ[ENV_SETTINGS]))
    return create_app(load_predictor(settings.model, settings.threads), settings)


def check_port(host: str, port: int) -> None:
    """Fail in one line, before loading anything, when ``host:port`` cannot be listened on."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}); "
                        "pick another --port or --host") from None


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          settings: ServeSettings | None = None, data: str | None = None,
          log_level: str = "info", int8: bool = False) -> None:
    """``kdistill serve``: run uvicorn until interrupted. ``int8``: a run folder or checkpoint
    is exported to int8 ONNX first (an .onnx file, fp32 or int8, is served as it is)."""
    import uvicorn

    if workers < 1:
        raise UserError("--workers must be >= 1")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port (0..65535)")
    settings = settings or ServeSettings()
    is_checkpoint = detect_format(model) == "checkpoint"
    if int8 and not is_checkpoint:
        raise UserError(f"--int8 exports a run folder or checkpoint; '{model}' is an exported file, "
                        "which is served as it is (drop --int8)")
    check_port(host, port)
    workdir = tempfile.mkdtemp(prefix="kdistill-serve-") if is_checkpoint else None
    on_term = None
    try:
        settings.model = model_for_serving(model, workdir, data, int8) if workdir else model
        if settings.threads is None and workers > 1:
            settings.threads = max(1, (os.cpu_count() or 1) // workers)
        predictor = load_predictor(settings.model, settings.threads)  # fail fast, in one line
        batching = (f"micro-batching up to {settings.max_batch} images / {settings.max_wait_ms:g} ms"
                    if settings.max_batch > 1 else "no micro-batching")
        precision = f", {predictor.meta['precision']}" if predictor.meta.get("precision") else ""
        print(f"serving {predictor.meta['arch']} ({predictor.backend}{precision}, {len(predictor.classes)} classes) "
              f"from {settings.model} on http://{host}:{port}, {workers} worker(s), {batching}", flush=True)
        if threading.current_thread() is threading.main_thread():  # stop cleanly on SIGTERM too
            on_term = signal.signal(signal.SIGTERM, _raise_stop)
        if workers == 1:
            uvicorn.run(create_app(predictor, settings), host=host, port=port, log_level=log_level,
                        access_log=False)
        else:
            del predictor
            os.environ[ENV_SETTINGS] = json.dumps(asdict(settings))
            uvicorn.run("kdistill.deploy.serve:app_from_env", factory=True, host=host, port=port,
                        workers=workers, log_level=log_level, access_log=False)
    except (KeyboardInterrupt, _Stop):
        pass  # Ctrl-C / SIGTERM: uvicorn has already shut down gracefully
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
