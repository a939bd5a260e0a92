"""Pure renderers: shapes, dtypes, alpha, scales, colormaps, composite, montage (square and not)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_model
from PIL import Image

import mcloss
from mcloss import explain
from mcloss.explainability import render


def reference_lut(name: str) -> np.ndarray:
    """[256, 3] uint8 RGB of a matplotlib colormap, computed here as the reference."""
    import matplotlib

    return (matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def model() -> mcloss.MCModel:
    return tiny_model(4)


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
    assert (full == reference_lut("inferno")[255]).all()
    jet = render.overlay(img, np.zeros((h, w)), alpha=1.0, colormap="jet")
    assert (jet == reference_lut("jet")[0]).all()
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
    lut = reference_lut(render.DIVERGING)
    np.testing.assert_array_equal(out[0, 0], lut[0])
    np.testing.assert_array_equal(out[0, 1], lut[128])  # 0 sits in the middle of the diverging map
    # a shared vmax dims the weaker map
    weak = render.overlay(img[:, :1], np.array([[1.0]]), alpha=1.0, vmax=4.0)
    np.testing.assert_array_equal(weak[0, 0], reference_lut("inferno")[64])


def test_colorize_and_strongest_match_their_numpy_definitions():
    rng = np.random.default_rng(3)
    m = np.concatenate([rng.random((40, 30)), np.arange(256)[None, :30] / 255.0, [[-0.2, 1.3, 1e9, np.inf, -np.inf] * 6]])
    m = m.astype(np.float32)
    lut = reference_lut("viridis")
    np.testing.assert_array_equal(render.colorize(m, "viridis"), lut[np.clip(np.rint(m * 255.0), 0, 255).astype(np.uint8)])
    s = m * 2 - 1
    expect = lut[np.clip(np.rint((s + 1) * 0.5 * 255.0), 0, 255).astype(np.uint8)]
    np.testing.assert_array_equal(render.colorize(s, "viridis", signed=True), expect)
    maps = rng.integers(0, 3, (4, 20, 25)).astype(np.float32)  # many ties: the first channel wins, as argmax
    winner, best = render.colour._strongest(maps)
    np.testing.assert_array_equal(winner, maps.argmax(axis=0))
    np.testing.assert_array_equal(best, maps.max(axis=0))


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
    e = explain(model, Image.fromarray(img), "top2", maps="channels,gradcam,guided")
    style = render.Style(tile_height=60)
    for group in (0, 1):
        tiles = render.montage_tiles(img, e, group, style)
        # original, 3 channels, CCMP, parts, Grad-CAM, guided
        assert [t.slug for t in tiles] == ["original", "ch1", "ch2", "ch3", "ccmp", "parts", "gradcam", "guided_gradcam"]
        assert all(t.image.shape == (60, 108, 3) and t.image.dtype == np.uint8 for t in tiles)
        assert tiles[5].footer is not None and tiles[5].footer.shape[1] == 108
        out = e.montage(group, style)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
        assert out.shape[1] == 8 * 108 + 7 * 4 + 2 * 4
    tall = explain(model, Image.fromarray(_rgb(30, 80))).montage(style=render.Style(tile_height=64))
    assert tall.dtype == np.uint8 and tall.shape[1] == 7 * 24 + 6 * 4 + 2 * 4  # 7 tiles, 24 px wide


def test_style_is_checked_and_drives_every_tile(model):
    for bad in ({"alpha": 1.5}, {"interpolation": "cubic"}, {"contour": 0.0}, {"tile_height": 0}, {"colormap": "nope"}):
        with pytest.raises(ValueError):
            render.Style(**bad)
    img = _rgb(64, 64)
    e = explain(model, Image.fromarray(img), "pred", maps="channels,gradcam,channel_gradcam")
    g = e.groups[0]
    # alpha 0 means the image only, for every map kind
    blank = render.Style(alpha=0.0, peaks=False)
    for tile in render.group_tiles(img, e, g, blank):
        if tile.slug != "parts":
            np.testing.assert_array_equal(tile.image[5:], img[5:])  # under the channel colour bar
    # channels carry their composite colour in a bar on top
    colors = render.part_colors(3)
    tiles = render.group_tiles(img, e, g, render.Style())
    for i in range(3):
        assert (tiles[i].image[:5] == colors[i]).all()
    # a shared scale dims the weaker channels; per-map scaling does not
    shared = render.group_tiles(img, e, g, render.Style(shared_scale=True, peaks=False))
    own = render.group_tiles(img, e, g, render.Style(shared_scale=False, peaks=False))
    weakest = int(np.argmin(g.channels.max(axis=(1, 2))))
    assert shared[weakest].image.astype(int).sum() != own[weakest].image.astype(int).sum()
    assert [t.slug for t in render.side_rows(img, e, g, render.Style())[0]] == ["gradcam_ch1", "gradcam_ch2", "gradcam_ch3"]
    # nearest upsampling shows blocks of feature cells: few distinct values per row
    near = render.map_overlay(img, e, g, "ccmp", 0, render.Style(interpolation="nearest", alpha=1.0))
    assert len(np.unique(near[32].reshape(-1, 3), axis=0)) <= e.feature_hw[1]


def test_montage_generic_and_figure(model):
    tiles = [(_rgb(40, 20), "a"), (_rgb(10, 40), "b with a very long title that must be shortened"), (_rgb(8, 8), "ü")]
    out = render.montage(tiles, height=32, gutter=2, header="header")
    assert out.dtype == np.uint8 and out.shape[1] == 64 + 8 + 32 + 2 * 2 + 2 * 2
    with pytest.raises(ValueError):
        render.montage([])
    img = _rgb(50, 70)
    e = explain(model, Image.fromarray(img), "pred")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(e.figure(style=render.Style(tile_height=80)))
    canvas.draw()
    arr = np.asarray(canvas.buffer_rgba())[..., :3]
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[0] > 80
    legend = render.composite_legend(render.part_colors(3), ["a", "b", "c"], width=60)
    assert legend.shape == (54, 60, 3) and legend.dtype == np.uint8
    assert render.fit_view(_rgb(3000, 1000), 1024).shape == (341, 1024, 3)
    assert render.fit_view(_rgb(300, 100), 1024).shape == (100, 300, 3)


def test_a_large_group_legend_fills_columns_and_leaves_the_tiles_their_height():
    """ξ = 64 (a torchvision ResNet-18's 512 channels over 8 classes): the legend wraps into columns beside
    each other instead of one column 64 rows long, so the montage neither turns into a white page nor shrinks
    its tiles to stay under the pixel cap; a group of up to eight keeps its one column."""
    labels = render.channel_labels(64)
    legend = render.composite_legend(render.part_colors(64), labels, width=256)
    cols = render.legend_columns(labels, 256)
    assert cols == 3 and legend.shape == (18 * 22, 256, 3)
    for i in (0, 21, 22, 63):  # column-major: each swatch at its column's left, its row's top
        x, y = (i // 22) * (256 // 3) + 4, (i % 22) * 18 + 3
        assert tuple(legend[y + 2, x + 2]) == tuple(render.part_colors(64)[i])
    assert render.composite_legend(render.part_colors(8), render.channel_labels(8), width=256).shape == (144, 256, 3)
    model = tiny_model(2, xi=64)
    e = explain(model, Image.fromarray(_rgb(64, 64)), "pred")
    picture = render.explanation_montage(e.view, e, 0, render.Style(tile_height=256))
    assert picture.shape[0] < 256 + 22 * 18 + 120  # tile, legend rows, titles and header
    assert (picture > 245).all(-1).mean() < 0.7


def test_signed_maps_are_shown_by_a_high_percentile_not_their_sparse_maximum():
    from mcloss.explainability.render.colour import SIGNED_CLIP_PERCENTILE, signed_scale

    spiky = np.full((100, 100), 0.01, np.float32)
    spiky[0, :10] = -5.0  # a few large gradients, as Guided Backprop gives
    assert signed_scale(spiky) == pytest.approx(np.percentile(np.abs(spiky), SIGNED_CLIP_PERCENTILE)) == pytest.approx(0.01)
    assert signed_scale(np.zeros((4, 4))) == 0.0
    single = np.zeros((100, 100), np.float32)
    single[3, 4] = -2.0  # the percentile is 0: the maximum scales it
    assert signed_scale(single) == 2.0

    # the sample's Guided Grad-CAM tile shows its gradients: 4.6 % of the pixels more than 20 levels from the
    # image under the colormap's centre (by the maximum: 0.5 %)
    image = np.asarray(Image.open(mcloss.default_checkpoint().parent / "samples" / "images" / "0001_Common_Bird.jpg").convert("RGB"))
    model = mcloss.load_checkpoint(mcloss.default_checkpoint())
    exp = explain(model, Image.fromarray(image), "pred", maps="channels,gradcam,guided")
    thumb, _ = render.thumbnail(image, 224)
    tile = render.map_tile(thumb, exp, exp.groups[0], mcloss.explainability.kinds.get("guided"), render.Style()).image
    centre = render.overlay(thumb, np.zeros(thumb.shape[:2], np.float32), alpha=0.5, signed=True)
    assert np.mean(np.abs(tile.astype(int) - centre).max(axis=2) > 20) > 0.03


def test_a_title_too_long_for_its_tile_keeps_its_number_and_its_size():
    """A class name too long for a tile is shortened before the probability, not the probability cut off, and
    the title shrinks at most to MIN_SHRINK so a row's titles stay alike."""
    import cv2

    from mcloss.explainability.render.text import MIN_SHRINK, _fitted

    text, scale = _fitted("Grad-CAM Forked_Tail_Pink_Belly 0.30", 0.55, 150)
    assert text.startswith("Grad-CAM Fork") and text.endswith(".. 0.30") and scale == pytest.approx(0.55 * MIN_SHRINK)
    assert cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] <= 150
    assert _fitted("Finer vs Teal_Beak_Pink_Belly +2", 0.55, 150)[0].endswith(".. +2")
    assert _fitted("target x (FC 0.33)", 0.55, 500) == ("target x (FC 0.33)", 0.55)  # what fits stays as it is
    header = "target Rose_breasted_Grosbeak (FC 0.91, MC 0.88)   pred FC: Rose_breasted_Grosbeak 0.91   MC: Rose 0.88"
    text, scale = _fitted(header, 0.55, 600, 0)  # a montage's header, a line of its own: smaller, but whole
    assert text == header and scale < 0.55
    assert cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] <= 600
