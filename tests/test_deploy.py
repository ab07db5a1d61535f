"""Ship the student: export + parity + model card, predict, HTTP serving (TestClient and a
real uvicorn process), micro-batching, bad input."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, ROOT, corrupt_png, png_bytes, run_cli
from kdistill.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")


def _export(run: Path, out: Path, *extra: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", str(run), "--out", str(out), "--bench-seconds", "0.02", *extra]) == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("export")
    return {"onnx": (d / "student.onnx", _export(trained_run, d / "student.onnx")),
            "torchscript": (d / "student.pt", _export(trained_run, d / "student.pt"))}


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (CRC fixed up)."""
    data = bytearray(png_bytes(1))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_parity_and_metadata(exports, fmt, trained_run):
    from kdistill.deploy.runtime import load_predictor, read_export_meta
    from kdistill.models.checkpoint import read_meta

    path, stdout = exports[fmt]
    line = next(ln for ln in stdout.splitlines() if ln.startswith("parity"))
    assert "on 24 val images of" in line and line.endswith("-> ok"), line
    ckpt = read_meta(trained_run / "best.safetensors")
    meta = read_export_meta(str(path))
    assert meta["format"] == fmt and meta["arch"] == "resnet8" and meta["classes"] == CLASSES
    assert meta["preprocessing"] == ckpt["preprocessing"]
    assert meta["run"] == str(trained_run.resolve()) and meta["kdistill_version"]
    assert meta["input"]["normalized_in_graph"] and meta["input"]["range"] == [0, 1]
    assert meta["method"] == "supervised"
    pred = load_predictor(str(path))
    for batch in (1, 5):  # dynamic batch
        assert pred.logits(np.random.rand(batch, 3, 32, 32).astype(np.float32)).shape == (batch, 3)


def test_onnx_graph_has_dynamic_batch(exports):
    import onnx

    proto = onnx.load(str(exports["onnx"][0]))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert "kdistill" in {p.key for p in proto.metadata_props}


def test_model_card(exports):
    path = exports["onnx"][0]
    card = json.loads(Path(f"{path}.card.json").read_text())
    assert card["model"]["params"] > 1000 and card["model"]["flops"] > 1e6
    for runtime in ("torch_eager", "onnxruntime"):
        assert set(card["latency_ms_per_image"][runtime]) == {"1", "32"}
        assert all(v > 0 for v in card["latency_ms_per_image"][runtime].values())
    assert 0 <= card["accuracy"]["run_best"]["top1"] <= 1 and "mpa" in card["accuracy"]["checkpoint_val"]
    assert card["recipe"]["method"] == "supervised" and card["recipe"]["config"]["model"]["name"] == "resnet8"
    assert card["date"] and "cores" in card["machine"] and card["parity"]["max_abs_diff"] <= 1e-4
    assert card["file"]["opset"] == 17 and len(card["file"]["sha256"]) == 64
    md = Path(f"{path}.card.md").read_text()
    assert "| onnxruntime |" in md and "top-1" in md and "Method: supervised" in md
    ts_card = json.loads(Path(f"{exports['torchscript'][0]}.card.json").read_text())
    assert "torchscript" in ts_card["latency_ms_per_image"]


def test_card_of_a_distilled_student_names_teacher_and_losses(trained_run, tiny_root, tmp_path):
    from conftest import TRAIN_ARGS

    out = tmp_path / "kd"
    assert main(["distill", "--data", str(tiny_root), "--teacher", str(trained_run), "--model", "resnet8",
                 "--loss", "kd:0.9", "--loss", "ce:0.1", "--epochs", "1", "--out", str(out), *TRAIN_ARGS]) == 0
    _export(out, tmp_path / "kd.onnx")
    card = json.loads((tmp_path / "kd.onnx.card.json").read_text())
    assert card["recipe"]["method"] == "distill" and len(card["recipe"]["losses"]) == 2
    assert card["recipe"]["teachers"][0]["teacher"].endswith(str(trained_run.name))
    assert card["recipe"]["config"]["distill"]["teachers"] == [str(trained_run)]
    md = (tmp_path / "kd.onnx.card.md").read_text()
    assert "Teacher:" in md and "Method: distill; loss terms:" in md


def test_export_without_recorded_data_uses_random_inputs(trained_run, tiny_root, tmp_path):
    ckpt = tmp_path / "lone.safetensors"
    shutil.copy(trained_run / "best.safetensors", ckpt)
    out = _export(ckpt, tmp_path / "a.onnx", "--no-card")
    assert "parity uses random inputs" in out and "on 64 random inputs" in out
    assert not Path(f"{tmp_path / 'a.onnx'}.card.md").exists()
    out = _export(ckpt, tmp_path / "b.onnx", "--no-card", "--data", str(tiny_root), "--image-size", "40")
    assert "val images of" in out
    from kdistill.deploy.runtime import read_export_meta

    assert read_export_meta(str(tmp_path / "b.onnx"))["preprocessing"]["image_size"] == 40


@pytest.mark.parametrize("fmt, target", [("onnx", "OnnxPredictor"), ("torchscript", "TorchPredictor")])
def test_failing_parity_is_an_error_and_writes_nothing(trained_run, tmp_path, monkeypatch, capsys, fmt, target):
    import kdistill.deploy.runtime as rt

    orig = getattr(rt, target).logits
    monkeypatch.setattr(getattr(rt, target), "logits", lambda self, x: orig(self, x) + np.arange(3) * 0.05)
    out = tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'pt'}"
    out.write_text("previous")
    assert main(["export", str(trained_run), "--format", fmt, "--out", str(out), "--no-card"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FAILED" in err[0] and "not written" in err[0], err
    assert out.read_text() == "previous" and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("args, needle", [
    (["export", "{tmp}/nope", "--out", "{tmp}/x.onnx"], "does not exist"),
    (["export", "{run}", "--format", "pdf", "--out", "{tmp}/x.pdf"], "invalid choice: 'pdf'"),
    (["export", "{run}", "--out", "{tmp}/x.onnx", "--opset", "99"], "--opset 99"),
    (["export", "{run}", "--out", "{tmp}", "--format", "onnx"], "is a folder"),
    (["export", "{run}", "--out", "{tmp}/model.bin"], "add --format onnx|torchscript"),
    (["export", "{root}/val/circle/000.png", "--out", "{tmp}/x.onnx"], "cannot read checkpoint"),
    (["predict", "{tmp}/missing.onnx", "{root}/val"], "does not exist"),
    (["predict", "{root}/val/circle/000.png", "{root}/val"], "cannot load ONNX model"),
    (["predict", "{run}", "{tmp}/no-images"], "does not exist"),
    (["predict", "{run}", "{tmp}"], "no image files"),
    (["serve", "{tmp}/missing.onnx"], "does not exist"),
    (["serve", "{run}", "--max-batch", "0"], "max-batch must be >= 1"),
    (["serve", "{run}", "--port", "{busy}"], "cannot listen on 127.0.0.1:"),
])
def test_bad_input_exits_2(args, needle, trained_run, tiny_root, tmp_path, capsys):
    with socket.socket() as busy:  # a port something already listens on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [a.format(run=trained_run, root=tiny_root, tmp=tmp_path, busy=busy.getsockname()[1]) for a in args]
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_bad_input_subprocess_one_line_no_traceback(tmp_path):
    proc = run_cli("export", str(tmp_path / "none"), "--format", "onnx", "--out", str(tmp_path / "x.onnx"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr


# ------------------------------------------------------------------ predict


def reference_probs(run: Path, paths: list[Path]) -> np.ndarray:
    """Probabilities the evaluation path (eval_transform + Preprocess) gives these files."""
    from kdistill.images import read_image
    from kdistill.data.transforms import Preprocess, eval_transform
    from kdistill.engine.evaluate import predict_probs
    from kdistill.models.checkpoint import load_model, meta_preprocessing

    model, meta = load_model(str(run))
    pp = meta_preprocessing(meta)
    x = torch.stack([eval_transform(pp.image_size, pp.crop_pct)(read_image(str(p))) for p in paths])
    return predict_probs(model, Preprocess(pp), x).numpy()


def test_predict_folder_with_bad_files_matches_evaluation(exports, trained_run, tiny_root, tmp_path, capsys):
    d = tmp_path / "imgs"
    (d / "nested" / "deeper").mkdir(parents=True)
    good = [d / "a.png", d / "nested" / "b.png", d / "nested" / "deeper" / "c.png", d / "d.jpg"]
    for src, dst in zip(["circle/000.png", "square/001.png", "stripes/002.png"], good):
        shutil.copy(tiny_root / "val" / src, dst)
    Image.open(tiny_root / "val" / "circle" / "003.png").resize((48, 40)).save(good[3], quality=90)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    (d / "nested" / "empty.jpg").write_bytes(b"")
    (d / "nested" / "flipped.png").write_bytes(corrupt_png())
    (d / "readme.txt").write_text("not an image, not scanned")
    ref = dict(zip(good, reference_probs(trained_run, good)))
    for model in (exports["onnx"][0], exports["torchscript"][0], trained_run):
        assert main(["predict", str(model), str(d), "--json", "--top-k", "3", "--batch-size", "2"]) == 0
        captured = capsys.readouterr()
        rows = [json.loads(ln) for ln in captured.out.splitlines()]
        assert len(rows) == 7  # 4 images + 3 unreadable, txt not scanned
        errors = {Path(r["path"]).name: r["error"] for r in rows if "error" in r}
        assert set(errors) == {"corrupt.png", "empty.jpg", "flipped.png"} and errors["empty.jpg"] == "empty file"
        assert "skipped unreadable image" in captured.err and "classified 4 image(s)" in captured.err
        for r in rows:
            if "top_k" in r:
                probs = np.zeros(3)
                for t in r["top_k"]:
                    probs[t["index"]] = t["prob"]
                    assert t["label"] == CLASSES[t["index"]]
                assert np.abs(probs - ref[Path(r["path"])]).max() < 1e-4, (model, r)
    # text output, one explicit file
    assert main(["predict", str(exports["onnx"][0]), str(good[0]), "--top-k", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(good[0]) + "\t") and line.split("\t")[1].split()[0] in CLASSES
    # nothing readable: exit 1
    assert main(["predict", str(exports["onnx"][0]), str(d / "corrupt.png")]) == 1


# ------------------------------------------------------------------ serving (in-process)


@pytest.fixture(scope="module")
def onnx_predictor(exports):
    from kdistill.deploy.runtime import load_predictor

    return load_predictor(str(exports["onnx"][0]))


@contextlib.contextmanager
def client_for(predictor, **settings):
    from fastapi.testclient import TestClient

    from kdistill.deploy.serve import ServeSettings, create_app

    with TestClient(create_app(predictor, ServeSettings(**settings))) as client:
        yield client


def test_server_endpoints_and_bad_uploads(onnx_predictor):
    with client_for(onnx_predictor, max_batch=4, max_wait_ms=2) as c:
        r = c.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"]
        assert len(pred) == 1 and pred[0]["filename"] == "a.png" and len(pred[0]["top_k"]) == 3
        assert {t["label"] for t in pred[0]["top_k"]} == set(CLASSES)
        assert abs(sum(t["prob"] for t in pred[0]["top_k"]) - 1) < 1e-4
        files = [("file", (f"{i}.jpg", png_bytes(20 + i, i, "JPEG"), "image/jpeg")) for i in range(3)]
        r = c.post("/predict?top_k=1", files=files)
        assert r.status_code == 200 and [p["filename"] for p in r.json()["predictions"]] == ["0.jpg", "1.jpg", "2.jpg"]
        assert all(len(p["top_k"]) == 1 for p in r.json()["predictions"])
        bad = [
            ({"files": {"file": ("c.png", b"\x89PNG\r\n\x1a\n corrupt", "image/png")}}, 400, "not a readable image"),
            ({"files": {"file": ("t.txt", b"hello world", "text/plain")}}, 415, "content type 'text/plain'"),
            ({"files": {"file": ("t.bin", b"hello world", "application/octet-stream")}}, 400, "'t.bin'"),
            ({"files": {"file": ("e.png", b"", "image/png")}}, 400, "empty file"),
            ({"files": {"file": ("f.png", corrupt_png(), "image/png")}}, 400, "'f.png': not a readable image"),
            ({"files": {"file": ("bomb.png", bomb_png(), "image/png")}}, 413, "pixels"),
            ({"files": [("file", ("a.png", png_bytes(8), "image/png"))] * 33}, 400, "Too many files"),
            ({"content": b""}, 415, "multipart/form-data"),
            ({"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, ""),
            ({"json": {"file": "x"}}, 415, "application/json"),
            ({"data": {"file": "just text"}, "files": {"other": ("a.png", png_bytes(), "image/png")}}, 400, "is text"),
            ({"files": {"other": ("a.png", png_bytes(), "image/png")}}, 400, "no file"),
        ]
        for kwargs, status, needle in bad:
            r = c.post("/predict", **kwargs)
            assert r.status_code == status and needle in r.json()["error"], (kwargs.keys(), r.status_code, r.text)
        r = c.post("/predict?top_k=0", files={"file": ("a.png", png_bytes(), "image/png")})
        assert r.status_code == 422 and "top_k" in r.json()["error"]
        assert c.get("/nope").json() == {"error": "Not Found"}
        assert c.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")}).status_code == 200
        assert c.get("/health").json()["status"] == "ok"
        meta = c.get("/metadata").json()
        assert meta["classes"] == CLASSES and meta["backend"] == "onnxruntime" and meta["batching"] is True
        assert meta["limits"]["max_pixels"] == 40_000_000
        r = c.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = r.text
        for code in (200, 400, 413, 415, 422):
            assert f'kdistill_http_requests_total{{path="/predict",code="{code}"}}' in text, code
        assert 'kdistill_http_requests_total{path="/predict",code="200"} 3' in text
        assert 'kdistill_http_request_duration_seconds_bucket{path="/predict",le="+Inf"}' in text
        assert "kdistill_images_total 5" in text and "kdistill_queue_depth 0" in text


def test_server_limits_pixels_and_body(onnx_predictor):
    with client_for(onnx_predictor, max_pixels=1000, max_body_bytes=20_000, max_batch=1) as c:
        assert c.post("/predict", files={"file": ("s.png", png_bytes(30), "image/png")}).status_code == 200
        r = c.post("/predict", files={"file": ("big.png", png_bytes(64), "image/png")})
        assert r.status_code == 413 and "4096 pixels" in r.json()["error"]
        r = c.post("/predict", files={"file": ("huge.bin", b"\x00" * 30_000, "image/png")})
        assert r.status_code == 413 and "limit of 20000" in r.json()["error"]

        def chunks():  # no Content-Length: counted while streaming
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
            for _ in range(30):
                yield b"\x00" * 1000
        r = c.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413, r.text
        assert c.post("/predict", files={"file": ("s.png", png_bytes(30), "image/png")}).status_code == 200
        assert c.get("/metadata").json()["batching"] is False


def test_server_full_queue_503_and_model_failure_500(onnx_predictor, monkeypatch):
    two = [("file", (f"{i}.png", png_bytes(), "image/png")) for i in range(2)]
    with client_for(onnx_predictor, queue_size=1, max_batch=2) as c:
        r = c.post("/predict", files=two)
        assert r.status_code == 503 and "server busy" in r.json()["error"] and r.headers["retry-after"] == "1"
        assert c.post("/predict", files=two[:1]).status_code == 200

    def broken(x):
        raise RuntimeError("model exploded")
    monkeypatch.setattr(onnx_predictor, "probs", broken)
    with client_for(onnx_predictor) as c:
        r = c.post("/predict", files=two)
        assert r.status_code == 500 and "model exploded" in r.json()["error"]
        assert c.get("/health").status_code == 200


def test_micro_batcher_groups_concurrent_requests_and_bounds_its_queue():
    from kdistill.deploy.batching import MicroBatcher, QueueFull

    sizes: list[int] = []

    def infer(x: np.ndarray) -> np.ndarray:
        time.sleep(0.01)
        return x.reshape(len(x), -1)[:, :1] * 2

    async def scenario() -> None:
        b = MicroBatcher(infer, max_batch=4, max_wait_ms=50, queue_size=8, on_batch=sizes.append)
        await b.start()
        outs = await asyncio.gather(*(b.submit([np.full((1, 2), float(i))]) for i in range(8)))
        assert [float(o[0][0]) for o in outs] == [2.0 * i for i in range(8)]
        assert sum(sizes) == 8 and max(sizes) <= 4 and len(sizes) < 8
        with pytest.raises(QueueFull):
            await b.submit([np.zeros((1, 2))] * 9)
        await b.stop()

    asyncio.run(scenario())


def test_serving_a_run_folder_exports_it_to_onnx_first(trained_run, tmp_path):
    from kdistill.deploy.runtime import load_predictor
    from kdistill.deploy.serve import model_for_serving

    path = model_for_serving(str(trained_run), str(tmp_path))
    assert path.endswith(".onnx") and load_predictor(path).backend == "onnxruntime"


# ------------------------------------------------------------------ serving (real uvicorn)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_server(model: Path, *args: str):
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kdistill", "serve", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not start"
            time.sleep(0.2)
        yield url
        proc.terminate()  # graceful: SIGTERM ends `kdistill serve` with status 0
        assert proc.wait(timeout=15) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_real_uvicorn_server(exports):
    import httpx

    with uvicorn_server(exports["onnx"][0], "--max-batch", "8", "--max-wait-ms", "30") as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").json()["backend"] == "onnxruntime"
        assert c.get("/metadata").json()["classes"] == CLASSES
        r = c.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")})
        assert r.status_code == 200 and len(r.json()["predictions"][0]["top_k"]) == 3
        files = [("file", (f"{i}.png", png_bytes(32, i), "image/png")) for i in range(4)]
        assert len(c.post("/predict", files=files).json()["predictions"]) == 4
        assert c.post("/predict", files={"file": ("c.png", b"\xff\xd8 not a jpeg", "image/jpeg")}).status_code == 400
        assert c.post("/predict", files={"file": ("f.png", corrupt_png(), "image/png")}).status_code == 400
        assert c.post("/predict", files={"file": ("t.txt", b"text", "text/plain")}).status_code == 415
        assert c.post("/predict", files={"file": ("b.png", bomb_png(), "image/png")}).status_code == 413
        assert c.post("/predict", content=b"").status_code == 415

        def one(i: int) -> int:
            with httpx.Client(base_url=url, timeout=30) as ci:
                return ci.post("/predict", files={"file": (f"{i}.png", png_bytes(32, i), "image/png")}).status_code

        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(one, range(32))) == [200] * 32
        text = c.get("/metrics").text
        metric = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
        assert metric["kdistill_images_total"] == 37
        assert metric["kdistill_batch_size_count"] < 37  # some model calls served several images
        assert metric['kdistill_http_requests_total{path="/predict",code="200"}'] == 34
        assert metric['kdistill_http_requests_total{path="/predict",code="413"}'] == 1
        assert metric['kdistill_http_requests_total{path="/predict",code="400"}'] == 2
        assert c.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")}).status_code == 200
