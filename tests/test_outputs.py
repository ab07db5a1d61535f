"""Output locations: every command that writes checks its --out (or report folder) first,
and one that cannot be created or written ends with exit 2 and one line, no traceback.

As root a chmod'ed folder stays writable, so the unwritable location here sits under a
regular file (``afile/x``): creating it fails whoever runs the tests."""
import importlib
import os
import shutil

import pytest

from conftest import TRAIN_ARGS, run_cli

QUICK = ["--workers", "0", "--no-progress"]
#: command -> its arguments ({bad}: the unwritable location), valid otherwise
COMMANDS = {
    "train": ["train", "--data", "{root}", "--model", "resnet8", "--epochs", "1", "--out", "{bad}", *TRAIN_ARGS],
    "distill": ["distill", "--data", "{root}", "--teacher", "{run}", "--model", "resnet8", "--epochs", "1",
                "--out", "{bad}", *TRAIN_ARGS],
    "ssld": ["ssld", "--data", "{root}", "--teacher", "{run}", "--pool", "{root}/test", "--top-k", "2",
             "--model", "resnet8", "--epochs", "1", "--finetune-epochs", "0", "--out", "{bad}", *TRAIN_ARGS],
    "cache": ["cache", "--teacher", "{run}", "--data", "{root}", "--views", "1", "--out", "{bad}", *QUICK],
    "mine": ["mine", "--teacher", "{run}", "--pool", "{root}/test", "--top-k", "2", "--out", "{bad}/mined.txt",
             *QUICK],
    "export": ["export", "{run}", "--out", "{bad}/student.onnx", "--no-card"],
    "eval": ["eval", "{run}", "--data", "{root}", "--report", "{bad}", "--workers", "0"],
    "demo": ["demo", "--quick", "--data", "{demo}", "--out", "{bad}", "--no-progress"],
}
#: command -> (module, attribute): the first expensive step, which must not run
FIRST_WORK = {
    "train": ("kdistill.engine.run", "open_splits"),
    "distill": ("kdistill.engine.run", "open_splits"),
    "ssld": ("kdistill.engine.ssld", "_check_teacher_classes"),
    "cache": ("kdistill.engine.cache", "open_splits"),
    "mine": ("kdistill.mining.cli", "open_pool"),
    "export": ("kdistill.models.checkpoint", "load_model"),
    "eval": ("kdistill.models.checkpoint", "load_model"),
    "demo": ("kdistill.demo", "run_arm"),
}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """The quick demo trains at batch 128: more images than tiny_root."""
    from conftest import make_folder

    return make_folder(tmp_path_factory.mktemp("demo"), {"train": 50, "val": 10}, size=28)


def _args(command, tiny_root, trained_run, bad, demo_root):
    return [a.format(root=tiny_root, run=trained_run, bad=bad, demo=demo_root) for a in COMMANDS[command]]


def _unwritable(tmp_path):
    (tmp_path / "afile").write_text("a regular file, so nothing can be created under it\n")
    return tmp_path / "afile" / "x"


def _check_one_line(code, stderr, path):
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert str(path) in lines[0] and "afile" in lines[0], lines[0]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unwritable_out_is_a_user_error(command, tiny_root, trained_run, demo_root, tmp_path):
    bad = _unwritable(tmp_path)
    proc = run_cli(*_args(command, tiny_root, trained_run, bad, demo_root))
    _check_one_line(proc.returncode, proc.stderr, bad)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_out_checked_before_any_work(command, tiny_root, trained_run, demo_root, tmp_path, monkeypatch,
                                     capsys):
    """The location is checked before data, models or teachers are loaded."""
    from kdistill.cli import main

    def too_early(*args, **kwargs):
        raise AssertionError(f"{command}: expensive work began before its output location was checked")

    module, attr = FIRST_WORK[command]
    monkeypatch.setattr(importlib.import_module(module), attr, too_early)
    bad = _unwritable(tmp_path)
    code = main(_args(command, tiny_root, trained_run, bad, demo_root))
    _check_one_line(code, capsys.readouterr().err, bad)


def test_eval_default_report_folder_unwritable(tiny_root, trained_run, tmp_path):
    """Without --report, eval writes eval-<split>/ beside the checkpoint: checked too."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(run / "eval-test", ignore_errors=True)  # an earlier test may have evaluated it
    (run / "eval-test").write_text("a file where the report folder would go\n")
    proc = run_cli("eval", str(run), "--data", str(tiny_root), "--split", "test", "--workers", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(run / "eval-test") in lines[0] and "--report" in lines[0], lines[0]


def test_writable_checks_create_and_leave_no_trace(tmp_path):
    from kdistill.utils import ensure_writable_dir, ensure_writable_file_parent

    assert ensure_writable_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []
    ensure_writable_file_parent(tmp_path / "c" / "list.txt", "--out")
    assert list((tmp_path / "c").iterdir()) == []
    ensure_writable_file_parent("list.txt", "--out")  # the current folder


@pytest.mark.parametrize("where", ["under_file", "is_file", "proc"])
def test_writable_check_messages(where, tmp_path):
    from kdistill.errors import UserError
    from kdistill.utils import ensure_writable_dir

    path = {"under_file": _unwritable(tmp_path), "is_file": tmp_path / "f", "proc": "/proc/forbidden/x"}[where]
    if where == "is_file":
        path.write_text("x")
    if where == "proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    with pytest.raises(UserError) as err:
        ensure_writable_dir(path, "--out")
    msg = str(err.value)
    assert "\n" not in msg and f"--out '{path}'" in msg and "choose" in msg, msg
    if where != "proc":
        assert "is a file, not a folder" in msg, msg


@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_user_error_leaves_no_empty_run_folder(command, tiny_root, trained_run, tmp_path, capsys):
    """The run folder is made before any work (to check it); a typo found later takes it away
    again, while a folder that was already there stays."""
    from kdistill.cli import main

    teacher = ["--teacher", str(trained_run)] if command == "distill" else []
    out = tmp_path / "runs" / "typo"
    args = [command, "--data", str(tiny_root), "--model", "no_such_model", *teacher, *TRAIN_ARGS]
    assert main([*args, "--out", str(out)]) == 2
    assert "no_such_model" in capsys.readouterr().err and not out.exists() and out.parent.is_dir()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main([*args, "--out", str(kept)]) == 2 and kept.is_dir()
