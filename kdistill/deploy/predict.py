"""``kdistill predict``: classify image files with an exported model or a run.

MODEL is an ONNX file (fp32 or int8: any kdistill export runs as it is), a TorchScript
file, a run folder or a .safetensors checkpoint (run eagerly; with ``--int8``, exported to
int8 ONNX first, as ``kdistill export --int8`` would, and run by ONNX Runtime).
Arguments may be image files or folders (searched recursively for image extensions).
Images are decoded with PIL (:func:`kdistill.deploy.runtime.read_rgb`: the same pixels as
evaluation's :func:`kdistill.images.read_image`, without its crash on corrupt PNGs),
cropped exactly as in evaluation (``ResizeCenterCrop(image_size, crop_pct)``) and fed as
[0, 1] floats (the normalisation is part of the model), in batches.

Output, in input order:

* text (default): ``PATH<TAB>label prob  label prob ...`` per image (top-k);
* ``--json``: JSON lines, one object per image:
  ``{"path": ..., "top_k": [{"label": ..., "index": ..., "prob": ...}, ...]}``,
  or ``{"path": ..., "error": "..."}`` for a file that could not be read.

An unreadable file is reported on stderr (and as an ``error`` line with ``--json``) and
skipped, never fatal. Exit status 0 when at least one image was classified, 1 when none
could be read, 2 for bad arguments (missing model or path, no images found).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from ..data.sources import scan_images
from ..errors import UserError
from .runtime import ImageError, Predictor, Preparer, detect_format, load_predictor, read_rgb, top_k

PREFETCH = 2  # batches decoded ahead of the one running


def collect_images(inputs: list[str]) -> list[str]:
    """Files as given, folders expanded recursively as for training (``data.sources``:
    hidden files skipped, sorted directory order); missing paths are an error."""
    paths: list[str] = []
    empty: list[str] = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            found = scan_images(p)
            empty += [] if found else [arg]
            paths += found
        elif p.exists():
            paths.append(str(p))
        else:
            raise UserError(f"image or folder '{arg}' does not exist")
    if not paths:
        raise UserError(f"no image files to classify in {', '.join(repr(e) for e in empty)} (folders are "
                        "searched recursively for .jpg/.jpeg/.png/.bmp/.gif/.webp/.tif/.ppm files)")
    for arg in empty:
        print(f"kdistill: warning: no image files under '{arg}'", file=sys.stderr)
    return paths


def _load(path: str, prep: Preparer) -> np.ndarray | str:
    """The prepared image, or the reason it is unreadable (a string)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        return prep(read_rgb(path))
    except ImageError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - any failure means "skip this file"
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[0][:200] if text else 'unreadable'}"


def predict_paths(predictor: Predictor, paths: list[str], batch_size: int = 32,
                  k: int = 5, threads: int | None = None) -> Iterator[dict]:
    """One result per path, in order: ``{"path", "top_k"}`` or ``{"path", "error"}``.

    Files are decoded by a small thread pool while the previous batch runs."""
    prep = Preparer(predictor.pp)
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(threads or min(4, os.cpu_count() or 1)) as pool:
        ahead: deque[list[Future]] = deque()  # at most PREFETCH batches decoded in advance
        for n, chunk in enumerate(chunks):
            while len(ahead) < PREFETCH and n + len(ahead) < len(chunks):
                ahead.append([pool.submit(_load, p, prep) for p in chunks[n + len(ahead)]])
            loaded = [f.result() for f in ahead.popleft()]
            good = [i for i, x in enumerate(loaded) if not isinstance(x, str)]
            rows = dict(zip(good, predictor.probs(np.stack([loaded[i] for i in good])))) if good else {}
            for i, path in enumerate(chunk):
                if i in rows:
                    yield {"path": path, "top_k": top_k(rows[i], predictor.classes, k)}
                else:
                    yield {"path": path, "error": loaded[i]}


def format_text(result: dict) -> str:
    return result["path"] + "\t" + "  ".join(f"{t['label']} {t['prob']:.4f}" for t in result["top_k"])


def run_predict(model: str, inputs: list[str], k: int = 5, as_json: bool = False, batch_size: int = 32,
                out: IO[str] | None = None, err: IO[str] | None = None, int8: bool = False,
                data: str | None = None) -> int:
    """``kdistill predict``; returns the exit status (see the module docstring). ``int8``: a
    run folder or checkpoint is exported to int8 ONNX first (in a temporary folder; its
    parity lines go to stderr) and predicted with."""
    out, err = out or sys.stdout, err or sys.stderr
    if k < 1 or batch_size < 1:
        raise UserError("--top-k and --batch-size must be >= 1")
    if int8 and detect_format(model) != "checkpoint":
        raise UserError(f"--int8 exports a run folder or checkpoint; '{model}' is an exported file, "
                        "which runs as it is (drop --int8)")
    paths = collect_images(inputs)
    if not int8:
        return _predict(load_predictor(model), paths, k, as_json, batch_size, out, err)
    from .export import export_to_folder

    with tempfile.TemporaryDirectory(prefix="kdistill-predict-") as work:
        with contextlib.redirect_stdout(err):  # stdout holds the predictions alone
            path = export_to_folder(model, work, data, int8=True)
        return _predict(load_predictor(path), paths, k, as_json, batch_size, out, err)


def _predict(predictor: Predictor, paths: list[str], k: int, as_json: bool, batch_size: int,
             out: IO[str], err: IO[str]) -> int:
    done = bad = 0
    for result in predict_paths(predictor, paths, batch_size, k):
        if "error" in result:
            bad += 1
            print(f"kdistill: skipped unreadable image {result['path']} ({result['error']})", file=err)
        else:
            done += 1
        if as_json:
            print(json.dumps(result), file=out)
        elif "top_k" in result:
            print(format_text(result), file=out)
    precision = predictor.meta.get("precision")
    print(f"kdistill: classified {done} image(s) with {predictor.meta['arch']} ({predictor.backend}"
          + (f", {precision}" if precision else "") + ")"
          + (f"; skipped {bad} unreadable" if bad else ""), file=err)
    return 0 if done else 1
