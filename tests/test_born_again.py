"""Born-again runs: every config.yaml they write is fed back to the command that made it."""
from kdistill.cli import main
from kdistill.config import load_yaml
from kdistill.models.checkpoint import read_meta

from conftest import TRAIN_ARGS


def _same_run(a, b) -> bool:
    """Two config.yaml files equal but for the run folder."""
    ya, yb = load_yaml(a), load_yaml(b)
    ya["train"].pop("out"), yb["train"].pop("out")
    return ya == yb


def test_every_config_yaml_of_a_born_again_run_repeats_it(tiny_root, tmp_path):
    """README: `kdistill train -c <out>/config.yaml --out NEW` repeats the run. Generation 1
    learns from the labels alone with `train()`, so it writes a train config (no distill
    section); generation 2 a distill config; the top-level folder the born-again config."""
    out = tmp_path / "ban"
    assert main(["distill", "--data", str(tiny_root), "--model", "resnet8", "--self-distill", "born_again",
                 "--generations", "2", "--epochs", "1", "--out", str(out), *TRAIN_ARGS]) == 0
    assert "distill" not in load_yaml(out / "gen1" / "config.yaml")

    again = tmp_path / "again"
    for command, folder in (("train", "gen1"), ("distill", "gen2"), ("distill", ".")):
        written = out / folder / "config.yaml"
        new = again / folder.replace(".", "top")
        assert main([command, "-c", str(written), "--out", str(new), "--epochs", "1"]) == 0, written
        assert _same_run(written, new / "config.yaml"), written
    assert read_meta(again / "gen2" / "best.safetensors")["teachers"][0]["teacher"] == str(out / "gen1")
    top = again / "top"
    assert read_meta(top / "gen2" / "best.safetensors")["teachers"][0]["teacher"] == str(top / "gen1")
    assert (top / "best.safetensors").is_file() and _same_run(out / "gen1" / "config.yaml",
                                                             top / "gen1" / "config.yaml")
