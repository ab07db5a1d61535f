"""Which model a name builds and how it is told (issue: items 2, 3 and 9): published weights
from the local cache offline, a fast one-line failure without them, the one line on the
resolved model and preprocessing, zoo-name warnings, `list models` and "did you mean".

No test touches the network: the Hub is made unreachable with HF_HUB_OFFLINE, an endpoint
that never resolves or a stubbed probe, and caches live in temporary folders."""
from __future__ import annotations

import json
import socket
import time

import huggingface_hub.constants as hf_constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import TRAIN_ARGS, run_cli
from kdistill.cli import main
from kdistill.config import Config, build_config
from kdistill.errors import UserError
from kdistill.models import create_model, default_preprocessing, resolve_name

REPO = "timm/test_resnet.r160_in1k"  # the pretrained_cfg hf_hub_id of timm's tiny `test_resnet`
SHA = "0123456789abcdef0123456789abcdef01234567"
FAST = 5.0  # seconds a missing-weights failure may take


def fill_hf_cache(cache, repo: str = REPO) -> dict[str, torch.Tensor]:
    """Random ``test_resnet`` weights (and its config.json) laid out as the Hub cache keeps them."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(SHA)
    save_file(state, str(snapshot / "model.safetensors"))
    cfg = timm.models.get_pretrained_cfg("test_resnet.r160_in1k").to_dict()
    pretrained = {k: v for k, v in cfg.items() if k not in ("architecture", "hf_hub_id", "url") and v is not None}
    (snapshot / "config.json").write_text(json.dumps(
        {"architecture": "test_resnet", "num_classes": 1000, "pretrained_cfg": pretrained}))
    return state


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches, and a Hub whose name never resolves (RFC 2606)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return cache


def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


# ------------------------------------------------------------------ item 2: pretrained offline


@pytest.mark.parametrize("mode", ["HF_HUB_OFFLINE", "unreachable"])
@pytest.mark.parametrize("name", ["resnet18", "hf-hub:timm/resnet18.a1_in1k", "tv:resnet18"])
def test_missing_weights_fail_fast_in_one_line(name, mode, no_hub, monkeypatch):
    if mode == "HF_HUB_OFFLINE":
        offline(monkeypatch)
    else:  # torchvision's host, as the Hub's, cannot be reached
        monkeypatch.setattr("kdistill.models.weights.reachable", lambda url, timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        create_model(name, 3, pretrained=True)
    assert time.perf_counter() - start < FAST
    msg = str(err.value)
    assert "\n" not in msg and "-o model.pretrained_path=FILE" in msg and "not in the cache" in msg, msg
    assert ("HF_HUB_OFFLINE is set" if mode == "HF_HUB_OFFLINE" else "cannot be reached") in msg


def test_reachable_means_an_http_answer_in_time():
    """A server that answers HTTP is reachable; a closed port, or one that accepts the
    connection and never answers (a black hole, a captive proxy), is not, within the timeout."""
    import http.server
    import threading

    from kdistill.models.weights import reachable

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501s
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert reachable(f"http://127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.perf_counter()
        assert not reachable(f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.5)
        port = silent.getsockname()[1]
    assert not reachable(f"http://127.0.0.1:{port}/", timeout=0.5)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("mode", ["HF_HUB_OFFLINE", "unreachable"])
def test_cached_hub_weights_load_without_network(mode, no_hub, monkeypatch):
    """Weights in the HF cache load from disk, at once, with HF_HUB_OFFLINE or no network;
    by timm name and as an hf-hub: name (config.json from the cache too)."""
    state = fill_hf_cache(no_hub)
    if mode == "HF_HUB_OFFLINE":
        offline(monkeypatch)
    for name in ("test_resnet", "hf-hub:" + REPO):
        start = time.perf_counter()
        model = create_model(name, 3, pretrained=True)
        assert time.perf_counter() - start < FAST, name
        assert model.get_classifier().out_features == 3
        assert torch.equal(model.state_dict()["conv1.0.weight"], state["conv1.0.weight"]), name
        assert model.kdistill_arch == "timm:test_resnet"
        assert "Hugging Face cache" in model.kdistill_weights
        assert default_preprocessing(model, True, quiet=True).image_size == 160


def test_cached_torchvision_weights_load_offline(no_hub, monkeypatch, tmp_path):
    import torchvision

    offline(monkeypatch)
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    src = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(src.state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
    model = create_model("tv:mobilenet_v3_small", 4, pretrained=True)
    assert torch.equal(model.features[0][0].weight, src.features[0][0].weight)
    assert "torch hub cache" in model.kdistill_weights


def _hub_env(tmp_path) -> dict:
    hf = tmp_path / "hf"
    return {"HF_HOME": str(hf), "HF_HUB_CACHE": str(hf / "hub"), "HF_HUB_OFFLINE": "1",
            "TORCH_HOME": str(tmp_path / "torch")}


def test_cli_pretrained_offline_one_line_and_no_run_folder(tiny_root, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", str(tiny_root), "--model", "resnet18", "--pretrained",
                   "--out", str(out), *TRAIN_ARGS, env=_hub_env(tmp_path))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "-o model.pretrained_path=FILE" in lines[0]
    assert not out.exists()


def test_cli_trains_from_cached_weights_offline(tiny_root, tmp_path):
    env = _hub_env(tmp_path)
    (tmp_path / "hf" / "hub").mkdir(parents=True)
    fill_hf_cache(tmp_path / "hf" / "hub")
    proc = run_cli("train", "--data", str(tiny_root), "--model", "test_resnet", "--pretrained", "--epochs", "1",
                   "--image-size", "32", "--out", str(tmp_path / "run"), *TRAIN_ARGS, env=env)
    assert proc.returncode == 0, proc.stderr
    assert ("student timm:test_resnet (timm; pretrained, from the Hugging Face cache): input 32 px "
            "(data.image_size)") in proc.stderr


# ------------------------------------------------------------------ item 3: the one line, warnings


def prepare_log(tiny_root, tmp_path, capsys, name: str, **keys) -> list[str]:
    """The stderr lines of the student announcement ``engine.run.prepare`` makes for
    ``name`` (``fit`` logs it when training starts, after every check that can stop the run)."""
    from kdistill.engine.run import prepare

    flags = {"data.root": str(tiny_root), "model.name": name, "train.out": str(tmp_path / "o"),
             "data.workers": 0, **{k.replace("__", "."): v for k, v in keys.items()}}
    ctx = prepare(build_config(Config, [], flags, []))
    capsys.readouterr()
    ctx.announce()
    return capsys.readouterr().err.strip().splitlines()


def test_one_line_for_a_zoo_student(tiny_root, tmp_path, capsys):
    lines = prepare_log(tiny_root, tmp_path, capsys, "resnet8")
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("student resnet8 (kdistill zoo, 32-px CIFAR net; random init): input 32 px "
                           "(images' own size), mean [")
    assert "(training-image statistics), train crop pad, eval crop 1" in line


def test_timm_from_scratch_says_it_runs_at_the_images_size(tiny_root, tmp_path, capsys):
    lines = prepare_log(tiny_root, tmp_path, capsys, "timm:resnet10t")
    assert len(lines) == 1, lines
    assert lines[0].startswith("student timm:resnet10t (timm; random init): input 32 px (images' own size; "
                               "its pretrained size is 176 px: --image-size 176)")
    sized = prepare_log(tiny_root, tmp_path, capsys, "timm:resnet10t", data__image_size=48,
                        data__mean=[0.5] * 3, data__std=[0.25] * 3, data__crop="rrc")
    assert "input 48 px (data.image_size), mean [0.5, 0.5, 0.5] std [0.25, 0.25, 0.25] (data.mean/std), " \
           "train crop rrc" in sized[0]


def test_zoo_net_above_64_px_warns(tiny_root, tmp_path, capsys):
    lines = prepare_log(tiny_root, tmp_path, capsys, "resnet8", data__image_size=96)
    assert len(lines) == 2 and lines[1].startswith("warning: 'resnet8' is kdistill's 32-px CIFAR net, here at 96 px")
    assert "timm:NAME / tv:NAME" in lines[1]
    assert len(prepare_log(tiny_root, tmp_path, capsys, "resnet8", data__image_size=64)) == 1


@pytest.mark.parametrize("name, others", [
    ("vgg13", ["timm:vgg13", "tv:vgg13"]),
    ("mobilenetv2", ["tv:mobilenet_v2", "timm:mobilenetv2_100"]),
])
def test_zoo_name_that_shadows_timm_or_torchvision_warns(name, others, tiny_root, tmp_path, capsys):
    lines = prepare_log(tiny_root, tmp_path, capsys, name)
    assert len(lines) == 2 and lines[1].startswith(f"warning: '{name}' is kdistill's 32-px CIFAR net"), lines
    assert all(o in lines[1] for o in others) and f"zoo:{name}" in lines[1]
    explicit = prepare_log(tiny_root, tmp_path, capsys, f"zoo:{name}")  # explicit: no warning
    assert len(explicit) == 1 and explicit[0].startswith(f"student {name} (kdistill zoo")
    assert resolve_name(f"zoo:{name}") == ("zoo", name)


def test_teacher_by_name_or_weights_file_gets_its_line(tmp_path, capsys):
    from kdistill.methods.teachers import load_teacher

    path = tmp_path / "r10t.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("resnet10t", 3).state_dict().items()}, str(path))
    capsys.readouterr()
    load_teacher(f"resnet10t@{path}", ["a", "b", "c"], torch.device("cpu"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"model timm:resnet10t (timm; weights {path}): input 176 px (its pretrained config), "
                     "mean [0.485, 0.456, 0.406] std [0.229, 0.224, 0.225] (its pretrained config), "
                     "eval crop 0.875"], lines
    default_preprocessing(create_model("resnet10t", 3), True, quiet=True)
    assert capsys.readouterr().err == ""


def test_zoo_pretrained_names_the_shadowed_nets():
    with pytest.raises(UserError, match="timm:vgg13"):
        create_model("vgg13", 3, pretrained=True)


# ------------------------------------------------------------------ item 9: list models, did you mean


def list_models(capsys, *pattern: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["list", "models", *pattern])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list_models_bare_word_is_a_substring(capsys):
    rc, out, _ = list_models(capsys, "resnet")
    names = out.split()
    assert rc == 0 and "resnet20" in names and "resnet18" in names and "wide_resnet50_2" in names
    rc, out, _ = list_models(capsys, "resnet*")  # a wildcard keeps its meaning
    assert rc == 0 and "resnet18" in out.split() and "wide_resnet50_2" not in out.split()


def test_list_models_says_when_nothing_matches(capsys):
    rc, out, err = list_models(capsys, "zzqx")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "no model name matches 'zzqx'" in err


def test_list_models_marks_which_source_a_name_picks(capsys):
    rc, out, _ = list_models(capsys, "vgg13")
    rows = out.splitlines()
    assert rc == 0 and rows[0].startswith("# zoo (1); a bare name picks the zoo first")
    assert rows[1].startswith("vgg13") and "shadows timm:vgg13" in rows[1]
    assert any(r.startswith("vgg13 ") and "write timm:vgg13" in r for r in rows)
    assert any(r.startswith("vgg13 ") and "write tv:vgg13" in r for r in rows)
    assert any(r.startswith("vgg13_bn ") and "bare name is timm's: write tv:vgg13_bn" in r for r in rows)
    _, full, _ = list_models(capsys)
    assert any(r.startswith("mobilenetv2 ") and "shadows tv:mobilenet_v2" in r for r in full.splitlines())


@pytest.mark.parametrize("name, close", [
    ("resnt20", "resnet20"),
    ("timm:resnet181", "timm:resnet18"),
    ("tv:mobilenet_v2x", "tv:mobilenet_v2"),
    ("mobilenetv2_10", "mobilenetv2_100"),
])
def test_unknown_model_says_did_you_mean(name, close):
    with pytest.raises(UserError) as err:
        create_model(name, 3)
    msg = str(err.value)
    assert close in msg.partition("did you mean")[2] and "kdistill list models" in msg, msg
