"""Channel maps: slices of F from one pass, targets, peaks and the mapping back onto the original image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mcloss
from mcloss.core.transforms import EvalTransform, Geometry
from mcloss.explainability.explanation import channel_peaks, crop_mask, explain, resolve_targets, to_original


def _model(classes: int = 5, transform: EvalTransform | None = None) -> mcloss.MCModel:
    torch.manual_seed(0)
    return mcloss.build_model("resnet18", classes, xi=3, img_size=64, transform=transform).eval()


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_channel_maps_are_slices_of_forward_features_and_heads_match():
    model = _model()
    images = [_image(64, 64, 1), _image(64, 64, 2)]
    ex = explain(model, images, ["pred", "top3"], gradcam=False)
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
    explain(model, [_image(64, 64, i) for i in range(3)], "top2", gradcam=True, channel_gradcam=True)
    assert calls == [3]


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
    (e,) = explain(model, [_image(*size)], "pred", gradcam=True)
    g = e.groups[0]
    assert e.image_size == size
    assert to_original(g.ccmp, e.geometry).shape == (size[1], size[0])
    assert (g.peaks_xy >= 0).all() and (g.peaks_xy[:, 0] < size[0]).all() and (g.peaks_xy[:, 1] < size[1]).all()
    assert g.gradcam.shape == e.feature_hw and (g.gradcam >= 0).all()


def test_images_of_different_input_shapes_keep_order():
    model = _model(transform=EvalTransform(64))  # shorter side 64, no crop: inputs differ in shape
    images = [_image(64, 96, 0), _image(64, 64, 1), _image(96, 64, 2)]
    ex = explain(model, images, "pred")
    assert [e.image_size for e in ex] == [(64, 96), (64, 64), (96, 64)]
    assert [e.feature_hw for e in ex] == [(6, 4), (4, 4), (4, 6)]
