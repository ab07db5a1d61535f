"""The training loop: outputs, repeatability, exact resume, divergence, loop options."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.cli import main
from kdistill.config import Config, build_config
from kdistill.engine import run as run_mod
from kdistill.errors import TrainingError
from kdistill.methods.supervised import Supervised
from kdistill.models.checkpoint import load_state, read_meta

from conftest import ROOT, TRAIN_ARGS


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_folder_contents(trained_run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "best.safetensors",
                 "last.safetensors", "last.pt"):
        assert (trained_run / name).is_file(), name
    assert list((trained_run / "tb").glob("events.out.tfevents.*"))
    r = rows(trained_run)
    assert [x["epoch"] for x in r] == [1, 2]
    assert {"train.loss", "train.ce", "lr", "val.top1", "val.mpa", "train.images_per_s"} <= r[0].keys()
    meta = read_meta(trained_run / "best.safetensors")
    assert meta["arch"] == "resnet8" and meta["classes"] == ["circle", "square", "stripes"]
    assert meta["preprocessing"]["image_size"] == 32 and len(meta["preprocessing"]["mean"]) == 3
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["epochs"] == 2 and 0 <= summary["best"]["top1"] <= 1
    assert r[-1]["val.top1"] > 0.5  # the toy classes are easy


def test_repeat_from_config_yaml(trained_run, tmp_path):
    out = tmp_path / "again"
    assert main(["train", "-c", str(trained_run / "config.yaml"), "--out", str(out), "--no-progress"]) == 0
    assert same_weights(trained_run / "last.safetensors", out / "last.safetensors")
    assert rows(out)[-1]["val.loss"] == rows(trained_run)[-1]["val.loss"]


def test_refuses_to_overwrite_a_run(trained_run):
    before = (trained_run / "last.pt").stat().st_mtime_ns
    assert main(["train", "--data", "x", "--model", "resnet8", "--out", str(trained_run)]) == 2
    assert (trained_run / "last.pt").stat().st_mtime_ns == before


def _train_cmd(root, out, epochs, *extra):
    return [sys.executable, "-m", "kdistill", "train", "--data", str(root), "--model", "resnet8",
            "--epochs", str(epochs), "--out", str(out), "--seed", "3", "--no-progress",
            "--batch-size", "8", "--workers", "1", "-o", "data.in_memory=no", *extra]


def test_resume_after_kill_matches_uninterrupted(tiny_root, tmp_path):
    """Kill -9 a run during epoch 2, resume it: same weights and metrics as a clean run."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_train_cmd(tiny_root, clean, 3), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_train_cmd(tiny_root, killed, 3), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_state(killed / "last.pt")
    assert state["epoch"] < 3  # really interrupted
    subprocess.run(_train_cmd(tiny_root, killed, 3, "--resume"), check=True, env=env, capture_output=True)
    assert same_weights(clean / "last.safetensors", killed / "last.safetensors")
    assert same_weights(clean / "best.safetensors", killed / "best.safetensors")
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in rs]
    assert strip(rows(clean)) == strip(rows(killed))


def test_resume_extends_a_finished_run(tiny_root, tmp_path):
    """A step schedule follows a longer run (cosine refuses: tests/test_resume_record.py)."""
    run = tmp_path / "ext"
    assert main(_train_cmd(tiny_root, run, 2, "-o", "optim.sched=step")[3:]) == 0
    assert main(["train", "--out", str(run), "--resume", "-o", "train.epochs=3", "--no-progress"]) == 0
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
    assert load_state(run / "last.pt")["epoch"] == 3


class _DivergesInEpoch2(Supervised):
    def forward(self, batch):
        out = super().forward(batch)
        if self.epoch == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    def set_epoch(self, epoch, epochs):
        self.epoch = epoch


def test_non_finite_loss_stops_with_intact_checkpoint(tiny_root, tmp_path):
    cfg = build_config(Config, overrides=[f"data.root={tiny_root}", "model.name=resnet8", "train.epochs=3",
                                          f"train.out={tmp_path / 'nan'}", "train.batch_size=16",
                                          "data.workers=0", "train.progress=false"])
    ctx = run_mod.prepare(cfg)
    with pytest.raises(TrainingError, match="loss became nan at epoch 2.*intact"):
        run_mod.fit(ctx, _DivergesInEpoch2(ctx.student, ctx.student_prep()))
    state = load_state(tmp_path / "nan" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "nan" / "last.safetensors").values()
               if v.is_floating_point())


def test_loop_options_together(tiny_root, tmp_path):
    """EMA + R-Drop + mixup/cutmix + label smoothing + accumulation + bf16 AMP + clipping + step lr."""
    out = tmp_path / "opts"
    assert main(["train", "--data", str(tiny_root), "--model", "resnet8", "--epochs", "2", "--out", str(out),
                 *TRAIN_ARGS, "--amp", "--ema", "0.9", "-o", "train.rdrop=0.5", "-o", "model.drop_rate=0.2",
                 "-o", "data.mixup=0.2", "-o", "data.cutmix=1.0", "-o", "data.label_smoothing=0.1",
                 "-o", "train.accum_steps=2", "-o", "optim.clip_grad=1.0", "-o", "optim.sched=step",
                 "-o", "optim.decay_epochs=[1]", "-o", "optim.warmup_epochs=1", "--opt", "adamw",
                 "--lr", "0.003", "-o", "data.auto_augment=trivialaugment"]) == 0
    r = rows(out)
    assert {"train.rdrop", "train.ce"} <= r[0].keys() and all(
        torch.isfinite(torch.tensor(x["train.loss"])) for x in r)
    state = load_state(out / "last.pt")
    assert state["global_step"] == 2 * (72 // 16 // 2)  # one update per 2 micro-batches
    assert state["ema"] is not None and read_meta(out / "best.safetensors")["ema"] is True


def test_checkpoint_class_mismatch(trained_run, tmp_path):
    from conftest import make_folder

    two = make_folder(tmp_path / "two", {"train": 4, "val": 2}, classes=["a", "b"])
    code = main(["train", "--data", str(two), "--model", "resnet8", "--out", str(tmp_path / "m"),
                 "-o", f"model.checkpoint={trained_run}", *TRAIN_ARGS])
    assert code == 2


# ------------------------------------------------------------------ a Trainer on toy batches
# (no data folder: a list of ready batches stands in for the EpochLoader)


class _Batches:
    """The EpochLoader interface over a fixed list of batches."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _batch(seed: int, n: int = 4, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            "target": torch.randint(0, 3, (n,), generator=g), "index": torch.arange(n), "skipped": []}


UNREADABLE = {"skipped": ["bad-0.png", "bad-1.png", "bad-2.png", "bad-3.png"]}


def _trainer(tmp_path: Path, *overrides: str, student: torch.nn.Module | None = None,
             batches: list[dict] | None = None, size: int = 8):
    from kdistill.data.transforms import Preprocess, Preprocessing
    from kdistill.engine.trainer import Trainer

    cfg = build_config(Config, overrides=["data.root=unused", "model.name=toy", "train.epochs=1",
                                          f"train.out={tmp_path}", "train.progress=false", *overrides])
    pp = Preprocessing(size, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    torch.manual_seed(0)
    student = student or torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, 3))
    method = Supervised(student, Preprocess(pp))
    return Trainer(cfg, method, _Batches(batches or [_batch(0, size=size)]), None, torch.device("cpu"),
                   tmp_path, ["a", "b", "c"], pp)


@pytest.mark.parametrize("name", ["sgd", "sgdp", "sgdw", "lars", "rmsproptf", "po:sgdp", "po:sgdw"])
def test_momentum_reaches_every_optimizer_that_has_one(tmp_path, name):
    opt = _trainer(tmp_path, f"optim.name={name}", "optim.momentum=0.5").optimizer
    assert [g["momentum"] for g in opt.param_groups] == [0.5] * len(opt.param_groups)


@pytest.mark.parametrize("name", ["adamw", "po:adamp"])
def test_momentum_is_ignored_by_optimizers_without_one(tmp_path, name):
    opt = _trainer(tmp_path, f"optim.name={name}", "optim.momentum=0.5").optimizer
    assert "momentum" not in opt.param_groups[0]


def _tiny_vit() -> torch.nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32,
                             patch_size=8, depth=1, embed_dim=32, num_heads=2)


@pytest.mark.parametrize("name", ["adamw", "po:adamp"])
def test_vit_position_embedding_and_class_token_get_no_weight_decay(tmp_path, name):
    """The student's no_weight_decay() reaches the param-group builder through trainable()."""
    t = _trainer(tmp_path, f"optim.name={name}", "optim.weight_decay=0.05", student=_tiny_vit(), size=32)
    names = {id(p): n for n, p in t.method.trainable().named_parameters()}
    decay = {g["weight_decay"] > 0: {names[id(p)] for p in g["params"]} for g in t.optimizer.param_groups}
    assert {"student.pos_embed", "student.cls_token", "student.head.bias"} <= decay[False]
    assert {"student.head.weight", "student.blocks.0.attn.qkv.weight"} <= decay[True]


def test_distill_trainable_keeps_state_keys_and_forwards_vit_hints():
    """Old last.pt files (saved from a ModuleDict of student + loss bank) still load; the
    student's no_weight_decay / group_matcher come through with the 'student.' prefix."""
    from timm.optim import create_optimizer_v2

    from kdistill.data.transforms import Preprocess, Preprocessing
    from kdistill.methods.distill import Distill, LossBank, TermSpec

    student, bank = _tiny_vit(), LossBank({"kd": torch.nn.Linear(4, 4)})
    m = Distill(student, Preprocess(Preprocessing(32, [0.5] * 3, [0.25] * 3)), None, [TermSpec("kd")], bank)
    old = torch.nn.ModuleDict({"student": student, "losses": bank}).state_dict()
    assert list(m.trainable().state_dict()) == list(old)
    m.trainable().load_state_dict(old)
    assert {"student.pos_embed", "student.cls_token"} <= m.trainable().no_weight_decay()
    opt = create_optimizer_v2(m.trainable(), "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale[id(student.pos_embed)] < scale[id(student.head.weight)] == scale[id(bank.losses["kd"].weight)] == 1.0


SGD_PLAIN = ["optim.name=momentum", "optim.momentum=0", "optim.weight_decay=0", "optim.sched=constant",
             "optim.lr=0.5", "train.batch_size=4", "train.amp=false"]


def _sgd_reference(trainer, windows: list[list[dict]], lr: float = 0.5) -> dict:
    """The student after plain SGD steps, one per window, each on the mean loss over every
    readable image of the window: what accumulation must compute."""
    import copy

    import torch.nn.functional as F

    model = copy.deepcopy(trainer.method.plain_student)
    for window in windows:
        good = [b for b in window if "image" in b]
        x = torch.cat([b["image"] for b in good]).float() / 255
        y = torch.cat([b["target"] for b in good])
        model.zero_grad()
        F.cross_entropy(model(trainer.method.student_prep(x)), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return model.state_dict()


def _assert_same_student(trainer, expected: dict) -> None:
    got = trainer.method.plain_student.state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_epoch_shorter_than_an_accumulation_window_still_steps(tmp_path):
    """3 batches, accum_steps=4: one step on the average over the 3 batches."""
    batches = [_batch(i) for i in range(3)]
    t = _trainer(tmp_path, *SGD_PLAIN, "train.accum_steps=4", batches=batches)
    expected = _sgd_reference(t, [batches])
    t.train_epoch(0)
    assert t.global_step == 1
    _assert_same_student(t, expected)


def test_trailing_partial_window_steps_and_the_schedule_counts_it(tmp_path):
    """10 batches, accum_steps=4: windows of 4, 4 and 2 batches; the cosine schedule is
    built for those 3 updates per epoch."""
    batches = [_batch(i) for i in range(10)]
    t = _trainer(tmp_path, *SGD_PLAIN, "train.accum_steps=4", batches=batches)
    expected = _sgd_reference(t, [batches[:4], batches[4:8], batches[8:]])
    stats = t.train_epoch(0)
    assert t.global_step == 3 and stats.images == 40
    _assert_same_student(t, expected)
    cosine = _trainer(tmp_path, *SGD_PLAIN, "optim.sched=cosine", "train.epochs=2", "train.accum_steps=4",
                      batches=batches).scheduler
    assert cosine.t_initial == 2 * 3


def test_unreadable_batch_does_not_shift_accumulation_windows(tmp_path):
    """accum_steps=2 and the 2nd batch all unreadable: windows stay {b0, -} and {b2, b3}."""
    batches = [_batch(0), UNREADABLE, _batch(2), _batch(3)]
    t = _trainer(tmp_path, *SGD_PLAIN, "train.accum_steps=2", batches=batches)
    expected = _sgd_reference(t, [batches[:2], batches[2:]])
    stats = t.train_epoch(0)
    assert t.global_step == 2 and stats.images == 12 and len(stats.skipped) == 4
    _assert_same_student(t, expected)


def test_accumulation_averages_over_real_images(tmp_path):
    """A window of a full batch (4 images) and a half-unreadable one (2 images): the step's
    gradient is the mean over the 6 images, not the mean of the two batch means."""
    half = {**_batch(1, n=2), "skipped": ["bad-0.png", "bad-1.png"]}
    batches = [_batch(0), half]
    t = _trainer(tmp_path, *SGD_PLAIN, "train.accum_steps=2", batches=batches)
    expected = _sgd_reference(t, [batches])
    t.train_epoch(0)
    assert t.global_step == 1
    _assert_same_student(t, expected)


def test_run_stage_reuses_finished_resumes_interrupted_and_starts_new(tmp_path, tiny_root):
    """One helper decides for demo arms, SSLD stages and born-again generations."""
    from kdistill.config import Config, build_config
    from kdistill.engine import record
    from kdistill.engine.run import run_stage
    from kdistill.errors import UserError

    calls = []

    def start(resume):
        calls.append(resume)
        return {"started": resume}

    def config(*extra):
        return build_config(Config, overrides=[f"data.root={tiny_root}", *extra])

    out = tmp_path / "stage"
    assert run_stage(out, config("train.epochs=2"), start, "s") == {"started": False}  # nothing there: start
    out.mkdir()
    (out / "last.pt").write_bytes(b"")
    step = config("train.epochs=2", "optim.sched=step")
    record.write(out, config("train.epochs=1", "optim.sched=step"), record.new_record(step))
    assert run_stage(out, step, start, "s") == {"started": True}  # interrupted: resume
    (out / "summary.json").write_text(json.dumps({"epochs": 1}))
    assert run_stage(out, step, start, "s") == {"started": True}  # finished shorter: resume
    (out / "summary.json").write_text(json.dumps({"epochs": 2}))
    assert run_stage(out, step, start, "s") == {"epochs": 2}  # finished: reused
    assert calls == [False, True, True]
    with pytest.raises(UserError, match=r"optim.sched \(step -> cosine\)"):
        run_stage(out, config("train.epochs=2"), start, "s")  # other settings: refused

