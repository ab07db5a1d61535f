"""Config: YAML files, dotted overrides, flag precedence, errors that name the key."""
from typing import Literal

import pytest

from kdistill.config import Config, build_config, coerce, dump_yaml, load_yaml, parse_override
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
