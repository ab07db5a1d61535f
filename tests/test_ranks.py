"""Commands under torchrun (2 CPU processes, gloo): only rank 0 writes the run's own files."""
import json
import textwrap
from pathlib import Path


from kdistill.models.checkpoint import read_meta

from conftest import make_folder, torchrun

# Runs `kdistill ARGS` in each rank, recording every atomic write and file copy it makes
# (rank, path) in LOG_DIR/writes-rank<R>.txt.
PROBE = textwrap.dedent("""
    import contextlib, os, shutil, sys
    from pathlib import Path

    import kdistill.utils as utils
    from kdistill.cli import main

    log_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    log = log_dir / f"writes-rank{os.environ['RANK']}.txt"

    def record(path):
        with open(log, "a") as fh:
            fh.write(str(Path(path).absolute()) + "\\n")

    atomic_path = utils.atomic_path

    @contextlib.contextmanager
    def logged_atomic_path(path):
        record(path)
        with atomic_path(path) as tmp:
            yield tmp

    copyfile = shutil.copyfile

    def logged_copyfile(src, dst, *a, **k):
        record(dst)
        return copyfile(src, dst, *a, **k)

    utils.atomic_path = logged_atomic_path
    shutil.copyfile = logged_copyfile
    raise SystemExit(main(argv))
""")


def writes(log_dir: Path, rank: int) -> list[Path]:
    log = log_dir / f"writes-rank{rank}.txt"
    return [Path(p) for p in log.read_text().splitlines()] if log.is_file() else []


def test_ssld_under_torchrun_rank0_alone_writes_the_summary_table_and_copies(tiny_root, trained_run,
                                                                             tmp_path):
    """Also: the stages run in one process group (re-creating it per stage hung or failed to
    connect), and a second call reuses every stage on both ranks."""
    pool = make_folder(tmp_path / "pool", {"p": 4}, seed=11) / "p"
    out, logs = tmp_path / "ssld", tmp_path / "logs"
    logs.mkdir()
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    args = [str(logs), "ssld", "--data", str(tiny_root), "--teacher", str(trained_run), "--pool", str(pool),
            "--top-k", "2", "--model", "resnet8", "--epochs", "1", "--finetune-epochs", "1", "--out", str(out),
            "--workers", "0", "--no-progress", "--batch-size", "8", "--device", "cpu",
            "-o", "ssld.phash_threshold=-1", "-o", "ssld.embed_threshold=2"]
    proc = torchrun(script, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    own = {out / n for n in ("ssld.md", "summary.json", "best.safetensors", "last.safetensors")}
    rank1 = [p for p in writes(logs, 1) if p.parent == out]
    assert rank1 == [], f"rank 1 wrote {rank1}"
    assert own <= set(writes(logs, 0))
    assert proc.stdout.count("| mine |") == 1  # the table is printed once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["stages"]["mine"]["selected"] == 6
    assert (out / "ssld.md").read_text().count("| mine |") == 1
    assert read_meta(out / "best.safetensors")["arch"] == "resnet8"
    stamp = (out / "finetune" / "last.pt").stat().st_mtime_ns
    again = torchrun(script, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reusing") == 3  # mine, distill, finetune; logged by rank 0
    assert (out / "finetune" / "last.pt").stat().st_mtime_ns == stamp


def test_born_again_under_torchrun(tiny_root, tmp_path):
    """Generations run in one process group; rank 0 alone writes the top-level files."""
    out, logs = tmp_path / "ban", tmp_path / "logs"
    logs.mkdir()
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = torchrun(script, str(logs), "distill", "--data", str(tiny_root), "--model", "resnet8",
                    "--self-distill", "born_again", "--generations", "2", "--epochs", "1", "--out", str(out),
                    "--workers", "0", "--no-progress", "--batch-size", "8", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p for p in writes(logs, 1) if p.parent == out] == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and [g["generation"] for g in summary["generations"]] == [1, 2]
    assert read_meta(out / "gen2" / "best.safetensors")["teachers"][0]["teacher"] == str(out / "gen1")
