"""The report in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright. No console error and no request besides the file itself; every ``<img>``
decoded (natural width above 0) and every inline ``<svg>`` laid out with a non-empty box;
the comparison table's numbers equal ``kdistill eval --json`` for each run.

Without Chromium or Playwright the test is skipped, with the reason, except under CI
(``CI=true``), where it fails: .ci/run installs Chromium, so a missing browser there is a
broken set-up, not a reason to pass.
"""
from __future__ import annotations

import json
import os

import pytest

from kdistill.cli import main
from kdistill.report import browser


@pytest.fixture(autouse=True)
def need_browser() -> None:
    """Skip (fail under CI=true) before any run is trained when there is no browser."""
    why = browser.missing()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the browser test cannot run: {why}")
    pytest.skip(f"needs headless Chromium and Playwright: {why}")


def always_first_class(run, path):
    """A bare checkpoint of ``run``'s model biased to predict class 0 on every image: a
    student that surely disagrees with its teacher (so the page has an image grid)."""
    import torch

    from kdistill.models.checkpoint import load_model, read_meta, save_model

    model, _ = load_model(str(run))
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.bias[0] += 100.0
    save_model(path, model, read_meta(run / "best.safetensors"))
    return path


def test_report_in_headless_chromium(tiny_root, trained_run, distilled_run, tmp_path, capsys):
    out = tmp_path / "report.html"
    biased = always_first_class(trained_run, tmp_path / "biased.safetensors")
    assert main(["report", str(trained_run), str(distilled_run), str(biased), "--teacher", str(trained_run),
                 "--data", str(tiny_root), "--out", str(out), "--workers", "0", "--bench-seconds", "0.02"]) == 0
    capsys.readouterr()
    seen = browser.inspect(out)

    assert seen["console_errors"] == [] and seen["page_errors"] == []
    assert seen["requests"] == [], "the report must load nothing"
    assert seen["images"] and all(img["naturalWidth"] > 0 for img in seen["images"]), seen["images"]
    assert len(seen["svgs"]) >= 7 and all(s["width"] > 0 and s["height"] > 0 for s in seen["svgs"]), seen["svgs"]

    assert set(seen["table"]) == {trained_run.name, distilled_run.name, "biased"}
    assert seen["table"]["biased"]["agreement"] < 1
    for run in (trained_run, distilled_run, biased):
        assert main(["eval", str(run), "--data", str(tiny_root), "--json", "--workers", "0"]) == 0
        ev = json.loads(capsys.readouterr().out)
        row = seen["table"][run.stem if run.is_file() else run.name]
        assert {k: row[k] for k in ("top1", "top5", "mpa", "n")} == {k: ev[k] for k in ("top1", "top5", "mpa", "n")}


def test_screenshot(tiny_root, trained_run, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "report.html"
    assert main(["report", str(trained_run), "--data", str(tiny_root), "--out", str(out),
                 "--workers", "0", "--bench-seconds", "0.02"]) == 0
    png = browser.screenshot(out, tmp_path / "top.png", width=900, height=600)
    assert Image.open(png).size == (900, 600)
