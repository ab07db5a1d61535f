"""Labeled + unlabeled training (SSLD): mixed batches, label-free terms, ce on labeled rows only."""
import json

import pytest
import torch

from kdistill.cli import main
from kdistill.data.loader import MixedBatchSampler
from kdistill.data.sources import UNLABELED, open_unlabeled
from kdistill.data.transforms import Preprocess, Preprocessing
from kdistill.errors import UserError
from kdistill.losses import LOSSES, Shapes, build_loss
from kdistill.methods.distill import Distill, LossBank, TermSpec
from kdistill.methods.teachers import Teacher, FrozenTeachers
from kdistill.models import create_model

from conftest import TRAIN_ARGS, make_folder, run_cli

PP = Preprocessing(32, [0.5] * 3, [0.25] * 3)


def test_mixed_batches_hold_the_set_fraction_and_replay():
    s = MixedBatchSampler(40, 100, batch_size=10, fraction=0.3, seed=1)
    s.set_epoch(2)
    batches = list(s)
    assert len(batches) == len(s) == 14
    assert all(e == 2 for b in batches for _, e in b)  # (index, epoch) keys
    assert all(sum(i >= 40 for i, _ in b) == 3 and len(b) == 10 for b in batches)
    s.set_epoch(2)
    assert list(s) == batches
    s.set_epoch(3)
    assert list(s) != batches
    # DDP: two ranks see disjoint batches of the same global order
    r0, r1 = (list(MixedBatchSampler(40, 100, 10, 0.3, 1, rank=r, world=2)) for r in (0, 1))
    assert len(r0) == len(r1) == 7 and not set(map(tuple, r0)) & set(map(tuple, r1))


def test_unlabeled_rows_never_reach_ce(monkeypatch):
    seen = {}
    ce_cls = LOSSES.get("ce").cls
    orig = ce_cls.forward

    def spy(self, inp):
        seen["targets"] = inp.targets.clone()
        seen["n"] = inp.s_logits.shape[0]
        return orig(self, inp)

    monkeypatch.setattr(ce_cls, "forward", spy)
    teacher = Teacher(create_model("resnet8", 3), PP, "t")
    terms = [TermSpec("ce", 1.0), TermSpec("js", 1.0), TermSpec("kd", 1.0)]
    bank = LossBank({t.name: build_loss(t.name, Shapes(3)) for t in terms})
    m = Distill(create_model("resnet8", 3), Preprocess(PP), FrozenTeachers([teacher]), terms, bank)
    m.eval()
    y = torch.tensor([2, UNLABELED, 0, UNLABELED])
    out = m({"image": torch.rand(4, 3, 32, 32), "target": y})
    assert seen["n"] == 2 and seen["targets"].tolist() == [2, 0]
    logits = out["logits"].detach()
    want = torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([2, 0]))
    torch.testing.assert_close(out["ce"].detach(), want)
    # all unlabeled: ce contributes nothing, label-free terms still train
    out = m({"image": torch.rand(2, 3, 32, 32), "target": torch.tensor([UNLABELED, UNLABELED])})
    assert out["ce"] == 0 and out["js"] > 0


def test_open_unlabeled_folder_and_list(tmp_path, tiny_root):
    src = open_unlabeled(str(tiny_root / "test"), ["a", "b", "c"])
    assert len(src) == 18 and set(src.labels) == {UNLABELED}
    lst = tmp_path / "l.txt"
    lst.write_text(f"{src.paths[0]} 2  # p=0.9\n{src.paths[1]}\n\n# comment\n")
    assert open_unlabeled(str(lst), ["a"]).paths == src.paths[:2]
    with pytest.raises(UserError, match="do not exist"):
        open_unlabeled(str(tmp_path / "none"), ["a"])


def test_distill_with_unlabeled_images(tiny_root, trained_run, tmp_path):
    out = tmp_path / "u"
    assert main(["distill", "--data", str(tiny_root), "--teacher", str(trained_run), "--model", "resnet8",
                 "--epochs", "1", "--out", str(out), "--loss", "js", "--loss", "ce:0.5",
                 "--unlabeled", str(tiny_root / "test"), "--unlabeled-fraction", "0.5", *TRAIN_ARGS]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train.js"] > 0 and row["train.ce"] > 0
    # 72 labeled + 18 unlabeled images, batches of 16 -> 5 steps of 16
    assert row["train.images_per_s"] * row["train.seconds"] == pytest.approx(80, abs=1)


def test_unlabeled_needs_a_teacher_and_no_mixup(tiny_root, trained_run, tmp_path):
    proc = run_cli("train", "--data", str(tiny_root), "--model", "resnet8", "--out", str(tmp_path / "a"),
                   "-o", f"data.unlabeled={tiny_root / 'test'}")
    assert proc.returncode == 2 and "needs a teacher" in proc.stderr
    proc = run_cli("distill", "--data", str(tiny_root), "--teacher", str(trained_run), "--model", "resnet8",
                   "--out", str(tmp_path / "b"), "--unlabeled", str(tiny_root / "test"), "-o", "data.mixup=0.2",
                   *TRAIN_ARGS)
    assert proc.returncode == 2 and "mixup" in proc.stderr


def test_paddleclas_ssld_list_with_ignore_labels(tiny_root, trained_run, tmp_path):
    """PaddleClas convention: every row of the SSLD list has label 0; labels are ignored."""
    from kdistill.data.sources import scan_images

    lst, cmap = tmp_path / "train_list.txt", tmp_path / "classes.txt"
    lst.write_text("".join(f"{p} 0\n" for p in scan_images(tiny_root / "train")))
    cmap.write_text("0 circle\n1 square\n2 stripes\n")
    out = tmp_path / "p"
    assert main(["distill", "--data", str(lst), "-o", f"data.val={tiny_root / 'val'}", "-o",
                 f"data.class_map={cmap}", "--teacher", str(trained_run), "--model", "resnet8", "--epochs",
                 "1", "--out", str(out), "--loss", "js", "--loss", "ce", "--ignore-labels", *TRAIN_ARGS]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train.ce"] == 0 and row["train.js"] > 0


def test_ssld_command_runs_stages_and_reuses_them(tiny_root, trained_run, tmp_path, capsys):
    """kdistill ssld: mine -> distill (labeled + mined) -> fine-tune, each in its sub-folder;
    a second call reuses every finished stage; the table names the mined count."""
    pool = make_folder(tmp_path / "pool", {"p": 6}, seed=11) / "p"
    out = tmp_path / "ssld"
    args = ["ssld", "--data", str(tiny_root), "--teacher", str(trained_run), "--pool", str(pool),
            "--top-k", "4", "--model", "resnet8", "--epochs", "1", "--finetune-epochs", "1",
            "--out", str(out), *TRAIN_ARGS,  # toy images are perceptual copies of each other: no dedup
            "-o", "ssld.phash_threshold=-1", "-o", "ssld.embed_threshold=2"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| mine | 12 selected of 18 " in table and "fine-tune (labeled)" in table
    mined = (out / "mine" / "mined.txt").read_text().splitlines()
    assert len(mined) == 12
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"mine", "distill (labeled + mined)", "fine-tune (labeled)"}
    assert (out / "finetune" / "best.safetensors").is_file() and (out / "best.safetensors").is_file()
    distill_row = json.loads((out / "distill" / "metrics.jsonl").read_text().splitlines()[0])
    assert distill_row["train.kd"] > 0  # label-free term on labeled + mined images
    # the default distill-stage loss is KL at T = 4 (bench/ssld.py: JS at T = 1 lost 11 points to it)
    from kdistill.config import load_yaml

    assert load_yaml(out / "distill" / "config.yaml")["distill"]["loss_params"] == {"kd": {"temperature": 4.0}}
    # the fine-tune starts from the distilled weights of the last epoch, not the val-selected best,
    # and the table reports last epochs (never selected on the split it shows)
    assert load_yaml(out / "finetune" / "config.yaml")["model"]["checkpoint"].endswith("distill/last.safetensors")
    assert "val top-1 (last epoch)" in table
    assert f"{summary['stages']['fine-tune (labeled)']['final']['top1']:.4f}" in table
    stamp = (out / "distill" / "last.pt").stat().st_mtime_ns
    assert main(args) == 0  # everything finished: reused, not retrained
    assert (out / "distill" / "last.pt").stat().st_mtime_ns == stamp
    assert "reusing" in capsys.readouterr().err
    # another --top-k (or model, epochs, pool) into the same --out: refused before anything is touched
    config = (out / "config.yaml").read_text()
    top3 = [a if a != "4" else "3" for a in args]
    assert main(top3) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ssld.top_k (4 -> 3)" in err and "new --out" in err
    assert (out / "config.yaml").read_text() == config
    assert (out / "distill" / "last.pt").stat().st_mtime_ns == stamp


def test_ssld_config_yamls_repeat_the_run_and_its_stages(tiny_root, trained_run, tmp_path):
    """<out>/config.yaml is the SSLD config (`kdistill ssld -c` repeats the recipe); each
    stage's config.yaml is a distill config (`kdistill distill -c` repeats the stage)."""
    from kdistill.config import load_yaml

    def same_run(a, b):
        ya, yb = load_yaml(a), load_yaml(b)
        ya["train"].pop("out"), yb["train"].pop("out")
        return ya == yb

    pool = make_folder(tmp_path / "pool", {"p": 4}, seed=11) / "p"
    out, again = tmp_path / "ssld", tmp_path / "again"
    assert main(["ssld", "--data", str(tiny_root), "--teacher", str(trained_run), "--pool", str(pool),
                 "--top-k", "2", "--model", "resnet8", "--epochs", "1", "--finetune-epochs", "1",
                 "--out", str(out), *TRAIN_ARGS, "-o", "ssld.phash_threshold=-1",
                 "-o", "ssld.embed_threshold=2"]) == 0
    for stage in ("distill", "finetune"):
        written = out / stage / "config.yaml"
        assert "ssld" not in load_yaml(written)
        assert main(["distill", "-c", str(written), "--out", str(again / stage), "--epochs", "1"]) == 0
        assert same_run(written, again / stage / "config.yaml")
    assert main(["ssld", "-c", str(out / "config.yaml"), "--out", str(again / "top"), "--epochs", "1"]) == 0
    assert same_run(out / "config.yaml", again / "top" / "config.yaml")
    mined = [(out if i == 0 else again / "top") / "mine" / "mined.txt" for i in range(2)]
    assert [len(m.read_text().splitlines()) for m in mined] == [6, 6]  # top-2 of 3 classes
    top_distill = load_yaml(again / "top" / "distill" / "config.yaml")
    assert top_distill["data"]["unlabeled"] == str(again / "top" / "mine" / "mined.txt")
    assert (again / "top" / "summary.json").is_file()


def test_ssld_refuses_a_teacher_over_other_classes(tiny_root, tmp_path):
    other = make_folder(tmp_path / "other", {"train": 6, "val": 2}, classes=["x", "y", "z"])
    teacher = tmp_path / "t"
    assert main(["train", "--data", str(other), "--model", "resnet8", "--epochs", "1", "--out", str(teacher),
                 *TRAIN_ARGS]) == 0
    proc = run_cli("ssld", "--data", str(tiny_root), "--teacher", str(teacher), "--pool", str(tiny_root / "test"),
                   "--top-k", "2", "--model", "resnet8", "--out", str(tmp_path / "s"))
    assert proc.returncode == 2 and "same classes" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("ssld", "--data", str(tiny_root), "--teacher", str(tmp_path / "none"), "--pool",
                   str(tiny_root / "test"), "--top-k", "2", "--model", "resnet8", "--out", str(tmp_path / "s"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_ssld_stage_loss_params_are_the_recipe_s_overridden_by_distill_loss_params():
    from kdistill.engine.ssld import SSLDSection, stage_loss_params

    recipe = SSLDSection().loss_params
    assert stage_loss_params(recipe, {}) == {"kd": {"temperature": 4.0}}
    assert stage_loss_params(recipe, {"kd": {"temperature": 2.0}}) == {"kd": {"temperature": 2.0}}
    assert stage_loss_params(recipe, {"js": {"temperature": 1.0}}) == {"kd": {"temperature": 4.0},
                                                                     "js": {"temperature": 1.0}}
