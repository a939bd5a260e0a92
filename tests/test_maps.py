"""Channel maps: slices of F from one pass, targets, peaks, the mapping back onto the original image, and
the Explanation object (class names, drawing, saving)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hooks_left, tiny_model
from PIL import Image
from torch import nn

import mcloss
from mcloss import explain
from mcloss.core.model import FCHead, MCModel
from mcloss.core.transforms import EvalTransform, Geometry
from mcloss.explainability.explanation import GroupMaps, PreparedImage, explain_tensor, parse_maps
from mcloss.explainability.geometry import channel_peaks, crop_mask, to_original
from mcloss.explainability.render import Style
from mcloss.explainability.targets import check_target, resolve_targets


def _model(classes: int = 5, transform: EvalTransform | None = None) -> mcloss.MCModel:
    return tiny_model(classes, transform=transform)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_channel_maps_are_slices_of_forward_features_and_heads_match():
    model = _model()
    images = [_image(64, 64, 1), _image(64, 64, 2)]
    ex = explain(model, images, ["pred", "top3"], maps=("channels",))
    x = torch.stack([model.transform(img) for img in images])
    with torch.no_grad():
        f = model.forward_features(x)
        fc = torch.softmax(model.head_logits(f), 1).numpy()
        mc = torch.softmax(model.mc_logits(f), 1).numpy()
    for b, e in enumerate(ex):
        np.testing.assert_allclose(e.probs_fc, fc[b], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(e.probs_mc, mc[b], rtol=1e-5, atol=1e-7)
        assert e.feature_hw == tuple(f.shape[2:])
        for g in e.groups:
            want = f[b, model.group_slice(g.target)].numpy()
            np.testing.assert_array_equal(g.channels, want)
            np.testing.assert_array_equal(g.ccmp, want.max(0))
            assert g.channels.dtype == np.float32 and g.channels.shape == (3, *e.feature_hw)
            assert g.prob == pytest.approx(fc[b, g.target])
            assert g.gradcam is None
    assert [g.target for g in ex[0].groups] == [int(fc[0].argmax())]
    assert [g.target for g in ex[1].groups] == list(np.argsort(-fc[1])[:3])


def test_one_forward_pass_and_no_hooks(monkeypatch):
    model = _model()
    calls = []
    original = model.forward_features
    monkeypatch.setattr(model, "forward_features", lambda x: calls.append(x.shape[0]) or original(x))
    ex = explain(model, [_image(64, 64, i) for i in range(3)], "top2", maps=("channels", "gradcam", "channel_gradcam"))
    assert calls == [3]
    assert all(g.gradcam is not None and g.channel_gradcam is not None for e in ex for g in e.groups)
    assert hooks_left(model) == 0
    calls.clear()
    explain(model, [_image(64, 64, i) for i in range(5)], "pred", batch_size=2)
    assert calls == [2, 2, 1]


def test_map_kinds_follow_the_cli_vocabulary():
    assert parse_maps("gradcam, channels") == ("channels", "gradcam")
    assert parse_maps(["guided"]) == ("channels", "guided")
    with pytest.raises(ValueError, match="unknown xray"):
        parse_maps("channels,xray")
    model = _model()
    (e,) = explain(model, [_image(64, 64)], "pred", maps="channels,channel_gradcam")
    assert e.groups[0].gradcam is None and e.groups[0].channel_gradcam.shape == e.groups[0].channels.shape


def _hand_set_model() -> MCModel:
    """F = ReLU(conv1x1(x)) with F_k = ReLU((k + 1) · x_{k mod 3}): two classes of ξ = 3 channels."""
    conv = nn.Conv2d(3, 6, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for k in range(6):
            conv.weight[k, k % 3] = k + 1
    features = nn.Sequential(conv, nn.ReLU())
    tf = EvalTransform((2, 2))
    config = {"backbone": "hand-set", "num_classes": 2, "xi": 3, "groups": [3, 3], "img_size": 2}
    return MCModel(features, FCHead(6, 2, (1, 1)), [3, 3], ["left", "right"], tf, config).eval()


def test_hand_set_model_gives_exact_ccmp_maps_and_mc_logits():
    model = _hand_set_model()
    x = torch.tensor([[[1.0, -1.0], [0.0, 2.0]], [[0.0, 3.0], [-2.0, 1.0]], [[2.0, 0.0], [1.0, -1.0]]])[None]
    geo = Geometry((2, 2), (2, 2), (0, 0, 2, 2))
    (e,) = explain_tensor(model, x, [geo], [[0, 1]])
    left, right = e.groups
    # class 0: F0 = ReLU(x0), F1 = ReLU(2·x1), F2 = ReLU(3·x2)
    np.testing.assert_array_equal(left.channels, [[[1, 0], [0, 2]], [[0, 6], [0, 2]], [[6, 0], [3, 0]]])
    np.testing.assert_array_equal(left.ccmp, [[6, 6], [3, 2]])
    # class 1: F3 = ReLU(4·x0), F4 = ReLU(5·x1), F5 = ReLU(6·x2)
    np.testing.assert_array_equal(right.ccmp, [[12, 15], [6, 8]])
    assert left.peaks_feature.tolist() == [[1, 1], [1, 0], [0, 0]] and left.peak_values.tolist() == [2, 6, 6]
    # MC logits = spatial mean of CCMP: 17/4 and 41/4; their softmax is the MC head's probabilities
    logits = model.mc_logits(model.forward_features(x)).detach()
    np.testing.assert_allclose(logits.numpy(), [[4.25, 10.25]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(e.probs_mc, [1 / (1 + np.exp(6.0)), 1 / (1 + np.exp(-6.0))], rtol=1e-6)
    assert e.prediction_mc == 1 and e.class_names == ("left", "right")
    # peaks in original pixels: cell centres
    np.testing.assert_allclose(left.peaks_xy, [[1.5, 1.5], [1.5, 0.5], [0.5, 0.5]])


def test_explanation_carries_names_draws_and_saves_itself(tmp_path):
    model = _model()
    path = tmp_path / "bird.png"
    _image(90, 60, 3).save(path)
    e = explain(model, path, "top2", maps=("channels", "gradcam", "channel_gradcam", "guided"))
    assert isinstance(e, mcloss.Explanation) and e.source == str(path)
    assert e.class_names == tuple(model.class_names) and e.class_name(e.prediction) == model.class_names[e.prediction]
    assert e.view.shape == (60, 90, 3)
    style = Style(colormap="viridis", alpha=0.4)
    for kind in ("channel", "ccmp", "gradcam", "channel_gradcam", "guided"):
        assert e.overlay(kind, channel=1, style=style).shape == (60, 90, 3)
    np.testing.assert_array_equal(e.overlay("ccmp", style=style), e.tiles(0, style)[3].image)
    np.testing.assert_array_equal(e.overlay("channel", channel=2, style=style), e.tiles(0, style)[2].image)
    assert e.overlay("ccmp", style=Style(alpha=0.0)).tolist() == e.view.tolist()  # alpha 0: the image only
    with pytest.raises(IndexError):
        e.overlay("channel", channel=3)
    pic = e.montage(1, style)
    assert pic.dtype == np.uint8 and pic.shape[0] > style.tile_height
    record = e.save(tmp_path / "out" / "bird.png", style)
    assert record["file"] == str(path) and record["outputs"] == ["bird.png.png", "bird.png.r2.png", "bird.png.npz", "bird.png.json"]
    assert [t["name"] for t in record["targets"]] == [g.name for g in e.groups]
    assert all((tmp_path / "out" / name).is_file() for name in record["outputs"])
    bare = explain_tensor(model, model.transform(_image(64, 64))[None], [model.transform.geometry(64, 64)])[0]
    with pytest.raises(ValueError, match="pass image="):
        bare.montage()
    assert bare.montage(image=np.zeros((64, 64, 3), np.uint8)).shape[1] > 64


def test_prepared_images_and_paths_share_one_pass(tmp_path, monkeypatch):
    model = _model()
    img = _image(64, 64, 4)
    img.save(tmp_path / "a.png")
    geo = model.transform.geometry(64, 64)
    prepared = PreparedImage(model.transform.apply(img, geo), geo, None, "mem")
    calls = []
    original = model.forward_features
    monkeypatch.setattr(model, "forward_features", lambda x: calls.append(x.shape[0]) or original(x))
    a, b, c = explain(model, [img, tmp_path / "a.png", prepared], "pred")
    assert calls == [3]
    np.testing.assert_array_equal(a.groups[0].channels, b.groups[0].channels)
    np.testing.assert_array_equal(a.groups[0].channels, c.groups[0].channels)
    assert (a.source, b.source, c.source) == (None, str(tmp_path / "a.png"), "mem") and c.view is None
    with pytest.raises(mcloss.ImageLoadError, match="missing.png: file not found"):
        explain(model, tmp_path / "missing.png")


def test_check_target_validates_before_any_work():
    model = _model()
    assert check_target(model, "PRED") == "pred" and check_target(model, "top3") == "top3"
    assert check_target(model, "class_002") == 2 and check_target(model, "4") == 4
    with pytest.raises(KeyError):
        check_target(model, "sparrow")
    with pytest.raises(IndexError):
        check_target(model, "9")
    with pytest.raises(ValueError, match="k must be"):
        check_target(model, "top9")


def test_targets_by_index_name_label_and_errors():
    model = _model()
    probs = np.array([[0.1, 0.5, 0.2, 0.15, 0.05], [0.3, 0.1, 0.1, 0.1, 0.4]])
    got = resolve_targets(model, [2, ["class_004", "pred", "label"]], probs, probs[::-1], labels=[None, 0])
    assert got == [[2], [4, 0]]  # "pred" and "label" both 0 → de-duplicated
    assert resolve_targets(model, "pred_mc", probs, probs[::-1]) == [[4], [1]]
    assert resolve_targets(model, "top2", probs, probs) == [[1, 2], [4, 0]]
    with pytest.raises(KeyError):
        resolve_targets(model, "sparrow", probs, probs)
    with pytest.raises(IndexError):
        resolve_targets(model, 5, probs, probs)
    with pytest.raises(ValueError, match="label"):
        resolve_targets(model, "label", probs, probs)
    with pytest.raises(ValueError, match="per-image"):
        resolve_targets(model, [1, 2, 3], probs, probs)


def test_channel_peaks_first_argmax():
    maps = np.zeros((2, 3, 4), np.float32)
    maps[0, 2, 1] = 5.0
    maps[1, 0, 3] = maps[1, 2, 0] = 1.0
    xy, v = channel_peaks(maps)
    assert xy.tolist() == [[1, 2], [3, 0]]
    assert v.tolist() == [5.0, 1.0]


def test_to_original_identity_and_resize_match_bilinear():
    rng = np.random.default_rng(0)
    m = rng.random((5, 7)).astype(np.float32)
    same = Geometry((7, 5), (7, 5), (0, 0, 7, 5))
    np.testing.assert_allclose(to_original(m, same), m, atol=1e-6)
    import cv2

    double = Geometry((14, 10), (7, 5), (0, 0, 7, 5))
    np.testing.assert_allclose(to_original(m, double), cv2.resize(m, (14, 10)), atol=1e-5)
    assert to_original(m, double, size=(28, 20)).shape == (20, 28)


def test_planted_peak_maps_back_through_resize_and_crop(monkeypatch):
    """resize 80 (shorter side) + centre crop 64 on a 170×117 image; F is 4×4 (16 input px per cell)."""
    tf = EvalTransform(80, (64, 64))
    model = _model(transform=tf)
    img = _image(170, 117)
    geo = tf.geometry(170, 117)
    assert geo.resized == (116, 80) and geo.crop == (26, 8, 64, 64)
    planted = torch.zeros(1, model.num_channels, 4, 4)
    planted[0, 7, 2, 3] = 4.0  # class 2, its second channel, cell (x=3, y=2)
    planted[0, 6, 0, 0] = 1.0
    monkeypatch.setattr(model, "forward_features", lambda x: planted.expand(x.shape[0], -1, -1, -1).clone())
    (e,) = explain(model, [img], 2)
    g = e.groups[0]
    assert g.target == 2 and e.image_size == (170, 117)
    assert g.peaks_feature[1].tolist() == [3, 2]
    # cell centre: input (56, 40) → resized (82, 48) → original (82·170/116, 48·117/80)
    np.testing.assert_allclose(g.peaks_xy[1], [82 * 170 / 116, 48 * 117 / 80], rtol=1e-9)
    np.testing.assert_allclose(g.peaks_xy[0], [34 * 170 / 116, 16 * 117 / 80], rtol=1e-9)
    assert g.peak_values.tolist() == [1.0, 4.0, 0.0]
    up = to_original(g.channels[1], e.geometry)
    assert up.shape == (117, 170) and up.dtype == np.float32
    y, x = np.unravel_index(up.argmax(), up.shape)
    assert (x, y) == (120, 70)  # the pixel containing (120.17, 70.2)
    # outside the crop (x < 26·170/116 = 38.1, x ≥ 90·170/116 = 131.9, y < 8·117/80 = 11.7, y ≥ 72·117/80 = 105.3) is zero
    assert not up[:, :38].any() and not up[:, 132:].any() and not up[:12].any() and not up[105:].any()
    inside = crop_mask(e.geometry)
    assert inside[12:105, 38:132].all() and inside.sum() == 93 * 94 and not inside[:, :38].any()


@pytest.mark.parametrize("size", [(64, 64), (90, 50), (40, 120)])
def test_any_aspect_ratio(size):
    model = _model()
    (e,) = explain(model, [_image(*size)], "pred")
    g = e.groups[0]
    assert e.image_size == size
    assert to_original(g.ccmp, e.geometry).shape == (size[1], size[0])
    assert (g.peaks_xy >= 0).all() and (g.peaks_xy[:, 0] < size[0]).all() and (g.peaks_xy[:, 1] < size[1]).all()
    assert g.gradcam.shape == e.feature_hw and (g.gradcam >= 0).all()


def test_peaks_of_a_batch_belong_to_each_image_and_rank():
    """Uneven groups, several targets per image, a geometry per image: each group's peaks are its own channels'
    argmax cells, mapped through its own image's geometry (explain computes them for the batch at once)."""
    model = tiny_model(5, xi=None)  # groups of 102 and 103 channels
    geos = [model.transform.geometry(w, h) for w, h in [(64, 64), (100, 64), (64, 300), (640, 480)]]
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ex = explain_tensor(model, x, geos, ["pred", "top2", 3, [4, 0, 2, 1]], maps=("channels",))
    assert [len(e.groups) for e in ex] == [1, 2, 1, 4]
    for e, geo in zip(ex, geos, strict=True):
        for g in e.groups:
            cells, values = channel_peaks(g.channels)
            assert len(g.channels) == model.groups[g.target]
            assert np.array_equal(g.peaks_feature, cells) and np.array_equal(g.peak_values, values)
            assert np.array_equal(g.peaks_xy, geo.feature_to_original(cells, e.feature_hw))


def test_images_of_different_input_shapes_keep_order():
    model = _model(transform=EvalTransform(64))  # shorter side 64, no crop: inputs differ in shape
    images = [_image(64, 96, 0), _image(64, 64, 1), _image(96, 64, 2)]
    ex = explain(model, images, "pred")
    assert [e.image_size for e in ex] == [(64, 96), (64, 64), (96, 64)]
    assert [e.feature_hw for e in ex] == [(6, 4), (4, 4), (4, 6)]


def test_nearest_upsampling_shows_raw_cells():
    m = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    geo = Geometry(original=(8, 8), resized=(8, 8), crop=(0, 0, 8, 8))
    out = to_original(m, geo, (8, 8), interpolation="nearest")
    np.testing.assert_array_equal(out, np.kron(m, np.ones((4, 4), np.float32)))
    # bilinear blends neighbouring cells
    assert len(np.unique(to_original(m, geo, (8, 8)))) > 4
    # with a crop: outside it is 0, inside the cells land on the cropped part
    geo = Geometry(original=(12, 8), resized=(12, 8), crop=(2, 0, 8, 8))
    out = to_original(m, geo, (12, 8), interpolation="nearest")
    expected = np.zeros((8, 12), np.float32)
    expected[:, 2:10] = np.kron(m, np.ones((4, 4), np.float32))
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="interpolation"):
        to_original(m, geo, interpolation="cubic")


def test_single_image_takes_a_list_of_targets_and_a_scalar_label():
    model = _model()
    img = _image(64, 64, 5)
    e = explain(model, img, ["label", "top2"], labels=1)
    assert e.label == 1 and e.groups[0].target == 1 and len(e.groups) in (2, 3)
    assert [g.target for g in e.groups[1:]] == [t for t in np.argsort(-e.probs_fc, kind="stable")[:2] if t != 1][: len(e.groups) - 1]
    assert check_target(model, np.int64(2)) == 2 and explain(model, img, np.int64(3)).groups[0].target == 3
    gen = explain(model, (im for im in [img, img]), "pred")
    assert len(gen) == 2 and gen[0].prediction == gen[1].prediction
    with pytest.raises(ValueError, match="batch_size"):
        explain(model, [img], batch_size=0)
    with pytest.raises(mcloss.ParameterError, match="PIL images, paths or PreparedImages"):
        explain(model, [img, 3])


def test_group_maps_hold_every_kind_as_an_attribute():
    """Kinds' maps live in GroupMaps.maps and read, write, construct, replace, copy and pickle as attributes."""
    import copy
    import dataclasses
    import pickle

    ch = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    cam = np.ones((2, 2), np.float32)
    gm = GroupMaps(0, "a", ch, ch.max(0), np.zeros((3, 2), int), np.zeros((3, 2)), ch.max((1, 2)),
                   gradcam=cam, gradcam_peak_xy=np.array([1.0, 2.0]))  # fmt: skip
    assert gm.maps["gradcam"] is cam and gm.gradcam is cam and gm.gradcam_peak_xy.tolist() == [1.0, 2.0]
    assert gm.guided is None and gm.channel_gradcam is None
    gm.guided = np.zeros((8, 8), np.float32)
    assert set(gm.maps) == {"gradcam", "guided"}
    plain = dataclasses.replace(gm, gradcam=None)
    assert plain.gradcam is None and gm.gradcam is cam  # the copy has its own dicts
    twin = copy.copy(gm)
    twin.guided = None
    assert gm.guided is not None and twin.guided is None
    back = pickle.loads(pickle.dumps(gm))
    np.testing.assert_array_equal(back.gradcam, cam)
    assert back.gradcam_peak_xy.tolist() == [1.0, 2.0]
    with pytest.raises(TypeError, match="xray"):
        GroupMaps(0, "a", ch, ch.max(0), np.zeros((3, 2), int), np.zeros((3, 2)), ch.max((1, 2)), xray=cam)
    with pytest.raises(AttributeError):
        gm.guided_peak_xy  # noqa: B018 - Guided Grad-CAM keeps no peak
    # a field is set as itself without asking the kind table: no kind may take a field's name
    from mcloss.explainability import kinds

    assert {f.name for f in dataclasses.fields(GroupMaps)} - {kinds.CHANNELS} <= kinds.RESERVED
