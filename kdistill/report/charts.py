"""The report's charts: matplotlib figures rendered as inline SVG (text kept as text, no
external fonts), one function per chart. Each returns SVG markup, or None when there is
nothing to draw."""
from __future__ import annotations

import io
import itertools
import math
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..engine.evaluate import confusion_figure  # noqa: E402

TEACHER_COLOR, COLORS = "#d62728", ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
MAX_CONFUSION = 30  # classes drawn in a confusion matrix; above, the most-confused ones
MAX_BARS = 40  # classes in a per-class chart; above, the largest gaps
_ids = itertools.count()
STYLE = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
         "axes.spines.right": False, "font.family": "DejaVu Sans"}


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def teacher_label(name: str) -> str:
    """``name`` marked as the teacher, unless it says so already."""
    return name if "teacher" in name.lower() else f"{name} (teacher)"


def to_svg(fig) -> str:
    """``fig`` as an ``<svg>`` element for inline use; the figure is closed. Every id (and
    each reference to one) gets a prefix of its own, so that figures on one page never share
    an id (matplotlib numbers its groups figure_1, axes_1, ... in each file)."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    prefix = f"kd{next(_ids)}-"
    text = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}\1"', text)
    text = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}\1)", text)
    return re.sub(r'href="#([^"]+)"', rf'href="#{prefix}\1"', text)


def accuracy_vs_latency(points: list[dict]) -> str | None:
    """Top-1 against ms per image (torch eager, batch 1, one thread), teacher as a star.
    ``points``: dicts with name, top1, latency_ms, teacher (bool)."""
    points = [p for p in points if p.get("latency_ms") and p["latency_ms"] > 0]
    if not points:
        return None
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for i, p in enumerate(points):
            style = dict(marker="*", s=220, color=TEACHER_COLOR, zorder=3) if p["teacher"] else \
                dict(marker="o", s=60, color=color(i), zorder=3)
            ax.scatter(p["latency_ms"], 100 * p["top1"], **style)
            ax.annotate(teacher_label(p["name"]) if p["teacher"] else p["name"], (p["latency_ms"], 100 * p["top1"]),
                        textcoords="offset points", xytext=(8, 6 - 14 * (i % 2)), fontsize=8)
        xs = [p["latency_ms"] for p in points]
        if max(xs) / min(xs) > 8:
            ax.set_xscale("log")
        ax.margins(x=0.25, y=0.2)
        ax.set_xlabel("ms per image (torch eager, batch 1, 1 thread)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        return to_svg(fig)


def training_curves(log: list[dict], terms: list[str], name: str) -> str | None:
    """Loss terms by epoch (left; the total ``loss`` dashed, on top) and val top-1 /
    agreement by epoch (right)."""
    if not log:
        return None
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(7.6, 2.8))
        for i, term in enumerate(terms):
            rows = [(r["epoch"], r[term]) for r in log if isinstance(r.get(term), (int, float))]
            total = term == "train.loss"
            if rows:
                left.plot(*zip(*rows), marker="o", ms=3, label=term.removeprefix("train."),
                          **(dict(color="#222", ls="--", zorder=3) if total else dict(color=color(i))))
        left.set_xlabel("epoch")
        left.set_title(f"{name}: training loss")
        if terms:
            left.legend(fontsize=7, frameon=False)
        for i, (key, label) in enumerate([("val.top1", "val top-1"), ("val.agreement", "agreement")]):
            rows = [(r["epoch"], 100 * r[key]) for r in log if isinstance(r.get(key), (int, float))]
            if rows:
                right.plot(*zip(*rows), marker="o", ms=4, color=[color(0), TEACHER_COLOR][i], label=label)
        right.set_xlabel("epoch")
        right.set_ylabel("%")
        right.set_title(f"{name}: validation")
        if right.lines:
            right.legend(fontsize=7, frameon=False)
        else:
            right.text(0.5, 0.5, "no validation logged", ha="center", va="center", transform=right.transAxes)
        epochs = [r["epoch"] for r in log]
        for ax in (left, right):
            ax.set_xlim(min(epochs) - 0.3, max(epochs) + 0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        return to_svg(fig)


def per_class(classes: list[str], student: list[float], name: str, teacher: list[float] | None = None,
              teacher_name: str = "teacher") -> str:
    """Per-class accuracy, the student beside the teacher, classes sorted by the gap
    (teacher minus student, largest first); without a teacher, worst class first."""
    rows = [(c, s, t) for c, s, t in zip(classes, student, teacher or [math.nan] * len(classes))]
    key = (lambda r: -((r[2] if r[2] == r[2] else 0) - (r[1] if r[1] == r[1] else 0))) if teacher else \
        (lambda r: r[1] if r[1] == r[1] else 2)
    rows.sort(key=key)
    shown = rows[:MAX_BARS]
    n = len(shown)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.8, 0.9 + 0.22 * n * (2 if teacher else 1)))
        h = 0.4 if teacher else 0.7
        ys = range(n)
        ax.barh([y - (h / 2 if teacher else 0) for y in ys], [100 * r[1] for r in shown], height=h,
                color=color(0), label=name)
        if teacher:
            ax.barh([y + h / 2 for y in ys], [100 * r[2] for r in shown], height=h, color=TEACHER_COLOR,
                    alpha=0.75, label=teacher_name)
        ax.set_yticks(list(ys), [r[0] for r in shown])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)")
        more = f" (the {n} largest gaps of {len(rows)})" if len(rows) > n else ""
        ax.set_title(("sorted by teacher minus student" if teacher else "worst class first") + more,
                     pad=22 if teacher else 6)
        if teacher:
            ax.legend(fontsize=8, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
        ax.grid(axis="x", alpha=0.3)
        return to_svg(fig)


def most_confused(cm: list[list[int]], k: int = MAX_CONFUSION) -> list[int]:
    """The ``k`` classes with the most misclassified images, as true or as predicted class."""
    n = len(cm)
    off = [sum(cm[i]) + sum(row[i] for row in cm) - 2 * cm[i][i] for i in range(n)]
    return sorted(sorted(range(n), key=lambda i: -off[i])[:k])


def confusion(cm: list[list[int]], classes: list[str], title: str) -> str:
    """Row-normalised confusion matrix; above :data:`MAX_CONFUSION` classes, the most
    confused classes only."""
    if len(classes) > MAX_CONFUSION:
        keep = most_confused(cm)
        title += f" ({len(keep)} most-confused of {len(classes)} classes)"
        cm = [[cm[i][j] for j in keep] for i in keep]
        classes = [classes[i] for i in keep]
    with plt.rc_context(STYLE):
        return to_svg(confusion_figure(cm, classes, title, max_size=5.5, per_class=0.2, fontsize=7))


def reliability(panels: list[tuple[str, dict, bool]]) -> str:
    """Reliability diagrams side by side: accuracy per confidence bin against the diagonal,
    bins with under 1% of the images pale; ``panels`` are (name, calibration dict of
    :func:`~kdistill.report.measure.calibration`, is the teacher)."""
    from matplotlib.colors import to_rgba

    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(2.7 * len(panels), 2.9), squeeze=False)
        for i, (ax, (name, cal, is_teacher)) in enumerate(zip(axes[0], panels)):
            edges, total = cal["edges"], max(sum(cal["count"]), 1)
            filled = [j for j, c in enumerate(cal["count"]) if c > 0]
            base = TEACHER_COLOR if is_teacher else color(i)
            ax.bar([edges[j] for j in filled], [cal["accuracy"][j] for j in filled], width=edges[1] - edges[0],
                   align="edge", edgecolor="white",
                   color=[to_rgba(base, 0.85 if cal["count"][j] >= 0.01 * total else 0.3) for j in filled])
            ax.plot([0, 1], [0, 1], "--", color="#555", lw=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_aspect("equal")
            ax.set_xlabel("confidence")
            ax.set_ylabel("accuracy")
            ax.set_title(f"{teacher_label(name) if is_teacher else name}\nECE {100 * cal['ece']:.2f}%")
        fig.tight_layout()
        return to_svg(fig)
