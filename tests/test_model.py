"""MCModel layouts, interface and weight loading."""

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import mcloss
from mcloss import build_model, ccmp
from mcloss.core.errors import OutOfRangeError, ParameterError, UnknownClassError
from mcloss.core.model import load_backbone_weights


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("resnet18", 4, xi=3, img_size=64, class_names=list("abcd")).eval()


def test_interface(tiny):
    x = torch.randn(2, 3, 64, 64)
    feats = tiny.forward_features(x)
    assert feats.shape == (2, 12, 4, 4)  # layer4 at stride 1: 64 / 16
    assert (feats >= 0).all()  # after the last ReLU
    logits = tiny(x)
    assert type(logits) is torch.Tensor and logits.shape == (2, 4)
    torch.testing.assert_close(logits, tiny.head_logits(feats))
    torch.testing.assert_close(tiny.mc_logits(feats), ccmp(feats, 3).mean(dim=(2, 3)))
    assert tiny.feature_layer is tiny.features
    assert tiny.groups == [3, 3, 3, 3] and tiny.class_names == list("abcd")
    assert tiny.group_slice(2) == slice(6, 9)
    assert tiny.class_index("c") == 2 and tiny.class_index(1) == 1 and tiny.class_index("3") == 3
    with pytest.raises(KeyError) as unknown:  # an UnknownClassError: a KeyError whose text is the message
        tiny.class_index("zebra")
    assert isinstance(unknown.value, UnknownClassError) and str(unknown.value) == "unknown class 'zebra'"
    assert tiny.class_index("004.d") == 3  # an ImageFolder tree's name for the class a checkpoint calls 'd'
    with pytest.raises(IndexError) as outside:
        tiny.group_slice(4)
    assert isinstance(outside.value, OutOfRangeError)


def test_mc_head_pools_as_l_dis_was_trained(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 2, xi=2, img_size=64, mc_pool_share=0.25).eval()
    assert model.mc_pool_share == 0.25 and model.config["mc_pool_share"] == 0.25
    feats = torch.zeros(1, 4, 4, 4)  # 16 positions; the top quarter is 4 of them
    feats[0, 0, 0, :] = torch.tensor([8.0, 4.0, 2.0, 1.0])  # class 0's group: channel 0 ...
    feats[0, 1, 1, :2] = torch.tensor([6.0, 3.0])  # ... and channel 1; CCMP is the max of the two
    feats[0, 3] = 1.0  # class 1: 1 everywhere
    # class 0: CCMP holds 8, 6, 4, 3, 2, 1 and zeros: the top 4 average (8 + 6 + 4 + 3) / 4; GAP (8+6+4+3+2+1) / 16
    torch.testing.assert_close(model.mc_logits(feats), torch.tensor([[21 / 4, 1.0]]))
    gap = build_model("resnet18", 2, xi=2, img_size=64)
    assert gap.mc_pool_share == 1.0  # the official global average pooling
    torch.testing.assert_close(gap.mc_logits(feats), torch.tensor([[24 / 16, 1.0]]))
    mcloss.save_checkpoint(model, tmp_path / "m.safetensors")
    assert mcloss.load_checkpoint(tmp_path / "m.safetensors").mc_pool_share == 0.25
    with pytest.raises(ValueError, match="mc_pool_share"):
        build_model("resnet18", 2, xi=2, img_size=64, mc_pool_share=0.0)


def test_feature_layer_output_is_F(tiny):
    seen = {}
    handle = tiny.feature_layer.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    try:
        x = torch.randn(1, 3, 64, 64)
        feats = tiny.forward_features(x)
    finally:
        handle.remove()
    torch.testing.assert_close(seen["out"], feats)


def test_official_vgg16_layout():
    model = build_model("vgg16", 5, xi=3, img_size=224)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert convs[9].out_channels == 15 and convs[10].in_channels == 15 and convs[12].out_channels == 15
    assert not isinstance(list(model.features)[-1], torch.nn.MaxPool2d)
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 3, 224, 224)).shape == (1, 15, 14, 14)
    assert model.config["head_grid"] == [7, 7]  # the official 14 → 7 max-pool before the FC head


def test_resnet_scratch_layer4_widened_stride1():
    model = build_model("resnet18", 10, xi=3, img_size=224)
    assert model.config["feature_hw"] == [14, 14]
    assert model.features[-1][0].conv1.stride == (1, 1)
    assert model.num_channels == 30


def test_resnet50_pretrained_layout_uneven_split():
    model = build_model("resnet50", 200, xi=None, img_size=448)
    assert sum(model.groups) == 2048
    assert model.groups.count(10) == 152 and model.groups.count(11) == 48
    assert model.config["feature_hw"] == [14, 14]


def test_generic_torchvision_backbone_gets_1x1_conv():
    model = build_model("mobilenet_v3_small", 6, xi=2, img_size=96)
    assert isinstance(model.features[-2], torch.nn.Conv2d) and model.features[-2].out_channels == 12
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 3, 96, 96)).shape[1] == 12


def test_local_weights_file(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = build_model("resnet18", 3, xi=3, img_size=64, pretrained=str(path))
    torch.testing.assert_close(model.features[0].weight, ref.conv1.weight)  # stem kept
    torch.testing.assert_close(model.features[6][0].conv1.weight, ref.layer3[0].conv1.weight)
    pth = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), pth)
    torch.testing.assert_close(load_backbone_weights("resnet18", str(pth)).conv1.weight, ref.conv1.weight)
    with pytest.raises(ParameterError, match="missing.pth: weights file not found") as info:
        load_backbone_weights("resnet18", str(tmp_path / "missing.pth"))
    assert info.value.parameters == ("pretrained",)


def test_wrong_or_broken_weights_file_is_refused(tmp_path):
    r34 = tmp_path / "r34.safetensors"  # same first-block shapes as resnet18, extra blocks
    save_file({k: v.contiguous() for k, v in torchvision.models.resnet34().state_dict().items()}, str(r34))
    with pytest.raises(ValueError, match=r"r34\.safetensors: not resnet18 weights \(0 missing, 96 unexpected"):
        load_backbone_weights("resnet18", str(r34))
    r50 = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), r50)
    with pytest.raises(ValueError, match=r"r50\.pth: not resnet18 weights .* [1-9]\d* mis-shaped"):
        load_backbone_weights("resnet18", str(r50))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth: not a readable weights-only PyTorch weights file"):
        load_backbone_weights("resnet18", str(junk))
    # a fine-tuned classifier (other class count, wrapped in {"state_dict": ...}) gives its trunk
    tuned = torchvision.models.resnet18(num_classes=7)
    torch.save({"state_dict": tuned.state_dict()}, tmp_path / "tuned.pth")
    net = load_backbone_weights("resnet18", str(tmp_path / "tuned.pth"))
    torch.testing.assert_close(net.layer4[1].conv2.weight, tuned.layer4[1].conv2.weight)


def test_offline_weights_give_clear_error(monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    # torchvision binds the loader by name in models._api, so patch it there (patching torch.hub would still download)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(ParameterError, match="offline.*pass their file instead") as info:
        load_backbone_weights("resnet18", "IMAGENET1K_V1")
    assert info.value.parameter == "pretrained" and "--" not in str(info.value)  # it names no flag
    with pytest.raises(ValueError, match="unknown weights"):
        load_backbone_weights("resnet18", "NOT_A_WEIGHT")


@pytest.mark.parametrize(("stage", "hw"), [(4, 14), (3, 28), (2, 56)])
def test_resnet_last_stage_gives_finer_maps(stage, hw, tmp_path):
    model = build_model("resnet18", 4, xi=3, img_size=224, last_stage=stage)
    f = model.forward_features(torch.zeros(2, 3, 224, 224))
    assert tuple(f.shape) == (2, 12, hw, hw)
    assert model.config["last_stage"] == stage and model.config["feature_hw"] == [hw, hw]
    assert model.config["head_grid"] == [min(14, hw // 2)] * 2  # the FC head's grid is capped
    stages = [name for name, _ in model.features.named_children()]
    assert len(stages) == 4 + stage  # stem (4 modules), the native stages before it, the widened one
    path = tmp_path / "m.safetensors"
    mcloss.save_checkpoint(model, path)
    loaded = mcloss.load_checkpoint(path)
    assert loaded.config["last_stage"] == stage
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_last_stage_needs_a_resnet_with_fixed_xi():
    with pytest.raises(ParameterError, match="last_stage"):
        build_model("vgg16", 2, xi=3, img_size=64, last_stage=2)
    with pytest.raises(ValueError, match="last_stage"):
        build_model("resnet18", 2, xi=None, img_size=64, last_stage=3)
    with pytest.raises(ValueError, match="last_stage"):
        build_model("resnet18", 2, xi=3, img_size=64, last_stage=1)
