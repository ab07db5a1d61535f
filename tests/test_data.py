"""Data: ImageFolder roots, list files, Fashion-MNIST, corrupt images, transforms, loaders."""

import pytest
import torch

from kdistill.config import DataConfig
from kdistill.data.datasets import ImageDataset, channel_stats, decode_into_memory, open_splits
from kdistill.data.loader import EpochLoader, collate
from kdistill.data.sources import FASHION_MNIST_DIR, open_source, parse_list_line, stratified_subset
from kdistill.data.transforms import Preprocess, Preprocessing, train_transform, tta_views
from kdistill.errors import UserError

from conftest import CLASSES, corrupt_png, make_folder


def test_image_folder(tiny_root):
    src = open_source(str(tiny_root), "train")
    assert src.classes == sorted(CLASSES) and len(src) == 72
    img = src.load(0)
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    val = open_source(str(tiny_root), "val", classes=src.classes)
    assert len(val) == 24 and set(val.labels) == {0, 1, 2}


def test_missing_and_empty(tmp_path, tiny_root):
    with pytest.raises(UserError, match="does not exist"):
        open_source(str(tmp_path / "nope"), "train")
    with pytest.raises(UserError, match="no 'test' split"):
        open_source(str(tmp_path), "test")
    root = make_folder(tmp_path / "d", {"train": 2})
    (root / "train" / "empty").mkdir()
    with pytest.raises(UserError, match="class folder .*empty.* has no images"):
        open_source(str(root), "train")
    with pytest.raises(UserError, match="not in the training set"):
        open_source(str(tiny_root), "val", classes=["circle", "square"])


def test_list_file(tmp_path, tiny_root):
    lines = [f"{tiny_root}/train/{c}/000.png {i}" for i, c in enumerate(sorted(CLASSES))]
    rel = tmp_path / "imgs"
    rel.mkdir()
    (rel / "a b.png").write_bytes((tiny_root / "train" / "circle" / "001.png").read_bytes())
    lines += ["", "# a comment", "imgs/a b.png 0  # p=0.91"]
    (tmp_path / "train_list.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "val_list.txt").write_text(lines[0] + "\n")
    (tmp_path / "labels.txt").write_text("0 circle\n1 square\n2 stripes\n")
    src = open_source(str(tmp_path / "train_list.txt"), "train", class_map=str(tmp_path / "labels.txt"))
    assert len(src) == 4 and src.classes == ["circle", "square", "stripes"]
    assert src.paths[-1].endswith("a b.png") and src.load(3).shape == (3, 32, 32)
    val = open_source(str(tmp_path / "train_list.txt"), "val", classes=src.classes)
    assert len(val) == 1  # the sibling val_list.txt
    (tmp_path / "bad.txt").write_text("only-a-path\n")
    with pytest.raises(UserError, match="line 1"):
        open_source(str(tmp_path / "bad.txt"), "train")
    assert parse_list_line("x/y.jpg 3 # note") == ("x/y.jpg", 3, "note")


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist():
    train = open_source("fashion-mnist", "train")
    val = open_source("fashion-mnist", "val")
    test = open_source("fashion-mnist", "test")
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert train.load(0).shape == (3, 28, 28) and len(train.classes) == 10


def test_corrupt_images_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path, {"train": 6, "val": 2})
    (root / "train" / "circle" / "broken.png").write_bytes(b"not an image at all")
    (root / "train" / "square" / "empty.jpg").write_bytes(b"")
    (root / "train" / "stripes" / "flipped.png").write_bytes(corrupt_png())  # crashed torchvision.io
    src = open_source(str(root), "train")
    ds = ImageDataset(src)
    items = [ds[i] for i in range(len(ds))]
    assert sum("skipped" in it for it in items) == 3
    batch = collate(items)
    assert len(batch["skipped"]) == 3 and batch["image"].shape[0] == 18
    mem = decode_into_memory(src, workers=0)
    assert len(mem) == 18 and len(mem.bad) == 3 and mem.in_memory
    # a training run skips them and reports them (never fatal)
    cfg = DataConfig(root=str(root), in_memory="no", workers=0)
    splits = open_splits(cfg)
    loader = EpochLoader(ImageDataset(splits.train, train_transform(32, 32)), 4, 0, seed=0)
    loader.set_epoch(0)
    seen = [b for b in loader]
    skipped = sum(len(b["skipped"]) for b in seen)
    assert skipped == 3 and skipped + sum(len(b.get("target", [])) for b in seen) == 4 * len(seen) == 20


def test_in_memory_matches_lazy(tiny_root):
    src = open_source(str(tiny_root), "val")
    mem = decode_into_memory(src, workers=0)
    assert isinstance(mem.array, torch.Tensor) and mem.array.shape == (24, 3, 32, 32)
    for i in (0, 5, 23):
        assert torch.equal(mem.load(i), src.load(i))


def test_stratified_subset(tiny_root):
    src = open_source(str(tiny_root), "train")
    sub = stratified_subset(src, 9)
    assert len(sub) == 9 and [sub.labels.count(c) for c in range(3)] == [3, 3, 3]
    assert stratified_subset(src, 9).paths == sub.paths  # seeded


def test_channel_stats_and_preprocess(tiny_root):
    mean, std = channel_stats(open_source(str(tiny_root), "train"))
    assert all(0 < m < 1 for m in mean) and all(0 < s < 1 for s in std)
    pp = Preprocess(Preprocessing(16, [0.5] * 3, [0.25] * 3))
    x = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    y = pp(x)
    assert y.shape == (2, 3, 16, 16) and torch.allclose(y, torch.full_like(y, 2.0))


@pytest.mark.parametrize("aa", ["none", "autoaugment", "randaugment", "trivialaugment"])
@pytest.mark.parametrize("crop", ["pad", "rrc", "none"])
def test_train_transforms(crop, aa):
    tf = train_transform(24, 32, crop=crop, auto_augment=aa)
    out = tf(torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8))
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


def test_tta_views_shapes():
    x = torch.rand(2, 3, 32, 32)
    views = tta_views(x)
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[1], x.flip(-1))
    # views 2..5: shifted by 2 px (32 / 16) towards each corner, zero-filled
    shifted = views[2]  # content moved down-right: pixel (i, j) shows x(i - 2, j - 2)
    assert torch.equal(shifted[..., 2:, 2:], x[..., :-2, :-2]) and shifted[..., :2, :].abs().sum() == 0
    assert torch.equal(views[5][..., :-2, :-2], x[..., 2:, 2:])


def test_epoch_loader_is_seeded(tiny_root):
    src = open_source(str(tiny_root), "train")
    ds = ImageDataset(src, train_transform(32, 32))
    a, b = EpochLoader(ds, 8, 0, seed=1), EpochLoader(ds, 8, 0, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    torch.manual_seed(0)
    xa = next(iter(a))
    torch.manual_seed(0)
    xb = next(iter(b))
    assert torch.equal(xa["index"], xb["index"]) and torch.equal(xa["image"], xb["image"])
    a.set_epoch(4)
    assert not torch.equal(next(iter(a))["index"], xa["index"])


def test_hidden_files_are_skipped_alike_by_training_pool_and_predict(tmp_path):
    """One listing (data.sources) for training sources, the mining pool and predict: a
    macOS resource fork ``._x.jpg`` or a hidden ``.hidden.png`` is never an image."""
    from PIL import Image

    from kdistill.data.sources import open_unlabeled
    from kdistill.deploy.predict import collect_images
    from kdistill.mining.pool import open_pool

    root = tmp_path / "train"
    for rel in ["a/x.jpg", "b/y.png", "b/sub/z.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / rel)
    for rel in ["a/._x.jpg", "a/.hidden.png", "b/._y.png", "b/.cache/w.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\x00\x05\x16\x07Mac OS X        ")
    real = [str(root / r) for r in ["a/x.jpg", "b/sub/z.png", "b/y.png"]]  # sorted paths
    assert open_source(str(tmp_path), "train").paths == real
    assert open_unlabeled(str(root), ["a", "b"]).paths == real
    assert list(open_pool(str(root)).paths) == real
    assert collect_images([str(root)]) == real
