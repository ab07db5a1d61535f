"""The training loop asks the device for nothing per step: host syncs (``.item()``,
``bool(tensor)``, ``.tolist()``, ...) happen every ``train.sync_every`` steps and once per
epoch, so on CUDA the host can run ahead of the GPU. Counted on the CPU, where the same
calls are made."""
import os
import sys

import pytest
import torch

from kdistill.config import build_config
from kdistill.engine import run as run_mod
from kdistill.engine.distill import DistillConfig, build_method, build_teacher

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
HOST_TENSORS = ("tensor", "as_tensor")
# code that makes batches on the host (in DataLoader workers when data.workers > 0) asks
# CPU tensors, not the device: not counted
LOADING = (f"{os.sep}torchvision{os.sep}", f"{os.sep}torch{os.sep}utils{os.sep}data{os.sep}",
           f"{os.sep}kdistill{os.sep}data{os.sep}")


def _count_calls(monkeypatch) -> dict:
    """Count, in ``calls["n"]``, the host syncs and host-made tensors outside data loading
    until ``monkeypatch.undo()``."""
    calls = {"n": 0}

    def counting(orig):
        def counted(*a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if not any(part in caller for part in LOADING):
                calls["n"] += 1
            return orig(*a, **k)
        return counted

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    for name in HOST_TENSORS:  # a tensor made from host values, e.g. on the GPU: a blocking copy
        monkeypatch.setattr(torch, name, counting(getattr(torch, name)))
    return calls


def _count_syncs(monkeypatch, tiny_root, trained_run, out, steps: int, sync_every: int, *extra) -> int:
    cfg = build_config(DistillConfig, overrides=[
        f"data.root={tiny_root}", "model.name=resnet8", "train.epochs=1", "train.batch_size=4",
        f"train.max_steps_per_epoch={steps}", f"train.sync_every={sync_every}", f"train.out={out}",
        "data.workers=0", "train.progress=false", "distill.agreement=false",
        f"distill.teachers=[{trained_run}]", "distill.teacher_runtime=eager", *extra])
    ctx = run_mod.prepare(cfg)
    method, crop = build_method(ctx, cfg.distill, build_teacher(ctx, cfg.distill))
    calls = _count_calls(monkeypatch)
    try:
        run_mod.fit(ctx, method, crop_size=crop)
    finally:
        monkeypatch.undo()
    return calls["n"]


@pytest.mark.parametrize("extra", [[], ["distill.losses=[kd:0.5,ce:0.5]", "train.ema_decay=0.9",
                                        "optim.clip_grad=1.0"]], ids=["kd", "kd+ce+ema+clip"])
def test_no_host_sync_per_step(extra, monkeypatch, tiny_root, trained_run, tmp_path):
    short = _count_syncs(monkeypatch, tiny_root, trained_run, tmp_path / "a", 4, 1000, *extra)
    long = _count_syncs(monkeypatch, tiny_root, trained_run, tmp_path / "b", 12, 1000, *extra)
    assert long == short, f"{(long - short) / 8:.1f} host syncs per training step"


def test_syncs_every_n_steps(monkeypatch, tiny_root, trained_run, tmp_path):
    """With sync_every=2, 12 steps sync 4 more times than 4 steps do (8 steps / 2 = 4 checks,
    each one bool of the bad-step flag and one .item() for the progress bar)."""
    short = _count_syncs(monkeypatch, tiny_root, trained_run, tmp_path / "a", 4, 2)
    long = _count_syncs(monkeypatch, tiny_root, trained_run, tmp_path / "b", 12, 2)
    assert long - short == 4 * 2


@pytest.fixture(scope="module")
def subset_teachers(tmp_path_factory):
    """Two checkpoints over overlapping class subsets (merged teachers: per-teacher views)."""
    from conftest import CLASSES

    from kdistill.data.transforms import Preprocessing
    from kdistill.models import create_model
    from kdistill.models.checkpoint import save_model

    pp = Preprocessing(32, [0.5] * 3, [0.25] * 3, 1.0).to_dict()
    folder = tmp_path_factory.mktemp("subsets")
    paths = []
    for name, classes in (("ab", CLASSES[:2]), ("bc", CLASSES[1:])):
        paths.append(folder / f"{name}.safetensors")
        save_model(paths[-1], create_model("resnet8", 2), {"arch": "resnet8", "num_classes": 2,
                                                            "classes": classes, "preprocessing": pp})
    return paths


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from conftest import make_folder

    return make_folder(tmp_path_factory.mktemp("pool"), {"p": 8}, seed=5) / "p"


@pytest.mark.parametrize("kind", ["merged", "crd", "ssld"])
def test_no_host_sync_per_step_for_merged_teachers_crd_and_mixed_batches(
        kind, monkeypatch, tiny_root, trained_run, subset_teachers, pool, tmp_path):
    """Merged teachers (class indices made once, not per step), CRD (host queue counters) and
    labeled + unlabeled batches (the loader counts the labeled images: no boolean mask)."""
    extra = {"merged": [f"distill.teachers=[{subset_teachers[0]},{subset_teachers[1]}]",
                        "distill.losses=[kd:0.5,ce:0.5]"],
             "crd": ["distill.losses=[crd:1.0,ce:1.0]"],
             "ssld": [f"data.unlabeled={pool}", "data.unlabeled_fraction=0.5", "distill.losses=[kd:0.5,ce:0.5]"],
             }[kind]
    override = [x for x in extra if x.startswith("distill.teachers")]
    rest = [x for x in extra if not x.startswith("distill.teachers")]
    counts = [_count_syncs(monkeypatch, tiny_root, trained_run, tmp_path / name, steps, 1000, *rest, *override)
              for name, steps in (("a", 4), ("b", 12))]
    assert counts[1] == counts[0], f"{(counts[1] - counts[0]) / 8:.1f} host syncs per training step"


def test_evaluation_asks_the_device_nothing_per_batch(monkeypatch, tiny_root, trained_run):
    """Confusion matrix, top-5, loss and the agreement hook accumulate on the device; the
    host reads them once per pass."""
    from kdistill.data.datasets import eval_dataset
    from kdistill.data.loader import eval_loader
    from kdistill.data.sources import open_source, stratified_subset
    from kdistill.data.transforms import Preprocess
    from kdistill.engine.evaluate import Agreement, evaluate
    from kdistill.methods.teachers import load_teachers
    from kdistill.models.checkpoint import load_model, meta_preprocessing

    model, meta = load_model(str(trained_run))
    pp = meta_preprocessing(meta)
    teacher = load_teachers([str(trained_run)], meta["classes"], torch.device("cpu"))

    def syncs(n_images: int) -> int:
        src = stratified_subset(open_source(str(tiny_root), "train"), n_images)
        loader = eval_loader(eval_dataset(src, pp), 4, 0, False)
        hook = Agreement(teacher.logits, len(src), 3, torch.device("cpu"))
        calls = _count_calls(monkeypatch)
        try:
            for _ in range(2):  # the second pass reads the teacher's cached probabilities
                hook.reset()
                evaluate(model, Preprocess(pp), loader, 3, torch.device("cpu"), on_batch=hook.update)
                hook.compute()
        finally:
            monkeypatch.undo()
        return calls["n"]

    assert syncs(8) == syncs(24)  # 2 vs 6 batches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_per_step_on_cuda(tiny_root, trained_run, tmp_path):
    """The same on a GPU, as CUDA itself counts syncs (set_sync_debug_mode)."""
    import warnings

    def syncs(steps: int, out) -> int:
        cfg = build_config(DistillConfig, overrides=[
            f"data.root={tiny_root}", "model.name=resnet8", "train.epochs=1", "train.batch_size=4",
            f"train.max_steps_per_epoch={steps}", "train.sync_every=1000", f"train.out={out}",
            "data.workers=0", "train.progress=false", "distill.agreement=false", "train.device=cuda",
            f"distill.teachers=[{trained_run}]", "distill.teacher_runtime=eager"])
        ctx = run_mod.prepare(cfg)
        method, crop = build_method(ctx, cfg.distill, build_teacher(ctx, cfg.distill))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run_mod.fit(ctx, method, crop_size=crop)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(4, tmp_path / "a") == syncs(12, tmp_path / "b")
