"""``kdistill report``: numbers equal ``kdistill eval --json``, the probability cache, a bare
checkpoint, no onnxruntime, no teacher, bad input (one line, exit 2, no report written),
and the helpers (calibration, teacher matching, training log). The page in a real browser:
tests/test_report_browser.py."""
from __future__ import annotations

import json
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from kdistill.cli import main

FAST = ["--workers", "0", "--bench-seconds", "0.02"]


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class _Table(HTMLParser):
    """The comparison table's ``data-value`` cells: {run: {key: float}} (and ``n``)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict] = {}
        self.run: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-run" in a:
            self.run = a["data-run"]
            self.rows[self.run] = {"n": int(a["data-n"]), "role": a.get("class")}
        elif tag == "td" and self.run and "data-value" in a:
            self.rows[self.run][a["data-key"]] = float(a["data-value"])


def table(html: str) -> dict[str, dict]:
    parser = _Table()
    parser.feed(html)
    return parser.rows


def eval_json(capsys, run: Path, root: Path, *extra) -> dict:
    code, out, err = cli(capsys, "eval", run, "--data", root, "--json", "--workers", "0", *extra)
    assert code == 0, err
    return json.loads(out)


def test_report_numbers_equal_eval_json_and_come_from_the_cache_again(tiny_root, trained_run, distilled_run,
                                                                      tmp_path, capsys):
    out = tmp_path / "report.html"
    code, stdout, err = cli(capsys, "report", trained_run, distilled_run, "--data", tiny_root, "--out", out, *FAST)
    assert code == 0, err
    assert stdout.strip().endswith(f"report: {out}")
    html = out.read_text()
    rows = table(html)
    assert set(rows) == {trained_run.name, distilled_run.name}
    # the teacher recorded in the student's checkpoint is recognised among the runs
    assert rows[trained_run.name]["role"] == "teacher" and rows[distilled_run.name]["role"] == "student"
    for run in (trained_run, distilled_run):
        ev = eval_json(capsys, run, tiny_root)
        assert {k: rows[run.name][k] for k in ("top1", "top5", "mpa", "n")} == \
            {k: ev[k] for k in ("top1", "top5", "mpa", "n")}
    with_teacher = eval_json(capsys, distilled_run, tiny_root, "--teacher", trained_run, "--teacher-runtime", "eager")
    assert rows[distilled_run.name]["agreement"] == with_teacher["agreement"]
    assert rows[distilled_run.name]["kl_to_teacher"] == pytest.approx(with_teacher["kl_to_teacher"], rel=1e-4, abs=1e-6)
    # self-contained: nothing but data: URIs and in-page anchors, no script, no stylesheet link
    assert all(u.startswith(("data:", "#")) for u in re.findall(r'\b(?:src|href)="([^"]*)"', html))
    assert "<script" not in html and "<link" not in html and html.count("<svg") >= 7
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "ids must be unique across the page's figures"
    assert len(list((distilled_run / "eval-val").glob("probs-*.pt"))) == 1
    # again: probabilities from the cache, the same numbers
    code, _, err = cli(capsys, "report", trained_run, distilled_run, "--data", tiny_root, "--out", out, *FAST)
    assert code == 0 and err.count("cached probabilities") == 2, err
    assert table(out.read_text()) == rows


def test_tta_numbers_equal_eval_tta(tiny_root, distilled_run, tmp_path, capsys):
    from kdistill.report.build import build_report

    rows = build_report([str(distilled_run)], str(tiny_root), tmp_path / "r.html", tta=True, workers=0,
                        bench_seconds=0.02)["rows"]
    student = next(r for r in rows if r["role"] == "student")
    ev = eval_json(capsys, distilled_run, tiny_root, "--tta")
    assert {k: student[k] for k in ("top1", "top5", "mpa", "n")} == {k: ev[k] for k in ("top1", "top5", "mpa", "n")}
    assert list((distilled_run / "eval-val").glob("probs-*-tta.pt"))


def test_bare_checkpoint_without_onnxruntime(tiny_root, trained_run, distilled_run, tmp_path, monkeypatch):
    from kdistill.report.build import build_report

    ckpt = tmp_path / "student.safetensors"
    shutil.copyfile(distilled_run / "best.safetensors", ckpt)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    out = tmp_path / "r.html"
    rows = build_report([str(ckpt)], str(tiny_root), out, workers=0, bench_seconds=0.02)["rows"]
    html = out.read_text()
    assert "onnxruntime is not installed" in html and "no training log" in html
    assert [r["role"] for r in rows] == ["teacher", "student"]  # the recorded teacher, found on disk
    assert all(r["ort_ms_b1"] is None and r["eager_ms_b1"] > 0 for r in rows)
    assert rows[1]["train_seconds"] is None and rows[0]["train_seconds"] > 0
    assert list((tmp_path / "eval-val-student").glob("probs-*.pt"))  # the cache beside the file


def test_no_teacher_on_the_test_split(tiny_root, trained_run, tmp_path):
    from kdistill.report.build import build_report

    rows = build_report([str(trained_run)], str(tiny_root), tmp_path / "r.html", split="test", workers=0,
                        bench_seconds=0.02)["rows"]
    assert len(rows) == 1 and rows[0]["agreement"] is None and rows[0]["n"] == 18
    html = (tmp_path / "r.html").read_text()
    assert "no teacher" in html and "Where " not in html


def _other_classes(run: Path, path: Path) -> Path:
    from kdistill.models.checkpoint import load_model, read_meta, save_model

    model, _ = load_model(str(run))
    meta = read_meta(run / "best.safetensors")
    save_model(path, model, {**meta, "classes": ["cat", "dog", "fish"]})
    return path


@pytest.mark.parametrize("case, needle", [
    ("not_a_run", "has no best.safetensors"),
    ("missing", "does not exist"),
    ("damaged", "cannot read checkpoint"),
    ("truncated", "checkpoint"),
    ("classes", "different class sets"),
    ("out_under_file", "cannot be created or written"),
    ("out_is_folder", "is a folder"),
    ("no_data", "--data"),
])
def test_bad_input_is_one_line_exit_2_and_writes_no_report(case, needle, tiny_root, trained_run, tmp_path, capsys):
    out, run, extra = tmp_path / "r.html", trained_run, []
    if case == "not_a_run":
        run = tmp_path / "empty"
        run.mkdir()
    elif case == "missing":
        run = tmp_path / "nope"
    elif case == "damaged":
        run = tmp_path / "bad.safetensors"
        run.write_bytes(b"\x00" * 64)
    elif case == "truncated":
        run = tmp_path / "cut.safetensors"
        data = (trained_run / "best.safetensors").read_bytes()
        run.write_bytes(data[: len(data) // 2])
    elif case == "classes":
        extra = [_other_classes(trained_run, tmp_path / "other.safetensors")]
    elif case == "out_under_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "r.html"
    elif case == "out_is_folder":
        out = tmp_path
    args = ["report", run, *extra, "--out", out, *FAST] + ([] if case == "no_data" else ["--data", tiny_root])
    code, _, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and needle in lines[0], err
    if case == "classes":
        assert "cat" in lines[0] and "circle" in lines[0]  # says which classes differ
    assert case == "out_is_folder" or not (tmp_path / "r.html").exists()
    assert not list(tmp_path.glob(".r.html.*"))  # no temporary file left behind


# ------------------------------------------------------------------ helpers


def _run(tmp_path: Path, folder: str, meta: dict | None = None, sha: str = "0" * 64):
    from kdistill.report.gather import Run

    path = tmp_path / folder / "best.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    return Run(str(path.parent), path, {"classes": ["a", "b"], "run": str(path.parent), **(meta or {})}, sha)


def test_names_are_unique_and_the_recorded_teacher_is_matched_by_its_trailing_path(tmp_path, monkeypatch):
    from kdistill.report.gather import _same_place, name_runs

    monkeypatch.chdir(tmp_path)  # where runs/demo/... does not exist

    runs = [_run(tmp_path, "a/student"), _run(tmp_path, "b/student"), _run(tmp_path, "b/teacher")]
    name_runs(runs)
    assert [r.name for r in runs] == ["a/student", "b/student", "b/teacher"]
    # a checkpoint records the teacher as typed at training time, relative to another folder
    teacher = _run(tmp_path, "x", {"run": "/elsewhere/runs/demo/teacher"})
    assert _same_place("runs/demo/teacher", teacher) and not _same_place("runs/demo/student", teacher)


def test_training_log_time_and_loss_terms(tmp_path):
    from kdistill.report.gather import loss_terms, training_log, training_seconds

    run = _run(tmp_path, "r")
    rows = [{"epoch": 1, "train.loss": 2.0, "train.kd": 1.5, "train.seconds": 10.0, "train.images_per_s": 9},
            {"epoch": 2, "train.loss": 1.0, "train.kd": 0.5, "train.seconds": 5.5, "val.top1": 0.5}]
    lines = [json.dumps(rows[0]), "{torn", json.dumps(rows[0] | {"train.seconds": 4.0}), json.dumps(rows[1])]
    (run.folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")  # epoch 1 resumed: both count
    log = training_log(run)
    assert len(log) == 3 and training_seconds(log) == 19.5
    assert loss_terms(log) == ["train.loss", "train.kd"]
    assert training_log(_run(tmp_path, "bare")) is None and training_seconds(None) is None


def test_calibration_uses_torchmetrics_and_bins_every_image():
    from torchmetrics.functional.classification import multiclass_calibration_error

    from kdistill.engine.evaluate import result_from_probs
    from kdistill.report.measure import Scores, calibration

    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(200, 4, generator=gen).mul(2).softmax(-1)
    target = torch.randint(0, 4, (200,), generator=gen)
    s = Scores(probs, torch.ones(200, dtype=torch.bool), result_from_probs(probs, target, 4))
    cal = calibration(s, target)
    assert cal["ece"] == pytest.approx(float(multiclass_calibration_error(probs, target, 4, n_bins=15)))
    assert sum(cal["count"]) == 200 and len(cal["edges"]) == 16
    # the diagram's bins give the same ECE: sum over bins of |accuracy - confidence| x share
    ece = sum(c / 200 * abs(a - f) for c, a, f in zip(cal["count"], cal["accuracy"], cal["confidence"]))
    assert ece == pytest.approx(cal["ece"], abs=1e-5)


def test_agreement_and_disagreements_from_probabilities():
    from kdistill.engine.evaluate import kl_per_image, result_from_probs
    from kdistill.report.measure import Scores, compare, disagreements

    t = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    s = torch.tensor([[0.8, 0.2], [0.1, 0.9], [0.45, 0.55], [0.0, 0.0]])  # last image unreadable
    valid = torch.tensor([True, True, True, False])
    y = torch.tensor([0, 0, 1, 1])
    st, te = (Scores(p, valid, result_from_probs(p[valid], y[valid], 2)) for p in (s, t))
    stats = compare(st, te)
    assert stats["agreement"] == pytest.approx(2 / 3)
    assert stats["kl_to_teacher"] == pytest.approx(float(kl_per_image(t[:3], s[:3]).mean()))
    assert disagreements(st, te) == [1]


def test_the_cache_is_keyed_by_checkpoint_data_and_tta(tmp_path):
    from kdistill.report.measure import cache_file

    a, b = _run(tmp_path, "r", sha="a" * 64), _run(tmp_path, "r", sha="b" * 64)
    names = {cache_file(a, "val", False, "f" * 64), cache_file(a, "val", True, "f" * 64),
             cache_file(b, "val", False, "f" * 64), cache_file(a, "val", False, "e" * 64)}
    assert len(names) == 4 and all(p.parent == tmp_path / "r" / "eval-val" for p in names)


def test_charts_with_many_classes_stay_readable():
    from kdistill.report import charts

    k = 100
    classes = [f"class{i}" for i in range(k)]
    gen = torch.Generator().manual_seed(0)
    cm = (torch.eye(k) * 20 + torch.randint(0, 3, (k, k), generator=gen)).long().tolist()
    svg = charts.confusion(cm, classes, "many")
    assert svg.startswith("<svg") and f"{charts.MAX_CONFUSION} most-confused of {k} classes" in svg
    acc = torch.rand(k, generator=gen).tolist()
    bars = charts.per_class(classes, acc, "s", [min(1.0, a + 0.1) for a in acc], "t")
    assert f"the {charts.MAX_BARS} largest gaps of {k}" in bars
    # ids are unique across the figures of one page
    ids = re.findall(r'id="([^"]+)"', svg + bars)
    assert len(ids) == len(set(ids))


def test_recorded_teachers_skip_sources_that_are_not_models(tmp_path):
    run = _run(tmp_path, "r", {"teachers": [{"teacher": "self-ema", "start_epoch": 3},
                                            {"teacher": "runs/t", "soft_labels": "cache/"},
                                            {"teacher": "cache", "soft_labels": "c/"}]})
    assert run.recorded_teachers == ["runs/t"]
