"""A resumed or reused run is compared with its record (config.yaml + run.json) before
anything is touched: other settings or data stop it with one line, exit 2."""
from __future__ import annotations

import json
import shutil

from conftest import TRAIN_ARGS, make_folder

from kdistill.cli import main


def _train(root, out, *extra):
    return main(["train", "--data", str(root), "--model", "resnet8", "--epochs", "1", "--out", str(out),
                 *TRAIN_ARGS, "-o", "train.max_steps_per_epoch=2", *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_resume_with_another_model_stops_before_touching_the_run(tiny_root, tmp_path, capsys):
    out = tmp_path / "r8"
    assert _train(tiny_root, out) == 0
    config, weights = (out / "config.yaml").read_text(), (out / "last.pt").read_bytes()
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 1 and record["data"]["classes"] == ["circle", "square", "stripes"]
    capsys.readouterr()
    assert _train(tiny_root, out, "--resume", "--model", "resnet20") == 2
    line = _one_error_line(capsys)
    assert "model.name (resnet8 -> resnet20)" in line and "new --out" in line
    assert (out / "config.yaml").read_text() == config and (out / "last.pt").read_bytes() == weights


def test_resume_refuses_more_epochs_of_a_cosine_schedule_and_follows_a_step_one(tiny_root, tmp_path, capsys):
    cosine, step = tmp_path / "cosine", tmp_path / "step"
    assert _train(tiny_root, cosine) == 0
    capsys.readouterr()
    assert _train(tiny_root, cosine, "--resume", "--epochs", "2") == 2
    assert "the cosine schedule was built for 1 epochs" in _one_error_line(capsys)
    assert _train(tiny_root, step, "-o", "optim.sched=step") == 0
    assert _train(tiny_root, step, "-o", "optim.sched=step", "--resume", "--epochs", "2") == 0
    assert json.loads((step / "summary.json").read_text())["epochs"] == 2


def test_resume_accepts_a_moved_dataset_and_result_free_settings(tiny_root, tmp_path, capsys):
    out, moved = tmp_path / "run", tmp_path / "moved"
    assert _train(tiny_root, out, "-o", "optim.sched=step") == 0
    shutil.copytree(tiny_root, moved)
    assert _train(moved, out, "-o", "optim.sched=step", "--resume", "--epochs", "2", "--workers", "1",
                  "-o", "train.sync_every=3", "-o", "eval.batch_size=7", "--device", "cpu") == 0
    assert json.loads((out / "run.json").read_text())["data"]["classes"] == ["circle", "square", "stripes"]


def test_resume_refuses_other_data_at_the_same_path(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "run"
    make_folder(root, {"train": 6, "val": 2})
    assert _train(root, out) == 0
    (root / "train" / "square" / "000.png").unlink()  # same classes, other images
    capsys.readouterr()
    assert _train(root, out, "--resume") == 2
    assert "the train images" in _one_error_line(capsys)
    shutil.rmtree(root / "train" / "stripes")
    shutil.rmtree(root / "val" / "stripes")
    assert _train(root, out, "--resume") == 2
    assert "classes (3 -> 2" in _one_error_line(capsys)


def test_born_again_reuses_generations_only_with_the_same_settings(tiny_root, tmp_path, capsys):
    out = tmp_path / "ba"
    args = ["distill", "--data", str(tiny_root), "--model", "resnet8", "--self-distill", "born_again",
            "--generations", "2", "--epochs", "1", "--out", str(out), *TRAIN_ARGS,
            "-o", "train.max_steps_per_epoch=1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--lr", "0.05"]) == 2
    assert "optim.lr (0.1 -> 0.05)" in _one_error_line(capsys)
    assert main(args) == 0  # the same settings: both generations reused
    assert capsys.readouterr().err.count("reusing finished generation") == 2
