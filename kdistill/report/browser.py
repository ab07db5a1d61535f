"""A report as a browser sees it: headless Chromium (the system's, e.g. Debian's ``chromium``)
driven by Playwright (``pip install playwright``; the ``dev`` extra has it). Used by the
browser test and to take screenshots:

    python -m kdistill.report.browser runs/demo/report.html --png report.png
    python -m kdistill.report.browser runs/demo/report.html --png top.png --height 900 --scale 1

``KDISTILL_CHROMIUM`` names the browser when it is not on the PATH as chromium,
chromium-browser or google-chrome.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UserError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: what :func:`inspect` reads from the page: images, inline SVG boxes, the comparison table
PAGE_FACTS = """() => ({
  images: [...document.images].map(i => ({alt: i.alt, naturalWidth: i.naturalWidth, complete: i.complete})),
  svgs: [...document.querySelectorAll('svg')].filter(s => !s.parentElement.closest('svg')).map(s => {
    const r = s.getBoundingClientRect(); return {width: r.width, height: r.height}; }),
  exports: Object.fromEntries([...document.querySelectorAll('table.exports tbody tr')].map(tr =>
    [tr.dataset.export, Object.fromEntries([['n', Number(tr.dataset.n)], ['precision', tr.dataset.precision],
      ...[...tr.querySelectorAll('td[data-key]')].map(td =>
        [td.dataset.key, td.dataset.value === undefined ? null : Number(td.dataset.value)])])])),
  table: Object.fromEntries([...document.querySelectorAll('table.compare:not(.exports) tbody tr')].map(tr =>
    [tr.dataset.run, Object.fromEntries([['n', Number(tr.dataset.n)],
      ...[...tr.querySelectorAll('td[data-key]')].map(td =>
        [td.dataset.key, td.dataset.value === undefined ? null : Number(td.dataset.value)])])])),
})"""


def chromium_path() -> str | None:
    """The Chromium executable: ``$KDISTILL_CHROMIUM``, else the first of :data:`BROWSERS`
    on the PATH, else None."""
    env = os.environ.get("KDISTILL_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def missing() -> str | None:
    """Why a report cannot be opened in a browser here, or None when it can."""
    import importlib

    try:
        importlib.import_module("playwright.sync_api")
    except ImportError:
        return "Playwright is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return "no Chromium found (apt-get install chromium, or set KDISTILL_CHROMIUM)"
    return None


@contextmanager
def open_page(html: str | Path, width: int = 1280, height: int = 900, scale: float = 1.0) -> Iterator[tuple]:
    """Yield ``(page, events)`` with ``html`` loaded in headless Chromium; ``events`` collects
    console messages (type, text), uncaught page errors and every requested URL."""
    why = missing()
    if why:
        raise UserError(f"cannot open a browser: {why}")
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=args)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=scale)
            events: dict[str, list] = {"console": [], "page_errors": [], "requests": []}
            page.on("console", lambda m: events["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: events["page_errors"].append(str(e)))
            page.on("request", lambda r: events["requests"].append(r.url))
            page.goto(Path(html).resolve().as_uri(), wait_until="load")
            yield page, events
        finally:
            browser.close()


def inspect(html: str | Path) -> dict:
    """What the browser saw: console errors, page errors, requests other than the file itself
    (data: URIs excluded), each ``<img>``'s natural width, each top-level ``<svg>``'s box,
    the comparison table's values by run and column (``data-value``) and the exports table's
    by file (plus ``precision``)."""
    own = Path(html).resolve().as_uri()
    with open_page(html) as (page, events):
        facts = page.evaluate(PAGE_FACTS)
    return {**facts, "console_errors": [text for kind, text in events["console"] if kind == "error"],
            "page_errors": events["page_errors"],
            "requests": [u for u in events["requests"] if u != own and not u.startswith("data:")]}


def screenshot(html: str | Path, png: str | Path, width: int = 1280, height: int | None = None,
               scale: float = 1.0) -> Path:
    """A PNG of the report: the whole page, or its top ``height`` pixels."""
    with open_page(html, width, height or 900, scale) as (page, _):
        page.screenshot(path=str(png), full_page=height is None)
    return Path(png)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdistill.report.browser", description=__doc__.split("\n\n")[0])
    p.add_argument("html", help="a report written by kdistill report")
    p.add_argument("--png", help="write a screenshot here (default: only check the page)")
    p.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    p.add_argument("--height", type=int, help="screenshot the top HEIGHT pixels (default: the whole page)")
    p.add_argument("--scale", type=float, default=1.0, help="device pixel ratio (2: sharper, 4x the pixels)")
    args = p.parse_args(argv)
    try:
        if args.png:
            print(screenshot(args.html, args.png, args.width, args.height, args.scale))
            return 0
        facts = inspect(args.html)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bad = facts["console_errors"] + facts["page_errors"] + facts["requests"]
    print(f"{len(facts['images'])} images, {len(facts['svgs'])} charts, {len(facts['table'])} runs; "
          f"{len(bad)} problem(s)" + "".join(f"\n  {b}" for b in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
