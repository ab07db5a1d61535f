"""CLI contract: subcommands, eval --json, bad input -> exit 2 with one line, no traceback."""
import json

import pytest

from conftest import run_cli


def _one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args, needle", [
    (["train", "--data", "/nonexistent", "--model", "resnet20"], "'/nonexistent' does not exist"),
    (["train", "--data", "{root}", "--model", "no_such_model", "--out", "{tmp}/x"], "kdistill list models"),
    (["train", "--data", "{root}", "-o", "train.nope=1"], "unknown config key 'train.nope'"),
    (["train", "--data", "{root}", "-o", "train.epochs=many"], "'train.epochs' expects int"),
    (["train", "--data", "{root}", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "-c", "{tmp}/missing.yaml"], "config file"),
    (["eval", "{tmp}/none", "--data", "{root}"], "does not exist"),
    (["eval", "{root}/train/circle/000.png", "--data", "{root}"], "cannot read checkpoint"),
    (["train", "--model", "resnet8"], "--data"),
])
def test_bad_input(args, needle, tiny_root, tmp_path):
    args = [a.format(root=tiny_root, tmp=tmp_path) for a in args]
    _one_line_error(run_cli(*args), needle)


def test_empty_class_folder(tmp_path):
    from conftest import make_folder

    root = make_folder(tmp_path / "d", {"train": 2, "val": 1})
    (root / "train" / "ghost").mkdir()
    _one_line_error(run_cli("train", "--data", str(root), "--model", "resnet8", "--out", str(tmp_path / "o")),
                    "has no images")


def test_unreadable_checkpoint_as_teacher_init(tmp_path, tiny_root):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    _one_line_error(run_cli("train", "--data", str(tiny_root), "--model", "resnet8", "--out", str(tmp_path / "o"),
                            "-o", f"model.checkpoint={bad}"), "cannot read checkpoint")


def test_eval_json_and_report(trained_run, tiny_root):
    proc = run_cli("eval", str(trained_run), "--data", str(tiny_root), "--split", "test", "--json",
                   "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n"] == 18 and all(0 <= out[k] <= 1 for k in ("top1", "top5", "mpa"))
    report = trained_run / "eval-test"
    for name in ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png"):
        assert (report / name).is_file()
    rows = (report / "confusion.csv").read_text().splitlines()
    assert len(rows) == 4 and sum(int(v) for r in rows[1:] for v in r.split(",")[1:]) == 18
    tta = json.loads(run_cli("eval", str(trained_run), "--data", str(tiny_root), "--tta", "--json",
                             "--workers", "0").stdout)
    assert tta["tta"] is True and tta["n"] == 24


def test_list_models_and_recipes():
    proc = run_cli("list", "models")
    assert proc.returncode == 0 and "resnet56" in proc.stdout and "# timm:" in proc.stdout
    proc = run_cli("list", "models", "wrn_*")
    assert "wrn_40_2" in proc.stdout and "resnet20" not in proc.stdout
    proc = run_cli("list", "recipes")
    assert proc.returncode == 0 and "cifar/kd_resnet56_resnet20" in proc.stdout


def test_python_dash_m_and_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("kdistill ")


def test_demo_quick_has_teacher_student_and_kd_arms(tmp_path):
    from conftest import make_folder

    root = make_folder(tmp_path / "d", {"train": 50, "val": 10}, size=28)
    proc = run_cli("demo", "--quick", "--data", str(root), "--out", str(tmp_path / "demo"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert [r["arm"] for r in rows] == ["teacher", "student", "kd-student"]
    assert all(r["params"] > 0 and r["mflops"] > 0 and r["latency_ms"] > 0 for r in rows)
    assert "top-1 vs student" in proc.stdout
    assert proc.stdout.strip().endswith(f"report: {tmp_path / 'demo' / 'report.html'}")
    assert "kd-student" in (tmp_path / "demo" / "report.html").read_text()
    again = run_cli("demo", "--quick", "--data", str(root), "--out", str(tmp_path / "demo"), "--no-progress")
    assert again.returncode == 0 and again.stderr.count("reusing finished demo arm") == 3, again.stderr
    # the full demo in the same folder: arms of another size are not silently reused
    bigger = run_cli("demo", "--data", str(root), "--out", str(tmp_path / "demo"), "--no-progress")
    assert bigger.returncode == 2 and "demo arm made with other settings" in bigger.stderr, bigger.stderr
    assert "model.name (resnet14 -> resnet20)" in bigger.stderr and len(bigger.stderr.splitlines()) == 1


@pytest.mark.parametrize("command, module, func, hint", [
    ("train", "kdistill.cli", "cmd_train", "--resume"),
    ("cache", "kdistill.cli", "cmd_cache", "run the same command again"),
    ("mine", "kdistill.mining.cli", "cmd_mine", "finished shards are kept"),
    ("eval", "kdistill.cli", "cmd_eval", None),
])
def test_ctrl_c_says_how_to_continue(command, module, func, hint, monkeypatch, capsys):
    """Ctrl-C: exit 130 and one line that tells how this command continues, not a traceback."""
    import importlib

    from kdistill.cli import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), func, interrupted)
    extra = {"train": ["--data", "x"], "cache": ["--teacher", "t", "--data", "x", "--out", "o"],
             "mine": ["--teacher", "t", "--pool", "p", "--top-k", "1", "--out", "o"], "eval": ["run", "--data", "x"]}
    assert main([command, *extra[command]]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill: interrupted") and len(err.splitlines()) == 1
    assert (hint in err) if hint else err == "kdistill: interrupted"


def test_mine_ssld_and_eval_flags_default_to_their_configs(capsys):
    """The flags of mine and eval take their defaults from MineConfig and EvalConfig; ssld's
    mining flags set the ssld section's keys and leave them unset otherwise."""
    from kdistill.cli import build_parser, main, ssld_config
    from kdistill.config import DataConfig, EvalConfig, TrainConfig, from_args
    from kdistill.mining import MineConfig

    parse = build_parser().parse_args
    args = parse(["mine", "--teacher", "t", "--pool", "p", "--top-k", "3", "--out", "o"])
    assert from_args(MineConfig, args) == MineConfig(top_k=3)
    args = parse(["mine", "--teacher", "t", "--pool", "p", "--top-k", "3", "--out", "o", "--min-prob", "0.5",
                  "--phash-threshold", "-1", "--embed-threshold", "2", "--batch-size", "8", "--workers", "0",
                  "--shard-size", "16", "--keep-work"])
    assert from_args(MineConfig, args) == MineConfig(3, 0.5, -1, 2.0, 8, 0, 16, True)
    args = parse(["eval", "run", "--data", "x"])
    assert from_args(EvalConfig, args) == EvalConfig()
    assert (args.workers, args.device) == (DataConfig().workers, TrainConfig().device)
    args = parse(["ssld", "--min-prob", "0.2"])
    assert (args.top_k, args.min_prob, args.phash_threshold, args.embed_threshold) == (None, 0.2, None, None)
    cfg = ssld_config(parse(["ssld", "--min-prob", "0.2", "--phash-threshold", "4", "-o", "ssld.top_k=9"]))
    assert cfg.ssld.mine_config(cfg) == MineConfig(top_k=9, min_prob=0.2, phash_threshold=4)
    assert main(["eval", "run", "--data", "x", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "kdistill: error: config key 'eval.batch_size' must be > 0"
