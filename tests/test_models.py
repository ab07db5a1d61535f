"""create_model: zoo, timm, torchvision; pretrained weights from local files; checkpoints."""
import pytest
import torch
from safetensors.torch import save_file

from kdistill.data.transforms import Preprocessing
from kdistill.errors import UserError
from kdistill.models import create_model, default_preprocessing, resolve_name
from kdistill.models.checkpoint import load_model, read_meta, save_model


def test_resolution_order():
    assert resolve_name("resnet20") == ("zoo", "resnet20")
    assert resolve_name("vgg13") == ("zoo", "vgg13")          # the zoo wins over timm/torchvision
    assert resolve_name("timm:vgg13") == ("timm", "vgg13")
    assert resolve_name("resnet10t") == ("timm", "resnet10t")
    assert resolve_name("tv:squeezenet1_0") == ("tv", "squeezenet1_0")
    with pytest.raises(UserError, match="kdistill list models"):
        resolve_name("no_such_net")


def test_timm_pretrained_from_local_file(tmp_path):
    """timm's real pretrained path (pretrained_cfg_overlay file=...), offline; head resized."""
    src = create_model("resnet10t", 1000)
    path = tmp_path / "r10t.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = create_model("resnet10t", 7, pretrained=True, pretrained_path=str(path))
    assert model.get_classifier().out_features == 7
    assert torch.equal(model.conv1[0].weight, src.conv1[0].weight)  # backbone weights loaded
    pp = default_preprocessing(model, pretrained=True)
    assert pp.image_size == model.pretrained_cfg["input_size"][-1]
    assert pp.mean == pytest.approx(list(model.pretrained_cfg["mean"]))
    assert model.kdistill_arch == "timm:resnet10t"
    # a local weights file alone means pretrained, in create_model and in the config
    alone = create_model("resnet10t", 7, pretrained_path=str(path))
    assert torch.equal(alone.conv1[0].weight, src.conv1[0].weight)
    from kdistill.config import ModelConfig

    assert ModelConfig(name="timm:resnet10t", pretrained_path=str(path)).pretrained


def test_torchvision_pretrained_from_local_file(tmp_path):
    import torchvision

    src = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    path = tmp_path / "mb.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    model = create_model("tv:mobilenet_v3_small", 5, pretrained=True, pretrained_path=str(path)).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert torch.equal(model.features[0][0].weight, src.features[0][0].weight)
    src2 = torchvision.models.get_model("resnet18", weights=None)
    p2 = tmp_path / "r18.pth"
    torch.save(src2.state_dict(), p2)
    m2 = create_model("tv:resnet18", 3, pretrained=True, pretrained_path=str(p2))
    assert m2.fc.out_features == 3 and torch.equal(m2.conv1.weight, src2.conv1.weight)
    with pytest.raises(UserError, match="does not hold resnet18 weights"):
        create_model("tv:resnet18", 3, pretrained=True, pretrained_path=str(path))


def test_pretrained_missing_file():
    with pytest.raises(UserError, match="does not exist"):
        create_model("resnet10t", 3, pretrained=True, pretrained_path="/no/file.pth")


def test_checkpoint_roundtrip(tmp_path):
    model = create_model("resnet8", 4).eval()
    meta = {"arch": "resnet8", "num_classes": 4, "classes": list("abcd"),
            "preprocessing": Preprocessing(32, [0.5] * 3, [0.2] * 3).to_dict()}
    save_model(tmp_path / "m.safetensors", model, meta)
    assert read_meta(tmp_path / "m.safetensors")["classes"] == list("abcd")
    loaded, m = load_model(str(tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    again = create_model("resnet8", 4, checkpoint=str(tmp_path / "m.safetensors")).eval()
    assert torch.equal(again(x), model(x))
    with pytest.raises(UserError, match="has 4 classes but the data has 3"):
        create_model("resnet8", 3, checkpoint=str(tmp_path / "m.safetensors"))
    with pytest.raises(UserError, match="holds a resnet8, not a resnet14"):
        create_model("resnet14", 4, checkpoint=str(tmp_path / "m.safetensors"))
