"""The report page: charts and image thumbnails prepared here, HTML from the Jinja2 template
``templates/report.html.j2`` (package data). Everything is inline (CSS, SVG charts, PNG
thumbnails as data: URIs): the file opens offline and makes no request."""
from __future__ import annotations

import base64
import io
import math
from typing import Any

import yaml

from ..data.sources import Source
from . import charts
from .build import RunReport
from .gather import loss_terms

THUMB_PX = 96


def pct(v: Any, digits: int = 2) -> str:
    return f"{100 * v:.{digits}f}%" if _num(v) else "–"


def fixed(v: Any, digits: int = 3) -> str:
    return f"{v:,.{digits}f}" if _num(v) else "–"


def size(n: Any) -> str:
    if not _num(n):
        return "–"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def duration(s: Any) -> str:
    if not _num(s):
        return "–"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60:02d} min"


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def thumbnail(source: Source, i: int, px: int = THUMB_PX) -> str | None:
    """Image ``i`` of ``source`` as a PNG data: URI, scaled to ``px`` on its longer side
    (nearest-neighbour when enlarging, so small images stay sharp)."""
    from PIL import Image

    img = source.load(i)
    if img is None:
        return None
    arr = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
    pil = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy())
    scale = px / max(pil.size)
    pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))),
                     Image.NEAREST if scale >= 1 else Image.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def top_k(probs, classes: list[str], k: int = 3) -> list[tuple[str, float]]:
    p, idx = probs.topk(min(k, len(classes)))
    return [(classes[int(j)], float(v)) for v, j in zip(p, idx)]


def grid(rep: RunReport, teacher: RunReport, source: Source, classes: list[str]) -> list[dict]:
    """The disagreement grid: each image with its true class and both models' top-3."""
    items = []
    for i in rep.disagree:
        src = thumbnail(source, i)
        if src is not None:
            items.append({"src": src, "truth": classes[source.labels[i]], "index": i,
                          "path": source.describe(i),
                          "teacher": top_k(teacher.scores.probs[i], classes),
                          "student": top_k(rep.scores.probs[i], classes)})
    return items


def section(rep: RunReport, teacher: RunReport | None, source: Source, classes: list[str]) -> dict:
    """Charts of one run: training curves, per-class accuracy (beside the teacher), confusion
    matrix, reliability diagram (beside the teacher) and the disagreement grid."""
    is_teacher = teacher is not None and rep is teacher
    vs = teacher if teacher is not None and not is_teacher else None
    result = rep.scores.result
    curves = None
    if rep.log:
        curves = charts.training_curves(rep.log, loss_terms(rep.log), rep.run.name)
    panels = [(rep.run.name, rep.calibration, is_teacher)]
    if vs is not None:
        panels.append((vs.run.name, vs.calibration, True))
    return {
        "rep": rep, "row": rep.row(), "is_teacher": is_teacher, "curves": curves, "id": f"run-{_slug(rep.run.name)}",
        "per_class": charts.per_class(classes, result.per_class, rep.run.name,
                                      vs.scores.result.per_class if vs else None, vs.run.name if vs else ""),
        "confusion": charts.confusion(result.confusion, classes,
                                      f"{rep.run.name}: top-1 {100 * result.top1:.2f}%, n={result.n}"),
        "reliability": charts.reliability(panels),
        "grid": grid(rep, vs, source, classes) if vs is not None else [],
        "config": yaml.safe_dump(rep.provenance["config"], sort_keys=False) if rep.provenance["config"] else None,
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def render(reports: list[RunReport], source: Source, context: dict) -> str:
    """The whole page as one HTML string."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    classes = context["classes"]
    teacher = context["teacher"]
    points = [{"name": rep.run.name, "top1": rep.scores.result.top1, "teacher": rep is teacher,
               "latency_ms": rep.cost["latency"]["torch_eager"].get("1")} for rep in reports]
    env = Environment(loader=PackageLoader("kdistill.report", "templates"), undefined=StrictUndefined,
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=pct, fixed=fixed, size=size, duration=duration)
    sections = [section(rep, teacher, source, classes) for rep in reports]
    return env.get_template("report.html.j2").render(
        **context, sections=sections, tradeoff=charts.accuracy_vs_latency(points),
        run_notes=[(rep.run.name, note) for rep in reports for note in rep.run.notes])
