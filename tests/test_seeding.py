"""Training batches are a function of (seed, epoch, rank) only: not of the number of
DataLoader workers, nor of whether they persist across epochs, nor of a resume."""
import json

import pytest
import torch
from conftest import train_killed_at_epoch
from safetensors.torch import load_file

from kdistill.cli import main
from kdistill.data.datasets import ImageDataset, MixedDataset
from kdistill.data.loader import EpochLoader
from kdistill.data.sources import open_source, stratified_subset
from kdistill.data.transforms import train_transform
from kdistill.data.views import ViewDataset, ViewSpec


def rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b) -> bool:
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _dataset(kind: str, root):
    train, val = stratified_subset(open_source(str(root), "train"), 24), open_source(str(root), "val")
    tf = train_transform(32, 32, crop="pad", auto_augment="randaugment")
    if kind == "images":
        return ImageDataset(train, tf), None
    if kind == "mixed":  # SSLD: a quarter of each batch from the second set
        return MixedDataset(ImageDataset(train, tf), ImageDataset(val, tf)), 0.25
    return ViewDataset(train, ViewSpec(32, crop="rrc"), seed=2, independent=True), None


def _batches(ds, fraction, workers: int, persistent: bool, epochs=(0, 1)) -> list[dict]:
    loader = EpochLoader(ds, 8, workers, seed=4, unlabeled_fraction=fraction, persistent=persistent)
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out += [{k: v for k, v in b.items() if torch.is_tensor(v)} for b in loader]
    return out


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["images", "mixed", "views"])
def test_batches_do_not_depend_on_workers_or_persistence(kind, tiny_root):
    """Bitwise the same images over 2 epochs for 0, 1 or 2 workers, persistent or not; a
    loader that starts at epoch 1 (a resumed run) makes the second epoch's batches."""
    ds, fraction = _dataset(kind, tiny_root)
    ref = _batches(ds, fraction, 0, False)
    assert not torch.equal(ref[0]["index"], ref[len(ref) // 2]["index"])  # epochs differ
    for workers, persistent in [(1, False), (1, True), (2, True), (2, False)]:
        assert _same(_batches(ds, fraction, workers, persistent), ref), (workers, persistent)
    assert _same(_batches(ds, fraction, 2, True, epochs=(1,)), ref[len(ref) // 2:])


def test_items_made_in_the_training_process_leave_its_random_streams_alone(tiny_root):
    """With workers=0 the augmentation runs in the training process: its global RNGs (dropout,
    mixup) go on as if the items had been made by workers."""
    import random

    import numpy as np

    ds, _ = _dataset("images", tiny_root)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    _batches(ds, None, 0, False)
    after = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    assert torch.equal(after[0], torch.rand(3)) and after[1:] == (random.random(), np.random.rand())


def test_resume_with_persistent_workers_matches_uninterrupted(tiny_root, tmp_path, monkeypatch):
    """2 epochs with 2 persistent workers (pad-and-crop, flip, mixup, dropout), stopped after
    epoch 1 and resumed: the same weights and metrics as an uninterrupted run, and as one
    whose items the training process made itself (workers=0)."""
    common = ["--data", str(tiny_root), "--model", "resnet8", "--epochs", "2", "--seed", "3",
              "--no-progress", "--batch-size", "8", "--device", "cpu", "-o", "data.in_memory=no",
              "-o", "data.max_train_images=36", "-o", "data.mixup=0.4", "-o", "model.drop_rate=0.2"]
    persistent = ["--workers", "2", "-o", "data.persistent_workers=true"]
    clean, killed, inline = tmp_path / "clean", tmp_path / "killed", tmp_path / "inline"
    assert main(["train", *common, *persistent, "--out", str(clean)]) == 0
    train_killed_at_epoch(monkeypatch, [*common, *persistent, "--out", str(killed)])
    assert [r["epoch"] for r in rows(killed)] == [1]
    assert main(["train", *common, *persistent, "--out", str(killed), "--resume"]) == 0
    assert main(["train", *common, "--workers", "0", "--out", str(inline)]) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in rs]
    for other in (killed, inline):
        assert same_weights(clean / "last.safetensors", other / "last.safetensors"), other.name
        assert strip(rows(clean)) == strip(rows(other)), other.name


@pytest.mark.parametrize("cpus, gpus, local_world, want", [
    (16, 1, None, 8), (16, 4, None, 4), (16, 8, "8", 2), (16, 1, "4", 4), (3, 4, None, 1)])
def test_workers_auto_is_the_cpus_per_gpu_on_cuda(cpus, gpus, local_world, want, monkeypatch):
    """data.workers=auto: CPUs per local GPU (or per torchrun process of the node), 1 to 8; 2
    on a CPU, as before; a number stays that number."""
    from kdistill.config import DataConfig, build_config

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr("torch.cuda.device_count", lambda: gpus)
    if local_world:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    dc = build_config(overrides=["data.workers=auto"]).data
    assert (dc.num_workers(cuda=True), dc.num_workers(cuda=False)) == (want, 2)
    assert DataConfig(workers=5).num_workers(cuda=True) == 5
    assert (dc.keep_workers(True), dc.keep_workers(False)) == (True, False)
    assert build_config(overrides=["data.persistent_workers=true"]).data.keep_workers(False) is True
