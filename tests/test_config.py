"""Config: YAML files, dotted overrides, flag precedence, errors that name the key."""
import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from kdistill.config import (Config, add_flags, arg, build_config, coerce, dump_yaml, from_args, load_yaml,
                             parse_override)
from kdistill.errors import UserError


def test_defaults_and_override_types():
    cfg = build_config(Config, overrides=["train.epochs=3", "optim.lr=1e-3", "data.mean=[0.5,0.5,0.5]",
                                          "train.amp=true", "optim.clip_grad=null"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.train.amp is True and cfg.optim.clip_grad is None


def test_precedence_file_flags_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 7\n  batch_size: 32\nmodel:\n  name: resnet56\n")
    cfg = build_config(Config, [str(f)], {"train.epochs": 5, "model.name": None}, ["train.batch_size=8"])
    assert cfg.train.epochs == 5          # flag beats file
    assert cfg.train.batch_size == 8      # override beats file
    assert cfg.model.name == "resnet56"   # unset flag leaves file value


def test_roundtrip_yaml(tmp_path):
    cfg = build_config(Config, overrides=["train.epochs=2", "data.scale=[0.5,1.0]"])
    dump_yaml(cfg, tmp_path / "config.yaml")
    again = build_config(Config, [str(tmp_path / "config.yaml")])
    assert again == cfg


@pytest.mark.parametrize("override, needle", [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("trian.epochs=3", "unknown config key 'trian'"),
    ("train.epochs=three", "'train.epochs' expects int"),
    ("train.epochs=2.5", "'train.epochs' expects int"),
    ("train.amp=maybe", "'train.amp' expects one of true, false, auto"),
        ("optim.clip_grad=big", "'optim.clip_grad' expects float or null"),
    ("data.crop=zoom", "'data.crop' expects one of auto, rrc, pad, none"),
    ("train.epochs=0", "'train.epochs' must be > 0"),
    ("data.mean=[0.5]", "'data.mean' must have 3 values"),
    ("noequals", "must look like key=value"),
])
def test_errors_name_the_key(override, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        build_config(Config, overrides=[override])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_yaml(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_yaml(bad)
    seq = tmp_path / "seq.yaml"
    seq.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_yaml(seq)


def test_coerce_widening_and_literals():
    assert coerce(3, float, "k") == 3.0
    assert coerce("1e-4", float, "k") == pytest.approx(1e-4)
    assert coerce(False, Literal["auto", "yes", "no"], "k") == "no"  # YAML's bare `no`
    with pytest.raises(UserError):
        coerce(True, int, "k")


def test_parse_override_values():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=hello world") == ("a", "hello world")
    assert parse_override("a=") == ("a", "")


def test_flags_come_from_the_dataclass_fields():
    """add_flags: one --flag per field declared with arg(), typed, with its help and default."""
    @dataclass
    class Toy:
        size: int = arg(3, "how many", "N")
        mode: Literal["a", "b"] = arg("a", "which one")
        fast: bool = arg(False, "go fast")
        rate: float = arg(0.5, "100% is 1.0")
        other: str = "no flag"  # not declared with arg()

    p = argparse.ArgumentParser()
    add_flags(p, Toy)
    assert from_args(Toy, p.parse_args([])) == Toy()
    assert from_args(Toy, p.parse_args(["--size", "5", "--mode", "b", "--fast", "--rate", "1"]),
                     other="x") == Toy(5, "b", True, 1.0, "x")
    text = p.format_help()
    assert "how many (default 3)" in text and "{a,b}" in text and "100% is 1.0" in text
    assert "--other" not in text
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])
    q = argparse.ArgumentParser()  # flags over config files: unset stays None
    add_flags(q, Toy, ["size", "fast"], defaults=False, required=["size"])
    assert vars(q.parse_args(["--size", "2"])) == {"size": 2, "fast": None}


# the ssld section as a run of the release before MineConfig wrote it to config.yaml
OLD_SSLD_YAML = """\
ssld:
  pool: pool/
  top_k: 7
  dedup_against: []
  min_prob: 0.1
  phash_threshold: -1
  embed_threshold: 2.0
  unlabeled_fraction: null
  losses: [js:1.0]
  finetune_epochs: 1
  finetune_lr: 0.01
  finetune_losses: [ce:1.0]
  finetune_image_size: null
"""


def test_mine_and_the_ssld_section_share_one_config(tmp_path):
    """`kdistill mine` and the ssld section declare mining once (MineConfig): same fields,
    defaults and checks; only batch_size and workers follow the ssld run's own."""
    from kdistill.engine.ssld import SSLDConfig, SSLDSection
    from kdistill.mining import MineConfig

    assert issubclass(SSLDSection, MineConfig)
    shared = [f.name for f in dataclasses.fields(MineConfig)]
    own = {"batch_size", "workers"}
    assert {k: getattr(SSLDSection(), k) for k in shared if k not in own} == \
        {k: getattr(MineConfig(), k) for k in shared if k not in own}
    cfg = build_config(SSLDConfig, overrides=["eval.batch_size=32", "data.workers=0", "ssld.top_k=5"])
    assert cfg.ssld.mine_config(cfg) == MineConfig(top_k=5, batch_size=32, workers=0)
    cfg = build_config(SSLDConfig, overrides=["ssld.batch_size=8", "ssld.workers=1", "ssld.keep_work=true"])
    assert cfg.ssld.mine_config(cfg) == MineConfig(batch_size=8, workers=1, keep_work=True)
    # an ssld config.yaml written before MineConfig still loads, and a new one round-trips
    old = tmp_path / "old.yaml"
    old.write_text(OLD_SSLD_YAML)
    cfg = build_config(SSLDConfig, [str(old)])
    assert cfg.ssld.mine_config(cfg) == MineConfig(top_k=7, min_prob=0.1, phash_threshold=-1, embed_threshold=2.0)
    assert (cfg.ssld.pool, cfg.ssld.finetune_epochs) == ("pool/", 1)
    dump_yaml(cfg, tmp_path / "new.yaml")
    assert build_config(SSLDConfig, [str(tmp_path / "new.yaml")]) == cfg


@pytest.mark.parametrize("key, value, message", [
    ("top_k", 0, "must be a positive number of images per class, got 0"),
    ("batch_size", 0, "must be positive, got 0"),
    ("shard_size", -1, "must be positive, got -1"),
    ("workers", -1, "must be >= 0, got -1"),
    ("phash_threshold", 65, "is a number of bits out of 64 (negative disables), got 65"),
    ("embed_threshold", -1.5, "is a cosine in [-1, 1] (above 1 disables), got -1.5"),
    ("min_prob", 1.5, "must be in [0, 1], got 1.5"),
])
def test_bad_mining_values_name_the_flag_or_the_key(key, value, message):
    from kdistill.engine.ssld import SSLDConfig
    from kdistill.mining import MineConfig

    flag = "--" + key.replace("_", "-")
    with pytest.raises(UserError) as err:
        MineConfig(**{key: value})
    assert str(err.value) == f"{flag} {message}"
    with pytest.raises(UserError) as err:
        build_config(SSLDConfig, overrides=[f"ssld.{key}={value}"])
    assert str(err.value) == f"config key 'ssld.{key}' {message}"


def test_workers_flags_take_a_count_or_auto():
    """--workers of train/distill/cache/eval/report accept ``auto`` (issue 25): train keeps
    it as the config value (resolved on the machine that runs), eval resolves it for its device."""
    import argparse

    from kdistill.cli import build_parser
    from kdistill.config import eval_workers, workers_flag

    assert workers_flag("auto") == "auto" and workers_flag("3") == 3
    with pytest.raises(argparse.ArgumentTypeError):
        workers_flag("-1")
    parser = build_parser()
    assert parser.parse_args(["train", "--workers", "auto"]).workers == "auto"
    assert parser.parse_args(["eval", "RUN", "--workers", "auto"]).workers == "auto"
    assert parser.parse_args(["report", "RUN", "--workers", "0"]).workers == 0
    assert eval_workers("auto", "cpu") == 2 and eval_workers(5, "cpu") == 5
