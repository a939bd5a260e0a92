"""Pure rendering of maps: arrays in, arrays out (RGB uint8 images, float maps). The one rendering path:
the app's tiles, the export's montages and report figures are all built by :func:`group_tiles`.

Conventions: images are RGB uint8 [H, W, 3]; ``alpha`` is the heatmap's opacity (0 = image only); the
default colormap is ``inferno`` (``viridis``, ``jet`` and any matplotlib name work); signed maps use the
diverging ``RdBu_r`` centred on 0. Maps are normalized for display only, each by its own maximum or, with
``Style.shared_scale``, a whole channel group by one maximum. OpenCV is used for resizing and drawing on
RGB arrays (colours are passed as RGB tuples); nothing here converts to BGR — the one encoder,
:func:`mcloss.data.io.encode_image`, does that.
"""

from __future__ import annotations

import colorsys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING

import cv2
import numpy as np

from mcloss.explainability.geometry import INTERPOLATIONS, to_original

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mcloss.explainability.explanation import Explanation, GroupMaps

__all__ = [
    "DIVERGING",
    "MAP_OVERLAYS",
    "VIEW_MAX_SIDE",
    "Style",
    "Tile",
    "fit_view",
    "group_tiles",
    "channel_gradcam_tiles",
    "map_overlay",
    "colormap_lut",
    "normalize_map",
    "normalize_group",
    "colorize",
    "overlay",
    "draw_peaks",
    "draw_contour",
    "part_colors",
    "part_composite",
    "composite_legend",
    "resize_to_height",
    "tile_box",
    "pad_to_aspect",
    "letterbox",
    "montage_height",
    "explanation_tile_height",
    "MAX_TILE_ASPECT",
    "MAX_TILE_HEIGHT",
    "MIN_TILE_HEIGHT",
    "MONTAGE_MAX_PIXELS",
    "titled_tile",
    "montage",
    "montage_tiles",
    "thumbnail",
    "explanation_montage",
    "compare_montage",
    "explanation_figure",
]

DIVERGING = "RdBu_r"
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT_RGB = (30, 30, 30)
_BG = 255  # the background's value in every channel (white)
#: Views of the original are kept downscaled to this long side for drawing (the app and ``explain``).
VIEW_MAX_SIDE = 1024
#: Montage tiles are at most this many times wider than tall (or taller than wide); a more extreme image is
#: letterboxed: fitted inside the tile and padded with white.
MAX_TILE_ASPECT = 4.0
#: The largest montage tile height (``Style.tile_height``, ``--tile-height``).
MAX_TILE_HEIGHT = 2048
#: The smallest montage tile height (titles stay legible).
MIN_TILE_HEIGHT = 16
#: A montage never has more pixels than this: its tile height is lowered until it fits (Pillow's
#: decompression-bomb guard starts warning at 89 MP).
MONTAGE_MAX_PIXELS = 24_000_000
#: Rows of the colour bar that ties a channel's tile to its colour in the part composite.
_BAR_ROWS = 5
#: What :func:`map_overlay` can draw.
MAP_OVERLAYS = ("channel", "ccmp", "gradcam", "channel_gradcam", "guided")


@dataclass(frozen=True)
class Style:
    """How explanations are drawn; changing it never re-runs the model.

    Attributes:
        colormap: a matplotlib colormap name (``inferno`` by default; ``jet`` matches published figures).
        alpha: heatmap opacity in [0, 1]; 0 shows the image only.
        shared_scale: normalize a class's channels (and its per-channel Grad-CAM) by one maximum, so their
            strengths compare; otherwise each map by its own maximum.
        peaks: mark each channel's (and Grad-CAM's) peak.
        interpolation: ``bilinear`` (the convention) or ``nearest`` (the raw feature cells as blocks).
        contour: draw each map's iso-line at this fraction of its maximum (None: no contour).
        tile_height: rows of each montage tile, in [MIN_TILE_HEIGHT, MAX_TILE_HEIGHT]; a montage lowers it
            to stay within MONTAGE_MAX_PIXELS (see :func:`montage_height`).
        group_max: with ``shared_scale``, the maximum a channel group (its channels, part composite and
            CCMP) is normalized by instead of its own: one scale for two models' groups (:func:`compare_montage`).
    """

    colormap: str = "inferno"
    alpha: float = 0.5
    shared_scale: bool = False
    peaks: bool = True
    interpolation: str = "bilinear"
    contour: float | None = None
    tile_height: int = 224
    group_max: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.group_max is not None and not self.group_max >= 0:
            raise ValueError(f"group_max must be >= 0, got {self.group_max}")
        if self.contour is not None and not 0.0 < self.contour <= 1.0:
            raise ValueError(f"contour must be in (0, 1], got {self.contour}")
        if not MIN_TILE_HEIGHT <= self.tile_height <= MAX_TILE_HEIGHT:
            raise ValueError(
                f"tile height must be {MIN_TILE_HEIGHT}..{MAX_TILE_HEIGHT} pixels, got {self.tile_height}"
            )
        _lut(self.colormap)  # an unknown colormap fails here, before any work


@dataclass(frozen=True)
class Tile:
    """One picture of a group view.

    Attributes:
        image: RGB uint8.
        title: short title (montage strips).
        caption: longer caption (the app).
        alt: alternative text.
        slug: file-name stem in downloads.
        footer: an image drawn under the tile in montages (the part composite's legend), or None.
    """

    image: np.ndarray
    title: str
    caption: str
    alt: str
    slug: str
    footer: np.ndarray | None = None


@lru_cache(maxsize=32)
def _lut(name: str) -> np.ndarray:
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError as exc:
        raise ValueError(f"unknown colormap {name!r}") from exc
    lut = (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def colormap_lut(name: str = "inferno") -> np.ndarray:
    """[256, 3] uint8 RGB lookup table of a matplotlib colormap (a copy)."""
    return _lut(name).copy()


def normalize_map(map_hw: np.ndarray, vmax: float | None = None, *, signed: bool = False) -> np.ndarray:
    """Scale a map for display: [0, 1] by ``vmax`` (default its max), or [-1, 1] by max |value| if signed.

    An all-zero map stays zero; negative values of an unsigned map clip to 0.
    """
    m = np.asarray(map_hw, dtype=np.float32)
    if signed:
        scale = float(np.abs(m).max()) if vmax is None else float(vmax)
        return np.clip(m / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(m)
    scale = float(m.max()) if vmax is None else float(vmax)
    return np.clip(m / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(m)


def normalize_group(maps: np.ndarray, *, shared: bool = False, vmax: float | None = None) -> np.ndarray:
    """Normalize [N, h, w] maps to [0, 1]: by one shared max (``vmax``, default theirs: strengths compare)
    or each by its own max."""
    m = np.asarray(maps, dtype=np.float32)
    if shared:
        return normalize_map(m, vmax)
    return np.stack([normalize_map(x) for x in m]) if len(m) else m.copy()


def colorize(norm_map: np.ndarray, colormap: str = "inferno", *, signed: bool = False) -> np.ndarray:
    """A normalized map ([0, 1], or [-1, 1] if signed) → RGB uint8 [h, w, 3]."""
    m = np.asarray(norm_map, dtype=np.float32)
    t = (m + 1.0) * 0.5 if signed else m
    if t.ndim != 2 or t.size == 0:
        return _lut(colormap)[np.clip(np.rint(t * 255.0), 0, 255).astype(np.uint8)]
    # the same for a 2-D map in OpenCV, about 5× faster: its rounding is numpy's (half to even)
    idx = cv2.convertScaleAbs(np.clip(t, 0.0, 1.0), alpha=255.0)
    return cv2.LUT(cv2.merge([idx, idx, idx]), _lut(colormap).reshape(256, 1, 3))


def _fit(map_hw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    m = np.asarray(map_hw, dtype=np.float32)
    if m.shape != shape:
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return m


def overlay(
    image: np.ndarray,
    map_hw: np.ndarray,
    *,
    colormap: str | None = None,
    alpha: float = 0.5,
    vmax: float | None = None,
    signed: bool = False,
    peaks_xy: np.ndarray | None = None,
    contour: float | None = None,
) -> np.ndarray:
    """Blend a heatmap over an RGB uint8 image: ``(1 − alpha)·image + alpha·colour``.

    Args:
        image: [H, W, 3] uint8 RGB.
        map_hw: raw map; resized bilinearly to [H, W] if needed (use :func:`mcloss.explainability.geometry.to_original` first
            for maps at feature resolution, so the eval crop is undone).
        colormap: default ``inferno``, or ``RdBu_r`` for signed maps.
        alpha: heatmap opacity in [0, 1]; 0 returns the image.
        vmax: value mapped to the top of the colormap (a shared group max); default the map's own max.
        signed: diverging colormap centred on 0.
        peaks_xy: [N, 2] (x, y) pixel positions to mark.
        contour: draw the iso-line at this fraction of ``vmax`` (e.g. 0.5).
    """
    img = _check_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    m = _fit(map_hw, img.shape[:2])
    norm = normalize_map(m, vmax, signed=signed)
    heat = colorize(norm, colormap or (DIVERGING if signed else "inferno"), signed=signed)
    out = cv2.addWeighted(img, 1.0 - alpha, heat, alpha, 0.0)
    if contour is not None:
        out = draw_contour(out, np.abs(norm) if signed else norm, contour)
    if peaks_xy is not None:
        out = draw_peaks(out, peaks_xy)
    return out


def draw_peaks(
    image: np.ndarray,
    peaks_xy: np.ndarray,
    colors: Sequence[tuple[int, int, int]] | np.ndarray | None = None,
    *,
    size: int | None = None,
) -> np.ndarray:
    """Mark (x, y) points with a cross in a white-outlined ring; returns a new image."""
    out = _check_image(image).copy()
    pts = np.asarray(peaks_xy, dtype=np.float64).reshape(-1, 2)
    r = size or max(4, min(out.shape[:2]) // 28)
    for i, (x, y) in enumerate(pts):
        c = (0, 255, 255) if colors is None else tuple(int(v) for v in colors[i % len(colors)])
        p = (int(np.floor(x)), int(np.floor(y)))
        cv2.circle(out, p, r + 1, (255, 255, 255), 2, cv2.LINE_AA)
        cv2.circle(out, p, r, c, 2, cv2.LINE_AA)
        cv2.drawMarker(out, p, c, cv2.MARKER_CROSS, max(2, r), 1, cv2.LINE_AA)
    return out


def draw_contour(
    image: np.ndarray, norm_map: np.ndarray, level: float = 0.5, color: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """Draw the iso-line ``norm_map == level`` (map in [0, 1], resized to the image) on a copy of it."""
    out = _check_image(image).copy()
    m = _fit(norm_map, out.shape[:2])
    mask = (m >= level).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, color, max(1, min(out.shape[:2]) // 200), cv2.LINE_AA)
    return out


def part_colors(n: int) -> np.ndarray:
    """[n, 3] uint8 RGB: n well-separated hues (tab10 order for n ≤ 10, evenly spaced hues beyond)."""
    if n <= 10:
        return _lut_fixed_tab10()[:n].copy()
    hues = np.arange(n) / n
    return np.array([[int(v * 255 + 0.5) for v in colorsys.hsv_to_rgb(h, 0.85, 0.95)] for h in hues], np.uint8)


@lru_cache(maxsize=1)
def _lut_fixed_tab10() -> np.ndarray:
    import matplotlib

    colors = np.asarray(matplotlib.colormaps["tab10"].colors)[:, :3]
    return (colors * 255.0 + 0.5).astype(np.uint8)


def part_composite(
    image: np.ndarray,
    channel_maps: np.ndarray,
    *,
    colors: np.ndarray | None = None,
    shared_scale: bool = False,
    alpha: float = 0.85,
    desaturate: float = 0.75,
    gamma: float = 0.75,
    vmax: float | None = None,
) -> np.ndarray:
    """Each channel in its own hue on one image: how the group splits the object.

    Per pixel, the strongest channel (after normalization) wins; its hue is blended over a desaturated,
    dimmed image with opacity ``alpha × strength^gamma``.

    Args:
        image: [H, W, 3] uint8 RGB.
        channel_maps: [ξ, h, w] raw maps (resized bilinearly to the image if needed).
        colors: [ξ, 3] uint8 RGB (default :func:`part_colors`).
        shared_scale: one max for the group (weak channels look weak) or each channel by its own max.
        alpha: maximal colour opacity.
        desaturate: 0 keeps the image's colours, 1 makes it grey.
        gamma: < 1 lifts weak activations.
        vmax: with ``shared_scale``, the maximum to normalize by (default the group's own).
    """
    img = _check_image(image)
    maps = np.stack([_fit(m, img.shape[:2]) for m in np.asarray(channel_maps, dtype=np.float32)])
    cols = part_colors(len(maps)) if colors is None else np.asarray(colors, dtype=np.uint8)
    norm = normalize_group(maps, shared=shared_scale, vmax=vmax)
    winner, strength = _strongest(norm)
    strength = strength**gamma
    # base = 0.8 · ((1 − desaturate) · image + desaturate · grey) + 0.1 · 255, a dimmed desaturated image
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    base = img.astype(np.float32)
    base *= 0.8 * (1.0 - desaturate)
    base += (grey * (0.8 * desaturate) + 0.2 * 255.0 * 0.5)[..., None]
    # out = base + a · (colour − base), with a = alpha · strength^gamma
    out = np.take(cols, winner, axis=0).astype(np.float32)
    out -= base
    out *= (alpha * strength)[..., None]
    out += base + 0.5
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def _strongest(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, value) of the largest of [N, H, W] maps at each pixel, the first on ties: ``argmax(axis=0)``
    by N − 1 elementwise comparisons, several times faster than numpy's reduction over the outer axis."""
    best = maps[0].copy()
    winner = np.zeros(best.shape, np.int64)
    for k in range(1, len(maps)):
        better = maps[k] > best
        winner[better] = k
        np.maximum(best, maps[k], out=best)
    return winner, best


def composite_legend(
    colors: np.ndarray, labels: Sequence[str], *, width: int, row_height: int = 18
) -> np.ndarray:
    """A small legend strip [len·row_height, width, 3]: a colour swatch and a label per channel."""
    n = len(labels)
    out = _blank(max(1, n) * row_height, width)
    scale = row_height / 40.0
    for i, text in enumerate(labels):
        y0 = i * row_height
        sw = row_height - 6
        c = tuple(int(v) for v in colors[i])
        cv2.rectangle(out, (4, y0 + 3), (4 + sw, y0 + 3 + sw), c, -1)
        _put_text(out, text, (10 + sw, y0 + row_height - 5), scale, width - 14 - sw)
    return out


# ------------------------------------------------------------------------------------------- montage


def _blank(rows: int, cols: int) -> np.ndarray:
    """A background-coloured RGB uint8 canvas of rows × cols."""
    return np.full((rows, cols, 3), _BG, np.uint8)


def _check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {img.dtype} {img.shape}")
    return img


def resize_to_height(image: np.ndarray, height: int) -> np.ndarray:
    """Resize an RGB image to ``height`` keeping its aspect ratio (area filter when shrinking)."""
    img = _check_image(image)
    h, w = img.shape[:2]
    return _resize(img, height, max(1, int(round(w * height / h))))


def tile_box(size_hw: tuple[int, int], height: int) -> tuple[int, int]:
    """(rows, cols) of an image of ``size_hw`` drawn in a tile of ``height`` rows: scaled to ``height`` rows,
    or to ``MAX_TILE_ASPECT × height`` columns when it is wider than that."""
    h, w = int(size_hw[0]), int(size_hw[1])
    scale = min(height / h, MAX_TILE_ASPECT * height / w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``img`` at rows × cols: the area filter when it shrinks, bilinear when it grows (unchanged if equal)."""
    if img.shape[:2] == (rows, cols):
        return img
    interp = cv2.INTER_AREA if rows * cols < img.shape[0] * img.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(img, (cols, rows), interpolation=interp)


def _within_cap(picture: np.ndarray) -> np.ndarray:
    """``picture``, scaled down (aspect kept) when it has more than MONTAGE_MAX_PIXELS pixels."""
    pixels = picture.shape[0] * picture.shape[1]
    if pixels <= MONTAGE_MAX_PIXELS:
        return picture
    scale = (MONTAGE_MAX_PIXELS / pixels) ** 0.5
    return _resize(picture, max(1, int(picture.shape[0] * scale)), max(1, int(picture.shape[1] * scale)))


def pad_to_aspect(image: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Pad (white, centred) so that width ÷ height lies in [1/MAX_TILE_ASPECT, MAX_TILE_ASPECT], and to at
    least ``rows`` rows; an image already inside is returned as is."""
    img = _check_image(image)
    h, w = img.shape[:2]
    want_h = max(h, rows or 0, int(np.ceil(w / MAX_TILE_ASPECT)))
    want_w = max(w, int(np.ceil(want_h / MAX_TILE_ASPECT)))
    if (want_h, want_w) == (h, w):
        return img
    top, left = (want_h - h) // 2, (want_w - w) // 2
    return np.pad(img, ((top, want_h - h - top), (left, want_w - w - left), (0, 0)), constant_values=255)


def letterbox(image: np.ndarray, height: int) -> np.ndarray:
    """The image as a montage tile of exactly ``height`` rows: scaled into :func:`tile_box`, then padded to
    at most MAX_TILE_ASPECT:1 either way (an ordinary image is only scaled)."""
    img = _check_image(image)
    return pad_to_aspect(_resize(img, *tile_box(img.shape[:2], height)), height)


def montage_height(size_hw: tuple[int, int], tiles: int, tile_height: int, *, extra_rows: int = 0) -> int:
    """The tile height a montage of ``tiles`` tiles of an image of ``size_hw`` is drawn at: ``tile_height``,
    lowered until the montage stays within MONTAGE_MAX_PIXELS (``extra_rows``: titles, header, legend)."""
    h, w = int(size_hw[0]), int(size_hw[1])
    aspect = min(max(w / h, 1 / MAX_TILE_ASPECT), MAX_TILE_ASPECT)
    height = min(int(tile_height), MAX_TILE_HEIGHT)

    def pixels(rows: int) -> float:
        return tiles * (aspect * rows + 8) * (rows + extra_rows)

    while height > MIN_TILE_HEIGHT and pixels(height) > MONTAGE_MAX_PIXELS:
        height = max(MIN_TILE_HEIGHT, int(height * 0.95))
    return height


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only: strip accents, replace the rest with '?'."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii") or "?"


def _put_text(img: np.ndarray, text: str, org: tuple[int, int], scale: float, max_width: int) -> None:
    """Draw text (RGB colour) in place, shrinking then shortening it with '..' to fit ``max_width``."""
    thickness = 1
    text = _ascii(text)
    (tw, _), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    if tw > max_width and tw > 0:
        scale = max(0.3, scale * max_width / tw)
    while len(text) > 1 and cv2.getTextSize(text, _FONT, scale, thickness)[0][0] > max_width:
        text = text[:-3] + ".." if len(text) > 3 else text[:-1]
    cv2.putText(img, text, org, _FONT, scale, _TEXT_RGB, thickness, cv2.LINE_AA)


def titled_tile(image: np.ndarray, title: str, *, title_height: int = 22) -> np.ndarray:
    """An image with a white title strip above it (text fitted to the image width)."""
    img = _check_image(image)
    strip = _blank(title_height, img.shape[1])
    _put_text(strip, title, (3, title_height - 7), title_height / 40.0, img.shape[1] - 6)
    return np.concatenate([strip, img], axis=0)


def montage(
    tiles: Sequence[tuple[np.ndarray, str] | tuple[np.ndarray, str, np.ndarray]],
    *,
    height: int = 224,
    gutter: int = 4,
    title_height: int = 22,
    header: str | None = None,
) -> np.ndarray:
    """Lay titled tiles in one row: each image scaled to ``height`` keeping aspect (extreme shapes
    letterboxed, see :func:`letterbox`), thin white gutters. A row over MONTAGE_MAX_PIXELS is scaled down.

    Args:
        tiles: (image, title) or (image, title, footer): a footer (e.g. a legend) goes under the scaled
            image, padded or cut to its width.
        height: image rows of every tile.
        gutter: white space between and around tiles.
        title_height: rows of each title strip.
        header: a line of text above the whole row.
    """
    if not tiles:
        raise ValueError("montage needs at least one tile")
    cols = []
    for tile in tiles:
        img = letterbox(tile[0], height)
        col = titled_tile(img, tile[1], title_height=title_height)
        if len(tile) > 2 and tile[2] is not None:
            col = np.concatenate([col, _fit_width(_check_image(tile[2]), col.shape[1])], axis=0)
        cols.append(col)
    full_h = max(c.shape[0] for c in cols)
    row = _blank(full_h + gutter, sum(c.shape[1] for c in cols) + gutter * (len(cols) + 1))  # gutters around
    x = gutter
    for c in cols:
        row[: c.shape[0], x : x + c.shape[1]] = c
        x += c.shape[1] + gutter
    if header:
        strip = _blank(title_height + 6, row.shape[1])
        _put_text(strip, header, (gutter + 2, title_height - 2), (title_height + 4) / 40.0, row.shape[1] - 2 * gutter)
        row = np.concatenate([strip, row], axis=0)
    return _within_cap(row)  # only a caller's huge height is scaled down here


def _fit_width(img: np.ndarray, width: int) -> np.ndarray:
    if img.shape[1] >= width:
        return img[:, :width]
    return np.pad(img, ((0, 0), (0, width - img.shape[1]), (0, 0)), constant_values=255)


def thumbnail(image: np.ndarray, height: int) -> tuple[np.ndarray, float]:
    """The image scaled into a ``height``-row tile (:func:`tile_box`: ``height`` rows, or fewer for an image
    wider than MAX_TILE_ASPECT:1) and the scale factor (thumbnail px per original px)."""
    img = _check_image(image)
    thumb = _resize(img, *tile_box(img.shape[:2], height))
    return thumb, thumb.shape[1] / img.shape[1]


def fit_view(image: np.ndarray, max_side: int | None = VIEW_MAX_SIDE) -> np.ndarray:
    """The image downscaled (area filter) so that its long side is at most ``max_side`` (None: as is)."""
    img = _check_image(image)
    h, w = img.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return img
    scale = max_side / max(h, w)
    return _resize(img, max(1, round(h * scale)), max(1, round(w * scale)))


# --------------------------------------------------------------------------------------------- tiles


def _to_view(map_hw: np.ndarray, explanation: Explanation, size: tuple[int, int], style: Style) -> np.ndarray:
    return to_original(map_hw, explanation.geometry, size, interpolation=style.interpolation)


def _view_scale(view: np.ndarray, explanation: Explanation) -> np.ndarray:
    """(kx, ky): view pixels per original pixel, per axis (a view's rounding makes them differ slightly)."""
    return np.array([view.shape[1] / explanation.image_size[0], view.shape[0] / explanation.image_size[1]])


def _with_bar(image: np.ndarray, color: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[:_BAR_ROWS] = color
    return out


def _channel_tile(view, explanation, group, style, i, channel_map, colors) -> Tile:
    """Channel ``i``'s tile; ``channel_map`` is that channel already warped onto ``view``."""
    xi = len(group.channels)
    vmax = _group_max(group, style)
    pk = group.peaks_xy[i : i + 1] * _view_scale(view, explanation) if style.peaks else None
    img = overlay(
        view, channel_map, colormap=style.colormap, alpha=style.alpha, vmax=vmax, peaks_xy=pk, contour=style.contour
    )
    peak = f"{group.peak_values[i]:.3g}"
    return Tile(
        _with_bar(img, colors[i]),
        f"ch {i + 1}/{xi}  peak {peak}",
        f"channel {i + 1}/{xi} · peak {peak}",
        f"channel {i + 1} of {group.name}",
        f"ch{i + 1}",
    )


def _group_max(group: GroupMaps, style: Style) -> float | None:
    """The maximum a group is normalized by under ``shared_scale`` (None: each map by its own)."""
    if not style.shared_scale:
        return None
    return style.group_max if style.group_max is not None else float(group.channels.max())


def _ccmp_tile(view, explanation, group, style) -> Tile:
    size = (view.shape[1], view.shape[0])
    ccmp = _to_view(group.ccmp, explanation, size, style)
    vmax = _group_max(group, style)  # CCMP's own max is the group's
    img = overlay(view, ccmp, colormap=style.colormap, alpha=style.alpha, vmax=vmax, contour=style.contour)
    xi = len(group.channels)
    return Tile(img, f"CCMP {group.name}", f"CCMP (max over {xi} channels)", f"CCMP of {group.name}", "ccmp")


def _gradcam_tile(view, explanation, group, style) -> Tile:
    size = (view.shape[1], view.shape[0])
    cam = _to_view(group.gradcam, explanation, size, style)
    pk = None
    if style.peaks and group.gradcam_peak_xy is not None:
        pk = np.asarray(group.gradcam_peak_xy)[None] * _view_scale(view, explanation)
    img = overlay(view, cam, colormap=style.colormap, alpha=style.alpha, peaks_xy=pk, contour=style.contour)
    return Tile(
        img,
        f"Grad-CAM {group.name} {group.prob:.2f}",
        f"Grad-CAM (FC head) · p {group.prob:.2f}",
        f"Grad-CAM of {group.name}",
        "gradcam",
    )


def _guided_tile(view, explanation, group, style) -> Tile:
    g = to_original(group.guided, explanation.geometry, (view.shape[1], view.shape[0]))  # input resolution
    img = overlay(view, g, alpha=style.alpha, signed=True)
    return Tile(img, "Guided Grad-CAM", "Guided Grad-CAM (signed)", f"Guided Grad-CAM of {group.name}", "guided_gradcam")


def group_tiles(view: np.ndarray, explanation: Explanation, group: GroupMaps, style: Style) -> list[Tile]:
    """The ξ channel overlays, CCMP, part composite and Grad-CAM (and Guided Grad-CAM when computed) of one
    target, drawn at the size of ``view``.

    Args:
        view: RGB uint8 view of the original (any size, same aspect ratio); maps are warped onto it through
            the eval geometry.
        explanation: the image's explanation (geometry, image size).
        group: the target's maps.
        style: display settings.
    """
    view = _check_image(view)
    size = (view.shape[1], view.shape[0])
    xi = len(group.channels)
    colors = part_colors(xi)
    chans = np.stack([_to_view(c, explanation, size, style) for c in group.channels])
    tiles = [_channel_tile(view, explanation, group, style, i, chans[i], colors) for i in range(xi)]
    tiles.append(_ccmp_tile(view, explanation, group, style))
    comp = part_composite(view, chans, colors=colors, shared_scale=style.shared_scale, vmax=_group_max(group, style))
    if style.peaks:
        comp = draw_peaks(comp, group.peaks_xy * _view_scale(view, explanation), colors)
    legend = composite_legend(colors, [f"ch {i + 1}" for i in range(xi)], width=pad_to_aspect(comp).shape[1])
    tiles.append(Tile(comp, "parts", "parts: each channel in its colour", f"part composite of {group.name}", "parts", legend))
    if group.gradcam is not None:
        tiles.append(_gradcam_tile(view, explanation, group, style))
    if group.guided is not None:
        tiles.append(_guided_tile(view, explanation, group, style))
    return tiles


def channel_gradcam_tiles(view: np.ndarray, explanation: Explanation, group: GroupMaps, style: Style) -> list[Tile]:
    """Per-channel Grad-CAM of the group's channels, drawn at the size of ``view`` (empty when not computed)."""
    if group.channel_gradcam is None:
        return []
    view = _check_image(view)
    size = (view.shape[1], view.shape[0])
    maps = [_to_view(c, explanation, size, style) for c in group.channel_gradcam]
    vmax = float(group.channel_gradcam.max()) if style.shared_scale else None
    colors = part_colors(len(maps))
    return [
        Tile(
            _with_bar(overlay(view, m, colormap=style.colormap, alpha=style.alpha, vmax=vmax, contour=style.contour), colors[i]),
            f"Grad-CAM ch {i + 1}",
            f"Grad-CAM · channel {i + 1}",
            f"per-channel Grad-CAM {i + 1} of {group.name}",
            f"gradcam_ch{i + 1}",
        )
        for i, m in enumerate(maps)
    ]


def map_overlay(
    view: np.ndarray, explanation: Explanation, group: GroupMaps, kind: str, channel: int, style: Style
) -> np.ndarray:
    """One map of a target over ``view`` (``kind`` in :data:`MAP_OVERLAYS`), drawn as its tile is."""
    if kind not in MAP_OVERLAYS:
        raise ValueError(f"map kind must be one of {', '.join(MAP_OVERLAYS)}, got {kind!r}")
    view = _check_image(view)
    missing = {"gradcam": group.gradcam, "channel_gradcam": group.channel_gradcam, "guided": group.guided}
    if kind in missing and missing[kind] is None:
        raise ValueError(f"this explanation has no {kind} map (explain with maps=(..., {kind!r}))")
    if kind in ("channel", "channel_gradcam") and not 0 <= channel < len(group.channels):
        raise IndexError(f"channel {channel} out of range [0, {len(group.channels)})")
    if kind == "ccmp":
        return _ccmp_tile(view, explanation, group, style).image
    if kind == "gradcam":
        return _gradcam_tile(view, explanation, group, style).image
    if kind == "guided":
        return _guided_tile(view, explanation, group, style).image
    if kind == "channel_gradcam":
        return channel_gradcam_tiles(view, explanation, group, style)[channel].image
    one = _to_view(group.channels[channel], explanation, (view.shape[1], view.shape[0]), style)
    return _channel_tile(view, explanation, group, style, channel, one, part_colors(len(group.channels))).image


def _header(explanation: Explanation, gm: GroupMaps) -> str:
    p, q = explanation.prediction, explanation.prediction_mc
    text = (
        f"target {gm.name} (FC {gm.prob:.2f}, MC {gm.prob_mc:.2f})   "
        f"pred FC: {explanation.class_name(p)} {explanation.probs_fc[p]:.2f}   "
        f"MC: {explanation.class_name(q)} {explanation.probs_mc[q]:.2f}"
    )
    if explanation.label is not None:
        text += f"   label: {explanation.class_name(explanation.label)}"
    return text


def explanation_tile_height(image: np.ndarray, explanation: Explanation, group: int, style: Style) -> int:
    """``style.tile_height``, lowered so that the target's montage stays within MONTAGE_MAX_PIXELS."""
    gm = explanation.groups[group]
    tiles = 1 + len(gm.channels) + 2 + (gm.gradcam is not None) + (gm.guided is not None)
    legend = 18 * len(gm.channels)
    return montage_height(np.asarray(image).shape[:2], tiles, style.tile_height, extra_rows=2 * 22 + 10 + legend)


def montage_tiles(image: np.ndarray, explanation: Explanation, group: int, style: Style) -> list[Tile]:
    """The montage's tiles: the original, then :func:`group_tiles`, drawn on a thumbnail at the montage's
    tile height (:func:`explanation_tile_height`)."""
    thumb, _ = thumbnail(image, explanation_tile_height(image, explanation, group, style))
    original = Tile(thumb, "original", "original", "input image", "original")
    return [original, *group_tiles(thumb, explanation, explanation.groups[group], style)]


def explanation_montage(
    image: np.ndarray, explanation: Explanation, group: int = 0, style: Style | None = None, *, title: str | None = None
) -> np.ndarray:
    """One RGB uint8 picture per target: a header with classes and probabilities over
    original | ξ channel overlays | CCMP | part composite (+ legend) | Grad-CAM.

    ``image`` is the original or any view of it (same aspect ratio); ``title`` (e.g. the model) leads the header.
    """
    style = style or Style()
    tiles = montage_tiles(image, explanation, group, style)
    header = _header(explanation, explanation.groups[group])
    header = f"{title}: {header}" if title else header
    height = explanation_tile_height(image, explanation, group, style)
    return montage([(t.image, t.title, t.footer) for t in tiles], height=height, header=header)


def compare_montage(
    image: np.ndarray, first: Explanation, second: Explanation, group: int, style: Style, titles: Sequence[str]
) -> np.ndarray:
    """Two models' montages of the same image and target, one above the other, drawn alike; with
    ``style.shared_scale`` both channel groups are normalized by one maximum (the larger), so their strengths
    compare across the models (Grad-CAM keeps its own scale: its units are each model's gradients)."""
    a, b = first.groups[group], second.groups[group]
    if a.target != b.target:
        raise ValueError(f"compare_montage: targets {a.name!r} and {b.name!r} differ")
    if style.shared_scale:
        style = replace(style, group_max=max(float(a.channels.max()), float(b.channels.max())))
    rows = [explanation_montage(image, e, group, style, title=t) for e, t in zip((first, second), titles, strict=True)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return _within_cap(np.concatenate([rows[0], _blank(6, width), rows[1]], axis=0))


def explanation_figure(
    image: np.ndarray, explanation: Explanation, group: int = 0, style: Style | None = None, *, dpi: int = 100
) -> Figure:
    """The montage as a matplotlib Figure (for reports); no pyplot global state is touched."""
    from matplotlib.figure import Figure

    style = style or Style()
    tiles = montage_tiles(image, explanation, group, style)
    widths = [t.image.shape[1] for t in tiles]
    height = explanation_tile_height(image, explanation, group, style)
    fig = Figure(figsize=(sum(widths) / dpi + 0.2 * len(tiles), height / dpi * 1.35 + 0.6), dpi=dpi)
    axes = fig.subplots(1, len(tiles), gridspec_kw={"width_ratios": widths})
    for ax, tile in zip(np.atleast_1d(axes), tiles, strict=True):
        img = tile.image if tile.footer is None else np.concatenate([tile.image, _fit_width(tile.footer, tile.image.shape[1])])
        ax.imshow(img)
        ax.set_title(tile.title, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(_header(explanation, explanation.groups[group]), fontsize=9)
    fig.tight_layout()
    return fig
