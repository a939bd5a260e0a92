"""Pure renderers: shapes, dtypes, alpha, scales, colormaps, composite, montage (square and not)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mcloss
from mcloss.explainability import render
from mcloss.explainability.explanation import explain


@pytest.fixture(scope="module")
def model() -> mcloss.MCModel:
    torch.manual_seed(0)
    return mcloss.build_model("resnet18", 4, xi=3, img_size=64).eval()


def _rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("w,h", [(40, 40), (70, 30), (25, 90)])
def test_overlay_shape_dtype_and_alpha(w, h):
    img = _rgb(w, h)
    m = np.random.default_rng(1).random((5, 7)).astype(np.float32) * 3
    out = render.overlay(img, m, alpha=0.4, peaks_xy=np.array([[3.0, 4.0]]), contour=0.5)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(render.overlay(img, m, alpha=0.0), img)
    full = render.overlay(img, np.full((h, w), 2.0), alpha=1.0)  # constant map → top colour everywhere
    assert (full == render.colormap_lut("inferno")[255]).all()
    jet = render.overlay(img, np.zeros((h, w)), alpha=1.0, colormap="jet")
    assert (jet == render.colormap_lut("jet")[0]).all()
    with pytest.raises(ValueError):
        render.overlay(img, m, alpha=1.5)
    with pytest.raises(ValueError):
        render.overlay(img.astype(np.float32), m)


def test_shared_scale_and_signed_maps():
    maps = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 4.0)]).astype(np.float32)
    np.testing.assert_allclose(render.normalize_group(maps, shared=True)[:, 0, 0], [0.25, 1.0])
    np.testing.assert_allclose(render.normalize_group(maps, shared=False)[:, 0, 0], [1.0, 1.0])
    assert not render.normalize_map(np.zeros((3, 3))).any()
    signed = np.array([[-2.0, 0.0, 1.0]], np.float32)
    np.testing.assert_allclose(render.normalize_map(signed, signed=True), [[-1.0, 0.0, 0.5]])
    img = np.zeros((1, 3, 3), np.uint8)
    out = render.overlay(img, signed, alpha=1.0, signed=True)
    lut = render.colormap_lut(render.DIVERGING)
    np.testing.assert_array_equal(out[0, 0], lut[0])
    np.testing.assert_array_equal(out[0, 1], lut[128])  # 0 sits in the middle of the diverging map
    # a shared vmax dims the weaker map
    weak = render.overlay(img[:, :1], np.array([[1.0]]), alpha=1.0, vmax=4.0)
    np.testing.assert_array_equal(weak[0, 0], render.colormap_lut("inferno")[64])


def test_part_composite_colours_each_channel_region():
    img = np.full((20, 30, 3), 128, np.uint8)
    maps = np.zeros((3, 20, 30), np.float32)
    maps[0, :, :10] = 1.0
    maps[1, :, 10:20] = 0.5
    maps[2, :, 20:] = 2.0
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    out = render.part_composite(img, maps, colors=colors, shared_scale=False, alpha=1.0)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[5, 5], [255, 0, 0])
    np.testing.assert_array_equal(out[5, 15], [0, 255, 0])
    np.testing.assert_array_equal(out[5, 25], [0, 0, 255])
    shared = render.part_composite(img, maps, colors=colors, shared_scale=True, alpha=1.0)
    assert shared[5, 15, 1] < 255 and shared[5, 25, 2] == 255  # the weak channel is paler on a shared scale
    assert len({tuple(c) for c in render.part_colors(14)}) == 14


def test_montage_and_tiles_have_consistent_height(model):
    img = _rgb(90, 50)
    (e,) = explain(model, [Image.fromarray(img)], "top2", guided=True)
    for group in (0, 1):
        tiles = render.explanation_tiles(img, e, group, height=60)
        # original, 3 channels, CCMP, parts, Grad-CAM, guided
        assert len(tiles) == 8
        assert all(t[0].shape == (60, 108, 3) and t[0].dtype == np.uint8 for t in tiles)
        out = render.explanation_montage(img, e, group, class_names=model.class_names, height=60)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
        assert out.shape[1] == 8 * 108 + 7 * 4 + 2 * 4
    tall = render.explanation_montage(_rgb(30, 80), explain(model, [Image.fromarray(_rgb(30, 80))])[0], height=64)
    assert tall.dtype == np.uint8 and tall.shape[1] == 7 * 24 + 6 * 4 + 2 * 4  # 7 tiles, 24 px wide


def test_montage_generic_and_figure(model):
    tiles = [(_rgb(40, 20), "a"), (_rgb(10, 40), "b with a very long title that must be shortened"), (_rgb(8, 8), "ü")]
    out = render.montage(tiles, height=32, gutter=2, header="header")
    assert out.dtype == np.uint8 and out.shape[1] == 64 + 8 + 32 + 2 * 2 + 2 * 2
    with pytest.raises(ValueError):
        render.montage([])
    img = _rgb(50, 70)
    (e,) = explain(model, [Image.fromarray(img)], "pred")
    arr = render.figure_to_array(render.explanation_figure(img, e, class_names=model.class_names, height=80))
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.shape[0] > 80
    bar = render.colorbar("viridis", width=50, height=6)
    assert bar.shape == (6, 50, 3) and (bar[0, 0] == render.colormap_lut("viridis")[0]).all()
    legend = render.composite_legend(render.part_colors(3), ["a", "b", "c"], width=60)
    assert legend.shape == (54, 60, 3) and legend.dtype == np.uint8
