"""kdistill distill: frozen teachers, terms, views, ensembles, merged label sets,
self-distillation, agreement, resume with adapters, and bad input."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdistill.cli import main
from kdistill.data.transforms import Preprocessing
from kdistill.losses import LOSSES
from kdistill.methods.distill import Distill, LossBank, TermSpec
from kdistill.methods.teachers import Teacher, FrozenTeachers
from kdistill.models import create_model
from kdistill.models.checkpoint import load_state, read_meta

from conftest import CLASSES, TRAIN_ARGS, make_folder, run_cli

PP = Preprocessing(32, [0.5] * 3, [0.25] * 3)


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def distill(tiny_root, teacher, out, *extra, epochs="2", model="resnet8"):
    return main(["distill", "--data", str(tiny_root), "--teacher", str(teacher), "--model", model,
                 "--epochs", epochs, "--out", str(out), "--lr", "0.05", *TRAIN_ARGS, *extra])


@pytest.fixture(scope="module")
def kd_run(tiny_root, trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("kd") / "kd"
    assert distill(tiny_root, trained_run, out, "--loss", "kd:0.9", "--loss", "ce:0.1") == 0
    return out


def test_kd_run_outputs(kd_run, trained_run):
    r = rows(kd_run)
    assert {"train.kd", "train.ce", "train.loss", "val.agreement", "val.kl_to_teacher"} <= r[-1].keys()
    assert 0 <= r[-1]["val.agreement"] <= 1 and r[-1]["val.kl_to_teacher"] >= 0
    meta = read_meta(kd_run / "best.safetensors")
    assert meta["method"] == "distill" and meta["losses"] == ["kd:0.9", "ce:0.1"]
    assert meta["teachers"][0]["teacher"] == str(trained_run)
    # only the student is saved as the model: the same keys as a fresh student
    assert set(load_file(kd_run / "best.safetensors")) == set(create_model("resnet8", 3).state_dict())
    state = load_state(kd_run / "last.pt")
    assert set(state["trainable"]) == {f"student.{k}" for k in create_model("resnet8", 3).state_dict()}


def test_eval_with_teacher_reports_agreement(kd_run, trained_run, tiny_root):
    proc = run_cli("eval", str(kd_run), "--data", str(tiny_root), "--teacher", str(trained_run), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert 0 <= out["agreement"] <= 1 and out["kl_to_teacher"] >= 0
    same = json.loads(run_cli("eval", str(trained_run), "--data", str(tiny_root), "--teacher",
                              str(trained_run), "--json").stdout)
    assert same["agreement"] == 1.0 and abs(same["kl_to_teacher"]) < 1e-5


def _method(teachers, terms, student=None):
    from kdistill.data.transforms import Preprocess
    from kdistill.losses import Shapes, build_loss

    student = student or create_model("resnet8", 3)
    shapes = Shapes(3)
    bank = LossBank({t.name: build_loss(t.name, shapes) for t in terms})
    return Distill(student, Preprocess(PP), teachers, terms, bank)


def test_teacher_is_frozen_and_not_trainable():
    teacher = Teacher(create_model("resnet8", 3), PP, "t")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = _method(FrozenTeachers([teacher]), [TermSpec("kd", 1.0)])
    m.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    trainable = {id(p) for p in m.trainable().parameters()}
    assert not trainable & {id(p) for p in teacher.parameters()}
    opt = torch.optim.SGD(m.trainable().parameters(), lr=0.1)
    out = m({"image": torch.rand(4, 3, 32, 32), "target": torch.tensor([0, 1, 2, 0])})
    out["loss"].backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert out["kd"] > 0 and "ce" not in out


def test_ensemble_averages_probabilities_or_logits():
    a, b = Teacher(create_model("resnet8", 3), PP, "a"), Teacher(create_model("resnet8", 3), PP, "b")
    x = torch.rand(2, 3, 32, 32)
    la, lb = a(x), b(x)
    probs = FrozenTeachers([a, b], [3, 1]).logits(x).exp()
    torch.testing.assert_close(probs, 0.75 * la.softmax(-1) + 0.25 * lb.softmax(-1))
    torch.testing.assert_close(FrozenTeachers([a, b], [1, 1], "logit").logits(x), (la + lb) / 2)


def test_teachers_see_the_same_crop_at_their_own_resolution():
    seen = {}
    student, t_model = create_model("resnet8", 3), create_model("resnet8", 3)
    student.register_forward_pre_hook(lambda m, i: seen.__setitem__("s", i[0]))
    t_model.register_forward_pre_hook(lambda m, i: seen.__setitem__("t", i[0]))
    teacher = Teacher(t_model, Preprocessing(48, [0.4] * 3, [0.2] * 3), "t48")
    m = _method(FrozenTeachers([teacher]), [TermSpec("kd", 1.0)], student)
    x = torch.rand(2, 3, 48, 48)
    m({"image": x, "target": torch.tensor([0, 1])})
    assert seen["s"].shape[-1] == 32 and seen["t"].shape[-1] == 48
    torch.testing.assert_close(seen["t"], (x - 0.4) / 0.2)  # same crop, teacher's normalisation


def test_merged_label_sets_supervise_their_own_classes():
    a = Teacher(create_model("resnet8", 2), PP, "a", ["circle", "square"], [0, 1])
    b = Teacher(create_model("resnet8", 2), PP, "b", ["square", "stripes"], [1, 2])
    tset = FrozenTeachers([a, b])
    assert tset.merged
    m = _method(tset, [TermSpec("kd", 1.0), TermSpec("ce", 0.5)])
    m.eval()
    x = torch.rand(3, 3, 32, 32)
    out = m({"image": x, "target": torch.tensor([0, 1, 2])})
    s = out["logits"].detach()
    kl = LOSSES.get("kd").cls(None).forward
    from kdistill.losses import LossInputs

    want = 0.5 * kl(LossInputs(s[:, [0, 1]], a(x))) + 0.5 * kl(LossInputs(s[:, [1, 2]], b(x)))
    torch.testing.assert_close(out["kd"].detach(), want)
    torch.testing.assert_close(out["loss"].detach(), want + 0.5 * out["ce"].detach())


def test_concat_merge_gives_union_logits():
    """merge=concat: each class takes its teachers' (weighted mean) logit; label-free KD on it."""
    a = Teacher(create_model("resnet8", 2), PP, "a", ["circle", "square"], [0, 1])
    b = Teacher(create_model("resnet8", 2), PP, "b", ["square", "stripes"], [1, 2])
    tset = FrozenTeachers([a, b], [3.0, 1.0], merge="concat", num_classes=3)
    assert tset.merged and not tset.per_teacher
    x = torch.rand(4, 3, 32, 32)
    za, zb = a(x), b(x)
    want = torch.stack([za[:, 0], 0.75 * za[:, 1] + 0.25 * zb[:, 0], zb[:, 1]], dim=1)
    torch.testing.assert_close(tset.logits(x), want)
    m = _method(tset, [TermSpec("kd", 1.0)])
    out = m({"image": x, "target": None})
    kl = LOSSES.get("kd").cls(None).forward
    from kdistill.losses import LossInputs

    torch.testing.assert_close(out["kd"].detach(), kl(LossInputs(out["logits"].detach(), want)))


def test_concat_merge_needs_every_class_covered():
    a = Teacher(create_model("resnet8", 2), PP, "a", ["circle", "square"], [0, 1])
    with pytest.raises(Exception, match="every class covered"):
        FrozenTeachers([a], merge="concat", num_classes=3)


def test_merged_teachers_end_to_end(tmp_path):
    """Two teachers on class subsets teach one student over the union of classes."""
    root = make_folder(tmp_path / "all", {"train": 16, "val": 6})
    teachers = []
    for name, classes in (("ab", CLASSES[:2]), ("bc", CLASSES[1:])):
        sub = make_folder(tmp_path / name, {"train": 16, "val": 6}, classes=classes)
        out = tmp_path / f"t_{name}"
        assert main(["train", "--data", str(sub), "--model", "resnet8", "--epochs", "1", "--out",
                     str(out), *TRAIN_ARGS]) == 0
        teachers += ["--teacher", str(out)]
    out = tmp_path / "merged"
    assert main(["distill", "--data", str(root), *teachers, "--model", "resnet8", "--epochs", "1",
                 "--out", str(out), "--loss", "kd", *TRAIN_ARGS]) == 0
    meta = read_meta(out / "best.safetensors")
    assert [t["classes"] for t in meta["teachers"]] == [CLASSES[:2], CLASSES[1:]]
    assert "train.kd" in rows(out)[0] and "val.agreement" not in rows(out)[0]
    concat = tmp_path / "concat"  # label-free union of the teachers' logits; agreement reported
    assert main(["distill", "--data", str(root), *teachers, "--model", "resnet8", "--epochs", "1",
                 "--out", str(concat), "--loss", "kd", "-o", "distill.merge=concat", *TRAIN_ARGS]) == 0
    assert "val.agreement" in rows(concat)[0]


def test_feature_and_relation_losses_resume_exactly(tiny_root, trained_run, tmp_path, monkeypatch):
    """Adapters (fitnet, crd queue) live in the training state: a resumed run replays."""
    from kdistill.engine.trainer import Trainer

    args = ["--loss", "fitnet:1", "--loss", "crd:0.5", "--loss", "ce:1", "--model", "resnet14"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert distill(tiny_root, trained_run, full, *args) == 0
    report = Trainer._report_epoch

    def interrupt(self, row, stats):  # stop after epoch 1, like Ctrl-C
        report(self, row, stats)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_report_epoch", interrupt)
    assert distill(tiny_root, trained_run, part, *args) == 130
    monkeypatch.undo()
    assert distill(tiny_root, trained_run, part, *args, "--resume") == 0
    a, b = load_file(full / "last.safetensors"), load_file(part / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = load_state(part / "last.pt")
    assert any(k.startswith("losses.") for k in state["trainable"])  # adapters + queue
    assert set(a) == set(create_model("resnet14", 3).state_dict())  # no adapter in the model
    assert {"train.fitnet", "train.crd"} <= rows(part)[-1].keys()


@pytest.mark.parametrize("loss", ["at", "sp", "mgd", "rkd", "pkt", "dkd", "dist", "js", "skl"])
def test_each_method_trains(loss, tiny_root, trained_run, tmp_path):
    assert distill(tiny_root, trained_run, tmp_path / loss, "--loss", loss, "--loss", "ce:0.5",
                   epochs="1") == 0
    assert f"train.{loss}" in rows(tmp_path / loss)[0]


def test_weight_warmup_schedule():
    t = TermSpec("kd", 0.8, warmup=4)
    assert [t.weight_at(e) for e in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])


def test_self_distillation_ema(tiny_root, tmp_path):
    out = tmp_path / "ema"
    assert main(["distill", "--data", str(tiny_root), "--model", "resnet8", "--self-distill", "ema",
                 "--loss", "ce", "--loss", "kd", "--epochs", "2", "--out", str(out), *TRAIN_ARGS]) == 0
    r = rows(out)
    assert "train.kd" not in r[0] and r[1]["train.kd"] >= 0  # teacher from epoch 2 (self_start 0.5)
    state = load_state(out / "last.pt")
    assert state["method"]["teacher_on"] and state["method"]["ema"]


def test_born_again_generations(tiny_root, tmp_path):
    out = tmp_path / "ban"
    assert main(["distill", "--data", str(tiny_root), "--model", "resnet8", "--self-distill", "born_again",
                 "--generations", "2", "--epochs", "1", "--out", str(out), *TRAIN_ARGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [g["generation"] for g in summary["generations"]] == [1, 2]
    assert read_meta(out / "gen2" / "best.safetensors")["teachers"][0]["teacher"] == str(out / "gen1")
    assert (out / "best.safetensors").is_file()


def test_teacher_from_name_and_local_weights(tiny_root, tmp_path):
    w = tmp_path / "r8.safetensors"
    save_file(create_model("resnet8", 3).state_dict(), str(w))
    out = tmp_path / "named"
    assert distill(tiny_root, f"resnet8@{w}", out, "--loss", "kd", epochs="1") == 0
    assert read_meta(out / "best.safetensors")["teachers"][0]["teacher"] == f"resnet8@{w}"


def _one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("extra, needle", [
    (["--loss", "kdd"], "unknown loss 'kdd' (did you mean kd"),
    (["--loss", "kd:lots"], "must be a number"),
    (["--loss", "kd", "--loss", "kd:2"], "given twice"),
    (["--loss", "at", "--feature-pairs", "layer9:layer1"], "no module 'layer9'"),
    (["--loss", "kd", "-o", "distill.loss_params={kd: {tau: 2}}"], "has no parameter 'tau'"),
    (["--loss", "at", "--teacher", "{run}"], "exactly one teacher"),
    (["--teacher", "/nonexistent/run"], "does not exist"),
])
def test_bad_input(extra, needle, tiny_root, trained_run, tmp_path):
    extra = [a.replace("{run}", str(trained_run)) for a in extra]
    proc = run_cli("distill", "--data", str(tiny_root), "--teacher", str(trained_run), "--model",
                   "resnet8", "--out", str(tmp_path / "o"), *TRAIN_ARGS, *extra)
    _one_line_error(proc, needle)


def test_missing_teacher_and_foreign_classes(tiny_root, tmp_path):
    _one_line_error(run_cli("distill", "--data", str(tiny_root), "--model", "resnet8", "--out",
                            str(tmp_path / "o")), "needs --teacher")
    other = make_folder(tmp_path / "other", {"train": 8, "val": 2}, classes=["x", "y", "z"])
    t = tmp_path / "t"
    assert main(["train", "--data", str(other), "--model", "resnet8", "--epochs", "1", "--out", str(t),
                 *TRAIN_ARGS]) == 0
    _one_line_error(run_cli("distill", "--data", str(tiny_root), "--teacher", str(t), "--model",
                            "resnet8", "--out", str(tmp_path / "o2")), "predicts class 'x'")


def test_settings_of_an_unused_loss_are_ignored_and_unknown_names_refused():
    """`-c kd_recipe.yaml --loss ce` keeps working (the recipe's kd settings go unused);
    a name that is no loss at all is a typo."""
    from kdistill.config import build_config
    from kdistill.engine.distill import DistillConfig, parse_terms
    from kdistill.errors import UserError

    def terms(*o):
        return [t.name for t in parse_terms(build_config(DistillConfig, overrides=list(o)).distill)]

    assert terms("distill.losses=[ce]", "distill.loss_params={kd: {temperature: 4}}",
                 "distill.warmup_epochs={dkd: 5}") == ["ce"]
    for key in ("loss_params={kdd: {temperature: 4}}", "warmup_epochs={kdd: 5}"):
        with pytest.raises(UserError, match="unknown loss 'kdd'"):
            terms("distill.losses=[kd]", f"distill.{key}")
