"""View modes (consistent / independent / funmatch / fixed) and the soft-label cache."""
import json

import numpy as np
import pytest
import torch

from kdistill.cli import main
from kdistill.config import build_config
from kdistill.data.softlabels import SoftLabels, topk_renormalised, view_files
from kdistill.data.sources import open_split
from kdistill.data.views import LAM, PARTNER, ViewDataset, ViewSpec, apply_view, mix
from kdistill.engine import cache as cache_mod
from kdistill.engine.distill import DistillConfig
from kdistill.errors import UserError
from kdistill.methods import teachers as teachers_mod

from conftest import TRAIN_ARGS, run_cli


def _cfg(root, teacher, *extra):
    return build_config(DistillConfig, overrides=[f"data.root={root}", f"distill.teachers=[{teacher}]",
                                                  "data.workers=0", "train.progress=false", *extra])


@pytest.fixture(scope="module")
def cache_dir(tiny_root, trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sl") / "cache"
    assert main(["cache", "--teacher", str(trained_run), "--data", str(tiny_root), "--views", "2",
                 "--top-k", "2", "--out", str(out), "--view", "funmatch", "--workers", "0", "--no-progress"]) == 0
    return out


def test_views_are_replayable_and_modes_differ(tiny_root):
    src = open_split(str(tiny_root / "train"), "train")
    spec = ViewSpec(32, "rrc", (0.3, 1.0))
    a, b = ViewDataset(src, spec, seed=3), ViewDataset(src, spec, seed=3)
    a.set_epoch(1), b.set_epoch(1)
    assert torch.equal(a[5]["image"], b[5]["image"])
    b.set_epoch(2)
    assert not torch.equal(a[5]["image"], b[5]["image"])
    ind = ViewDataset(src, spec, seed=3, independent=True)
    s = ind[5]
    assert not torch.equal(s["image"], s["image_t"])  # independent: the teacher's own crop
    fm = ViewDataset(src, ViewSpec(32, "rrc", (0.3, 1.0), mix=True), seed=3, with_params=True)
    s = fm[5]
    p = s["params"]
    j = int(p[PARTNER])
    partner = fm.params(j, src.load(j))
    want = mix(apply_view(src.load(5), p, 32), apply_view(src.load(j), partner, 32), float(p[LAM]))
    assert torch.equal(s["image"], want) and s["target"] == -1  # mixed images carry no label


def test_funmatch_teacher_and_student_see_the_same_mixed_image(tiny_root, trained_run, tmp_path, monkeypatch):
    seen = []
    orig = teachers_mod.Teacher.forward
    monkeypatch.setattr(teachers_mod.Teacher, "forward", lambda self, x: (seen.append(x.clone()), orig(self, x))[1])
    from kdistill.methods.distill import Distill

    inputs = []
    dist_fwd = Distill.forward
    monkeypatch.setattr(Distill, "forward", lambda self, b: (inputs.append(b["image"].clone()), dist_fwd(self, b))[1])
    assert main(["distill", "--data", str(tiny_root), "--teacher", str(trained_run), "--model", "resnet8",
                 "--view", "funmatch", "--loss", "kd", "--epochs", "1", "--out", str(tmp_path / "fm"),
                 "-o", "distill.agreement=false", "--teacher-runtime", "eager", *TRAIN_ARGS]) == 0
    assert len(seen) == len(inputs) > 0
    assert all(torch.equal(t, s) for t, s in zip(seen, inputs))
    # non-integer pixel values: the images really are mixtures
    assert any(not torch.equal((x * 255).round(), x * 255) for x in inputs)


def test_cache_replays_bit_identical_views_and_probabilities(cache_dir, tiny_root, trained_run):
    src = open_split(str(tiny_root / "train"), "train")
    sl = SoftLabels(cache_dir, src)
    m = sl.manifest
    spec = ViewSpec(**m["view_spec"])
    teacher = teachers_mod.load_teacher(str(trained_run), src.classes, torch.device("cpu"))
    for v in range(2):
        fresh = ViewDataset(src, spec, m["seed"])  # what the teacher saw while caching
        replay = ViewDataset(src, spec, m["seed"], params=sl.params, extras=sl.extras, views=2)
        fresh.set_epoch(v), replay.set_epoch(v)
        probs = np.load(view_files(cache_dir, v)["probs"])
        for i in (0, 7, len(src) - 1):
            a, b = fresh[i], replay[i]
            assert torch.equal(a["image"], b["image"])
            p, idx = topk_renormalised(teacher(a["image"][None]).softmax(-1), 2)
            assert np.array_equal(probs[i], p[0].numpy())
            dense = b["t_logits"].exp()
            assert torch.allclose(dense[idx[0]], p[0].float(), atol=1e-3) and dense.sum() == pytest.approx(1, abs=1e-3)
    assert m["bytes_per_image"] > 0 and m["k"] == 2


def test_probability_underflowed_to_zero_gives_finite_logits(cache_dir, tiny_root, tmp_path):
    """fp16 top-k probabilities of confident teachers underflow to 0 (k = all classes on
    CIFAR-10 did): the replayed logits must stay finite, or KL turns NaN."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    path = view_files(copy, 0)["probs"]
    probs = np.load(path)
    probs[0, -1] = 0
    np.save(path, probs)
    sl = SoftLabels(copy, open_split(str(tiny_root / "train"), "train"))
    logits = sl.extras(0, 0)["t_logits"]
    assert torch.isfinite(logits).all()
    assert torch.isfinite(torch.nn.functional.kl_div(torch.zeros(1, len(logits)).log_softmax(-1),
                                                     logits[None].log_softmax(-1), log_target=True,
                                                     reduction="batchmean"))


def test_distill_from_cache_loads_no_teacher(cache_dir, tiny_root, tmp_path, monkeypatch):
    def no_teacher(*a, **k):
        raise AssertionError("a teacher was loaded")

    monkeypatch.setattr(teachers_mod, "load_teacher", no_teacher)
    out = tmp_path / "c"
    assert main(["distill", "--data", str(tiny_root), "--soft-labels", str(cache_dir), "--model", "resnet8",
                 "--loss", "kd", "--epochs", "2", "--out", str(out), *TRAIN_ARGS]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train.kd"] > 0


def test_stale_or_incomplete_cache_is_refused(cache_dir, tiny_root, tmp_path):
    src = open_split(str(tiny_root / "train"), "train")
    with pytest.raises(UserError, match="other training data"):
        SoftLabels(cache_dir, src.subset(list(range(10))))
    with pytest.raises(UserError, match="another teacher"):
        SoftLabels(cache_dir, src, teacher_sha="0" * 64)
    broken = tmp_path / "broken"
    broken.mkdir()
    m = json.loads((cache_dir / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**m, "done_views": [0]}))
    with pytest.raises(UserError, match="incomplete"):
        SoftLabels(broken, src)
    with pytest.raises(UserError, match="does not exist"):
        SoftLabels(tmp_path / "none", src)


def test_cache_with_missing_or_truncated_shards_is_refused(cache_dir, tiny_root, tmp_path):
    """A manifest that says done but shard files that are gone or cut short: one clear error."""
    import shutil

    src = open_split(str(tiny_root / "train"), "train")
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    files = view_files(copy, 0)
    files["params"].unlink()
    with pytest.raises(UserError, match="damaged.*params"):
        SoftLabels(copy, src)
    shutil.copy(view_files(cache_dir, 0)["params"], files["params"])
    files["probs"].write_bytes(files["probs"].read_bytes()[:200])
    with pytest.raises(UserError, match="damaged.*probs"):
        SoftLabels(copy, src)
    probs = np.load(view_files(cache_dir, 0)["probs"])
    np.save(files["probs"], probs[:-1])
    with pytest.raises(UserError, match="rows"):
        SoftLabels(copy, src)


def test_cache_resumes_without_redoing_views(tiny_root, trained_run, tmp_path, monkeypatch):
    out = tmp_path / "r"
    calls = []
    orig = cache_mod._cache_view

    def once(ds, v, *a, **k):
        calls.append(v)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return orig(ds, v, *a, **k)

    monkeypatch.setattr(cache_mod, "_cache_view", once)
    with pytest.raises(KeyboardInterrupt):
        cache_mod.build_cache(_cfg(tiny_root, trained_run), 3, 2, str(out))
    monkeypatch.setattr(cache_mod, "_cache_view", lambda ds, v, *a, **k: (calls.append(v), orig(ds, v, *a, **k)))
    m = cache_mod.build_cache(_cfg(tiny_root, trained_run), 3, 2, str(out))
    assert calls == [0, 1, 1, 2] and m["done_views"] == [0, 1, 2]


@pytest.mark.parametrize("args, needle", [
    (["cache", "--teacher", "{run}", "--data", "{root}", "--views", "0", "--out", "{tmp}/x"], "--views must be"),
    (["distill", "--data", "{root}", "--soft-labels", "{tmp}/none", "--model", "resnet8", "--out", "{tmp}/y"],
     "does not exist"),
    (["distill", "--data", "{root}", "--teacher", "{run}", "--model", "resnet8", "--view", "sideways"],
     "invalid choice: 'sideways'"),
    (["distill", "--data", "{root}", "--teacher", "{run}", "--model", "resnet8", "--view", "funmatch",
      "--loss", "ce", "--out", "{tmp}/z"], "drop loss 'ce'"),
    (["train", "--data", "{root}", "--model", "resnet8", "--opt", "po:nonesuch", "--out", "{tmp}/o"],
     "no optimizer 'nonesuch'"),
])
def test_bad_input(args, needle, tiny_root, trained_run, tmp_path):
    args = [a.replace("{root}", str(tiny_root)).replace("{run}", str(trained_run)).replace("{tmp}", str(tmp_path))
            for a in args]
    proc = run_cli(*args, *TRAIN_ARGS)
    assert proc.returncode == 2 and needle in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_second_order_optimizer_and_fixed_view(tiny_root, trained_run, tmp_path):
    assert main(["distill", "--data", str(tiny_root), "--teacher", str(trained_run), "--model", "resnet8",
                 "--view", "fixed", "--loss", "kd", "--loss", "ce", "--opt", "po:soap", "--lr", "0.003",
                 "-o", "optim.clip_grad=1.0", "--epochs", "1", "--out", str(tmp_path / "s"), *TRAIN_ARGS]) == 0


def test_funmatch_defaults_to_kl_only():
    """`kdistill distill --view funmatch` without --loss trains on KL alone (no label loss)."""
    def losses(*o):
        return build_config(DistillConfig, overrides=list(o)).distill.losses

    assert losses("distill.view=funmatch") == ["kd:1.0"]
    assert losses() == ["kd:0.9", "ce:0.1"]
    assert losses("distill.view=funmatch", "distill.losses=[js]") == ["js"]
