"""What a user is told, and what a run folder's files look like to other tools: teacher
coverage, file modes, strict JSON, eval folders per data, config spelling, loss syntax,
the teacher-runtime help and Ctrl-C."""
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdistill.data.transforms import Preprocessing
from kdistill.errors import UserError

from conftest import CLASSES, make_folder

PP = Preprocessing(32, [0.5] * 3, [0.25] * 3)


def strict_json(path: Path):
    """``json.loads`` that refuses NaN / Infinity, as most JSON parsers do."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


# ------------------------------------------------------------------ 4: teacher coverage


@pytest.fixture(scope="module")
def subset_teacher(tmp_path_factory) -> Path:
    """A kdistill checkpoint over the first two of the three classes."""
    from kdistill.models import create_model
    from kdistill.models.checkpoint import save_model

    path = tmp_path_factory.mktemp("teachers") / "ab.safetensors"
    save_model(path, create_model("resnet8", 2), {"arch": "resnet8", "num_classes": 2,
                                                   "classes": CLASSES[:2], "preprocessing": PP.to_dict()})
    return path


def _build(teacher: Path, losses: list[str]):
    from kdistill.engine.distill import DistillSection, build_teacher

    ctx = SimpleNamespace(classes=CLASSES, device=torch.device("cpu"), channels_last=False,
                          cfg=SimpleNamespace(model=SimpleNamespace(channels_last=False),
                                              train=SimpleNamespace(epochs=1)))
    return build_teacher(ctx, DistillSection(teachers=[str(teacher)], losses=losses))


def test_subset_teacher_says_its_coverage_and_that_labels_teach_the_rest(subset_teacher, capsys):
    teacher = _build(subset_teacher, ["kd:0.9", "ce:0.1"])
    assert teacher.merged
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert "covers 2 of the student's 3 classes" in err[0] and "distill.merge=subset" in err[0]
    assert err[1].startswith("warning: 1 of the student's 3 classes") and "stripes" in err[1]
    assert "from the labels alone (ce:0.1)" in err[1]


def test_subset_teacher_without_a_label_term_warns_nothing_is_learned(subset_teacher, capsys):
    _build(subset_teacher, ["kd:1.0"])
    warning = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stripes" in warning and "no loss term uses labels" in warning and "ce" in warning


def test_teacher_over_all_classes_stays_quiet(tmp_path, capsys):
    from kdistill.models import create_model
    from kdistill.models.checkpoint import save_model

    path = tmp_path / "all.safetensors"
    save_model(path, create_model("resnet8", 3), {"arch": "resnet8", "num_classes": 3,
                                                   "classes": CLASSES, "preprocessing": PP.to_dict()})
    assert not _build(path, ["kd:1.0"]).merged
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ 6: file modes


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_run_files_get_the_mode_the_umask_gives(tmp_path, umask_022):
    from kdistill.config import Config, dump_yaml
    from kdistill.models import create_model
    from kdistill.models.checkpoint import save_model, save_state
    from kdistill.utils import atomic_write, atomic_write_text, write_json

    save_model(tmp_path / "best.safetensors", create_model("resnet8", 3),
               {"arch": "resnet8", "num_classes": 3, "classes": CLASSES, "preprocessing": PP.to_dict()})
    save_state(tmp_path / "last.pt", {"epoch": 1})
    dump_yaml(Config(), tmp_path / "config.yaml")
    write_json(tmp_path / "summary.json", {"epochs": 1})
    atomic_write_text(tmp_path / "card.md", "# card\n")
    atomic_write(tmp_path / "model.onnx", lambda tmp: tmp.write_bytes(b"\0"))
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
    os.umask(0o077)  # a private umask still gives private files
    write_json(tmp_path / "summary.json", {"epochs": 2})
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o600


def test_no_mkstemp_writers_outside_the_atomic_helpers():
    """Every writer of run files goes through utils.atomic_path (one place sets the mode)."""
    pkg = Path(__file__).resolve().parents[1] / "kdistill"
    users = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                   if any(w in p.read_text() for w in ("mkstemp(", "NamedTemporaryFile(")))
    assert users == ["utils.py"], users


# ------------------------------------------------------------------ 8: strict JSON, eval folders


def test_write_json_writes_null_for_non_finite_floats(tmp_path):
    from kdistill.utils import append_jsonl, write_json

    obj = {"a": float("nan"), "b": [float("inf"), 1.5, (float("-inf"),)], "c": {"d": float("nan")}, "e": 2}
    write_json(tmp_path / "m.json", obj)
    assert strict_json(tmp_path / "m.json") == {"a": None, "b": [None, 1.5, [None]], "c": {"d": None}, "e": 2}
    append_jsonl(tmp_path / "m.jsonl", {"train.loss": float("nan")})
    assert strict_json(tmp_path / "m.jsonl") == {"train.loss": None}


def test_eval_report_of_a_class_without_images_is_valid_json_with_a_note(tmp_path, capsys):
    from kdistill.engine.evaluate import metrics_from_confusion, write_report, EvalResult

    cm = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 2]])
    top1, mpa, per_class = metrics_from_confusion(cm)
    result = EvalResult(top1, 1.0, mpa, 7, 0.5, per_class, cm.tolist())
    write_report(result, CLASSES, tmp_path, {"split": "val"})
    m = strict_json(tmp_path / "metrics.json")
    assert m["per_class"]["square"] is None and m["per_class"]["circle"] == 0.75
    assert m["classes_without_images"] == ["square"] and "square" in m["note"] and "null" in m["note"]
    assert "nan" not in (tmp_path / "per_class.csv").read_text().lower()
    assert "square" in capsys.readouterr().err


def test_eval_on_other_data_keeps_the_run_own_results(trained_run, tiny_root, tmp_path, capsys):
    from kdistill.engine.run import eval_dir, evaluate_run

    run = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(run / "eval-test", ignore_errors=True)
    other = make_folder(tmp_path / "other", {"test": 2}, seed=7)
    common = dict(split="test", workers=0, device="cpu")
    _, own = evaluate_run(str(run), str(tiny_root), **common)
    assert own == run / "eval-test" and "is not the data" not in capsys.readouterr().err
    _, theirs = evaluate_run(str(run), str(other), **common)
    assert theirs.parent == run and theirs.name.startswith("eval-test-") and theirs != own
    err = capsys.readouterr().err
    assert str(theirs) in err and "eval-test/" in err  # said where, and that the old one stays
    assert strict_json(own / "metrics.json")["n"] == 18  # the run's own results are intact
    assert strict_json(theirs / "metrics.json")["n"] == 6
    assert evaluate_run(str(run), str(tiny_root), **common)[1] == own  # same data, same folder
    ckpt = run / "best.safetensors"
    assert eval_dir(str(run), ckpt, "test") == own  # kdistill report's cache: unchanged

    bare = shutil.copy(ckpt, tmp_path / "student.safetensors")  # no config.yaml beside it
    first = evaluate_run(str(bare), str(other), **common)[1]
    second = evaluate_run(str(bare), str(tiny_root), **common)[1]
    assert first == tmp_path / "eval-test-student" and second.name.startswith("eval-test-student-")
    assert strict_json(first / "metrics.json")["n"] == 6


# ------------------------------------------------------------------ 9: spelling, help, Ctrl-C


def test_literal_choices_in_any_case_become_the_canonical_spelling():
    from kdistill.config import Config, build_config

    cfg = build_config(Config, overrides=["data.auto_augment=AutoAugment", "train.amp=AUTO",
                                          "optim.sched=Cosine"])
    assert (cfg.data.auto_augment, cfg.train.amp, cfg.optim.sched) == ("autoaugment", "auto", "cosine")
    with pytest.raises(UserError, match="data.auto_augment"):
        build_config(Config, overrides=["data.auto_augment=AutoAugmentation"])


@pytest.mark.parametrize("text, want", [("kd=0.7", "--loss kd:0.7"), ("ce = 0.1", "--loss ce:0.1")])
def test_loss_with_equals_says_the_form_is_name_colon_weight(text, want):
    from kdistill.engine.distill import DistillSection, parse_terms

    with pytest.raises(UserError, match="NAME:WEIGHT") as err:
        parse_terms(DistillSection(losses=["ce:0.1", text] if text.startswith("kd") else [text]))
    assert want in str(err.value)


def test_teacher_runtime_help_says_what_auto_resolves_to(monkeypatch):
    from kdistill.config import TEACHER_RUNTIME_HELP
    from kdistill.methods import compiled

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    monkeypatch.setattr(compiled, "onnxruntime_available", lambda: True)
    assert compiled.resolve_runtime("auto", torch.device("cuda")) == "compile"
    assert compiled.resolve_runtime("auto", cpu, bf16) == "eager"
    assert compiled.resolve_runtime("auto", cpu) == "onnx"
    monkeypatch.setattr(compiled, "onnxruntime_available", lambda: False)
    assert compiled.resolve_runtime("auto", cpu) == "eager"
    auto = TEACHER_RUNTIME_HELP.split("), ")[0]
    assert "compile on CUDA" in auto and "eager when the run autocasts to bf16" in auto
    assert auto.index("bf16") < auto.index("onnx") and auto.endswith("else eager")


def _interrupt(monkeypatch, capsys, argv, folder=None):
    import kdistill.cli as cli

    def interrupted(args):
        if folder is not None:
            cli.set_run_folder(folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_ctrl_c_before_the_first_epoch_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", "x", "--out", str(out)]
    err = _interrupt(monkeypatch, capsys, argv)
    assert "nothing was saved" in err and str(out) in err and "epoch is saved" not in err
    out.mkdir()
    (out / "last.pt").write_bytes(b"")
    err = _interrupt(monkeypatch, capsys, argv)
    assert "the last completed epoch is saved" in err and f"--resume --out {out}" in err


def test_ctrl_c_names_the_folder_the_run_recorded(tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "resnet8-20260101"  # the default folder: no --out given
    (run / "gen1").mkdir(parents=True)
    (run / "gen1" / "last.pt").write_bytes(b"")  # born-again's generations keep their own
    err = _interrupt(monkeypatch, capsys, ["train", "--data", "x"], folder=run)
    assert f"saved in {run}" in err
    err = _interrupt(monkeypatch, capsys, ["train", "--data", "x"])  # not recorded: no claim
    assert "--resume" in err and "last completed epoch is saved" not in err
