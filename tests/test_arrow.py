"""Hugging Face ``datasets`` sources (``hf:DIR`` from save_to_disk, ``parquet:GLOB``): class
names from ClassLabel, the same pixels as the folder they were made from, training end to
end with workers, per-split overrides, unreadable rows skipped and counted, and one-line
errors (exit 2) for bad tables. Local files only: the Hub is offline here."""
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import pickle  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

datasets = pytest.importorskip("datasets")
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value  # noqa: E402

from kdistill.cli import main  # noqa: E402
from kdistill.config import DataConfig  # noqa: E402
from kdistill.data.datasets import ImageDataset, open_splits  # noqa: E402
from kdistill.data.sources import open_source, open_unlabeled, stratified_subset  # noqa: E402
from kdistill.errors import UserError  # noqa: E402

from conftest import CLASSES, TRAIN_ARGS, corrupt_png, make_folder, run_cli  # noqa: E402

ORDER = ["stripes", "circle", "square"]  # the ClassLabel order: not the folders' sorted order


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """The Hub offline and the datasets cache (Parquet -> Arrow) inside the test's folder."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def folder_table(root: Path, split: str, names=ORDER, extra: dict | None = None) -> Dataset:
    """The images of ``root/split`` (an ImageFolder) as a table: encoded bytes + ClassLabel."""
    src = open_source(str(root), split)
    rows = [{"bytes": Path(p).read_bytes(), "path": None} for p in src.paths]
    labels = [names.index(src.classes[y]) for y in src.labels]
    for data, label in (extra or {}).items():
        rows.append({"bytes": data, "path": None})
        labels.append(label)
    return Dataset.from_dict({"image": rows, "label": labels, "note": ["x"] * len(rows)},
                             features=Features({"image": Image(), "label": ClassLabel(names=names),
                                                "note": Value("string")}))


@pytest.fixture
def data(tmp_path):
    """A folder (3 x 6 train, 3 x 2 val) and the same images as hf:DIR (train + validation)."""
    root = make_folder(tmp_path / "folder", {"train": 6, "val": 2})
    hf = tmp_path / "hf"
    DatasetDict(train=folder_table(root, "train"), validation=folder_table(root, "val")).save_to_disk(str(hf))
    return root, hf


def test_classes_from_classlabel_and_items_equal_the_folder(data):
    root, hf = data
    for split in ("train", "val"):
        folder = open_source(str(root), split)
        table = open_source(f"hf:{hf}", split, classes=None if split == "train" else ORDER)
        assert table.classes == ORDER and not table.paths and len(table) == len(folder)
        for i in range(len(folder)):
            assert torch.equal(table.load(i), folder.load(i))
            assert table.classes[table.labels[i]] == folder.classes[folder.labels[i]]
    # val against a training set in another class order: matched by name, not by index
    val = open_source(f"hf:{hf}", "val", classes=CLASSES)
    folder = open_source(str(root), "val")
    assert val.labels == folder.labels
    # DIR#SPLIT names a split by its own name: the training rows as a val split
    assert len(open_source("", "val", explicit=f"hf:{hf}#train", classes=ORDER)) == 18
    # a subset keeps the rows it picked, and says where each comes from
    sub = stratified_subset(open_source(f"hf:{hf}", "train"), 5)
    assert len(sub) == 5 and sub.describe(0).startswith(f"hf dataset '{hf}' split 'train' row ")
    row = int(sub.describe(4).rsplit(" ", 1)[1])
    assert torch.equal(sub.load(4), open_source(str(root), "train").load(row))


def test_a_hub_name_goes_through_load_dataset(data, monkeypatch):
    """hf:OWNER/NAME (not a local folder) asks datasets for its splits and loads the one it
    needs with load_dataset; here both answer from the local copy, as a Hub cache would."""
    _, hf = data
    asked = []
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name: ["train", "validation"])
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split: asked.append((name, split)) or datasets.load_from_disk(str(hf / split)))
    val = open_source("hf:someone/shapes", "val", classes=ORDER)
    assert asked == [("someone/shapes", "validation")] and len(val) == 6
    assert val.describe(5) == "Hub dataset 'someone/shapes' split 'validation' row 5"
    with pytest.raises(UserError, match="has no 'test' split"):
        open_source("hf:someone/shapes", "test", classes=ORDER)


def test_pickles_as_file_names_and_reopens_in_another_process(data):
    _, hf = data
    src = stratified_subset(open_source(f"hf:{hf}", "train"), 7)
    blob = pickle.dumps(ImageDataset(src))
    assert len(blob) < 4000  # no table bytes inside (18 PNGs alone are ~60 KB)
    copy = pickle.loads(blob).source
    assert copy.reader._ds is None
    assert all(torch.equal(copy.load(i), src.load(i)) for i in range(len(src)))
    loader = torch.utils.data.DataLoader(ImageDataset(src), batch_size=4, num_workers=2, collate_fn=list)
    got = {item["index"]: item["image"] for batch in loader for item in batch}
    assert sorted(got) == list(range(7)) and all(torch.equal(got[i], src.load(i)) for i in got)


def test_pixel_arrays_and_unlabeled(tmp_path):
    rng = np.random.default_rng(0)
    hwc = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(4)]
    Dataset.from_dict({"pixels": hwc, "y": [0, 1, 1, 0]}).save_to_disk(str(tmp_path / "arr"))
    src = open_source(f"hf:{tmp_path / 'arr'}", "train", image_key="pixels", label_key="y")
    assert src.classes == ["0", "1"] and src.labels == [0, 1, 1, 0]
    assert torch.equal(src.load(2), torch.from_numpy(hwc[2]).permute(2, 0, 1))
    pool = open_unlabeled(f"hf:{tmp_path / 'arr'}", ["a", "b"], image_key="pixels")
    assert pool.labels == [-1] * 4 and torch.equal(pool.load(0), src.load(0))


def test_label_columns_names_integers_and_class_maps(data, tmp_path):
    root, _ = data
    images = [{"bytes": p.read_bytes(), "path": None} for p in sorted(root.glob("val/*/*"))][:4]

    def saved(name, labels, feature=None):
        feats = Features({"image": Image(), "label": feature}) if feature else None
        Dataset.from_dict({"image": images, "label": labels}, features=feats).save_to_disk(str(tmp_path / name))
        return f"hf:{tmp_path / name}"

    names = saved("names", ["dog", "cat", "dog", "emu"])  # strings: sorted names; matched by name for val
    assert (open_source(names, "train").classes, open_source(names, "train").labels) == (["cat", "dog", "emu"],
                                                                                         [1, 0, 1, 2])
    assert open_source(names, "val", explicit=names, classes=["emu", "dog", "cat"]).labels == [1, 2, 1, 0]
    with pytest.raises(UserError, match=r"label 'emu' of hf dataset '.*names' row 3 is not in the class list"):
        open_source(names, "val", explicit=names, classes=["cat", "dog"])
    ints = saved("ints", [2, 0, 2, 1], Value("int64"))  # integers: 0..max, or a class map's names
    assert open_source(ints, "train").classes == ["0", "1", "2"]
    (tmp_path / "map.txt").write_text("0 zero\n1 one\n2 two\n")
    assert open_source(ints, "train", class_map=str(tmp_path / "map.txt")).classes == ["zero", "one", "two"]
    missing = saved("missing", [0, -1, 1, 0], ClassLabel(names=["a", "b"]))  # ClassLabel's -1: no label
    with pytest.raises(UserError, match=r"label -1 of hf dataset '.*missing' row 1 is outside the class list"):
        open_source(missing, "train")
    assert open_unlabeled(missing, ["a", "b"]).labels == [-1] * 4  # ... which a pool does not need
    with pytest.raises(UserError, match="holds float64 values"):
        open_source(saved("floats", [0.5, 1.0, 0.0, 1.0]), "train")


def test_parquet_layout_and_per_split_override(data, tmp_path):
    root, hf = data
    pq = tmp_path / "pq"
    folder_table(root, "train").to_parquet(str(pq / "data" / "train-00000.parquet"))
    folder_table(root, "val").to_parquet(str(pq / "data" / "validation-00000.parquet"))
    splits = open_splits(DataConfig(root=f"parquet:{pq}", workers=0))  # the Hub's layout, found by name
    assert (len(splits.train), len(splits.val), splits.classes) == (18, 6, ORDER)
    one = pq / "one.parquet"  # -o data.val=parquet:GLOB beside an hf:DIR train split
    folder_table(root, "val").select(range(4)).to_parquet(str(one))
    splits = open_splits(DataConfig(root=f"hf:{hf}", val=f"parquet:{tmp_path}/pq/one*.parquet", workers=0))
    assert len(splits.val) == 4 and splits.val.describe(3) == f"{one} row 3"
    assert torch.equal(splits.val.load(3), open_source(str(root), "val").load(3))
    # Parquet written by pyarrow alone (no datasets metadata): raw bytes, integer labels, own column names
    import pyarrow as pa
    import pyarrow.parquet as ppq

    val = open_source(str(root), "val")
    (tmp_path / "plain").mkdir()
    ppq.write_table(pa.table({"img": [Path(p).read_bytes() for p in val.paths], "y": val.labels}),
                    str(tmp_path / "plain" / "part-0.parquet"))
    plain = open_source("", "val", explicit=f"parquet:{tmp_path}/plain/*.parquet", classes=CLASSES,
                        image_key="img", label_key="y")
    assert plain.labels == val.labels and torch.equal(plain.load(5), val.load(5))
    # a folder of Parquet files without split names is one training split
    assert len(open_source(f"parquet:{tmp_path}/plain", "train", image_key="img", label_key="y")) == 6
    # a train glob names its sibling splits as list files do (train -> validation)
    splits = open_splits(DataConfig(root=f"parquet:{pq}/data/train-*.parquet", workers=0))
    assert len(splits.val) == 6


def test_train_end_to_end_with_workers_skips_and_counts_corrupt_rows(tmp_path):
    """hf:DIR with 2 unreadable rows among 20: 1 epoch, 2 workers; they are listed by row."""
    root = make_folder(tmp_path / "folder", {"train": 6, "val": 2})
    train = folder_table(root, "train", extra={corrupt_png(): 0, b"not an image": 2})
    hf = tmp_path / "hf"
    DatasetDict(train=train, validation=folder_table(root, "val")).save_to_disk(str(hf))
    out = tmp_path / "run"
    args = ["train", "--data", f"hf:{hf}", "--model", "resnet8", "--epochs", "1", "--out", str(out),
            *TRAIN_ARGS, "--workers", "2", "--batch-size", "4"]
    assert main(args) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train.skipped"] == 2 and row["val.n"] == 6
    listed = sorted(line.split("\t")[0] for line in (out / "skipped.txt").read_text().splitlines())
    assert listed == [f"hf dataset '{hf}' split 'train' row {r}" for r in (18, 19)]


def _bad_inputs(tmp_path, data):
    root, hf = data
    nolabel = tmp_path / "nolabel.parquet"
    folder_table(root, "val").remove_columns("label").to_parquet(str(nolabel))
    outside = tmp_path / "outside.parquet"
    Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in sorted(root.glob("val/*/*"))],
                       "label": [0, 1, 2, 7, 1, 0]}, features=Features({"image": Image(), "label": Value("int64")})
                      ).to_parquet(str(outside))
    only_train = tmp_path / "only-train"
    DatasetDict(train=folder_table(root, "train")).save_to_disk(str(only_train))
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 but not really")
    return {
        "no-label-column": ([f"hf:{hf}", "-o", f"data.val=parquet:{nolabel}"],
                            f"parquet file '{nolabel}' has no label column 'label' (its columns: image, note)"),
        "label-outside": ([f"hf:{hf}", "-o", f"data.val=parquet:{outside}"],
                          f"label 7 of {outside} row 3 is outside the class list (3 classes"),
        "glob-matches-nothing": ([f"parquet:{tmp_path}/none/*.parquet"], "matches no file"),
        "no-such-split": ([f"hf:{only_train}"], f"hf dataset '{only_train}' has no 'val' split (its splits: train)"),
        "hub-offline": (["hf:someone/no-such-dataset"], "the Hub is offline"),
        "not-parquet": ([f"hf:{hf}", "-o", f"data.val=parquet:{tmp_path}/fake.parquet"],
                        "is not a readable Parquet file"),
    }


def test_bad_tables_are_one_line_exit_2(tmp_path, data, capsys):
    cases = _bad_inputs(tmp_path, data)
    capsys.readouterr()  # the progress bars of writing them
    for case, (spec, needle) in cases.items():
        code = main(["train", "--data", *spec, "--model", "resnet8", "--out", str(tmp_path / case), *TRAIN_ARGS])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (case, err)
        assert not (tmp_path / case).exists()
    with pytest.raises(UserError, match="has no column 'pixels'"):
        open_source(f"hf:{data[1]}", "train", image_key="pixels")


def test_a_bad_table_exits_2_from_the_shell(tmp_path, data):
    proc = run_cli("train", "--data", f"hf:{data[1]}#nope", "--model", "resnet8", "--out", str(tmp_path / "o"),
                   env={"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    hf = data[1]
    assert proc.stderr.strip().splitlines() == [f"kdistill: error: hf dataset '{hf}' has no 'nope' split (its "
                                               f"splits: train, validation); name one with -o data.train=hf:{hf}#SPLIT"]
