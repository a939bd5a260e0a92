"""Colour: colormaps, map normalization, heatmap overlays, peaks, contours and the part composite.

The default colormap is :data:`DEFAULT_COLORMAP` (perceptually uniform); signed maps use the diverging
:data:`DIVERGING` centred on 0. Maps are normalized for display only. Colours are RGB tuples."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np

from mcloss.core.errors import ParameterError
from mcloss.explainability.render.layout import check_image

__all__ = [
    "colormap_lut",
    "DEFAULT_COLORMAP",
    "DIVERGING",
    "normalize_map",
    "normalize_group",
    "SIGNED_CLIP_PERCENTILE",
    "signed_scale",
    "colorize",
    "overlay",
    "draw_peaks",
    "draw_contour",
    "part_colors",
    "part_composite",
]


#: The default colormap of every overlay (perceptually uniform; ``jet`` matches published figures).
DEFAULT_COLORMAP = "inferno"
#: The colormap of signed maps, centred on 0.
DIVERGING = "RdBu_r"


@lru_cache(maxsize=32)
def colormap_lut(name: str) -> np.ndarray:
    """[256, 3] uint8 RGB lookup table of a matplotlib colormap (cached, read-only).

    Raises:
        ParameterError: an unknown colormap.
    """
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError as exc:
        raise ParameterError(f"colormap: unknown colormap {name!r}", parameter="colormap") from exc
    lut = (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    lut.setflags(write=False)
    return lut


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


#: A signed map (Guided Grad-CAM) is shown scaled by this percentile of its absolute values, the few larger ones
#: saturating: by its maximum, its sparse gradients left the tile almost blank (on the 24 gallery samples, 98.1-99.7 %
#: of the pixels lay within a tenth of the maximum, the colormap's pale centre). Captum's ``visualize_image_attr``
#: clips alike (its ``outlier_perc``, 2 %).
SIGNED_CLIP_PERCENTILE = 99.5


def signed_scale(map_hw: np.ndarray) -> float:
    """The display scale of a signed map: :data:`SIGNED_CLIP_PERCENTILE` of its absolute values (its maximum
    when that percentile is 0; 0 for an all-zero map)."""
    magnitude = np.abs(np.asarray(map_hw, dtype=np.float32))
    if magnitude.size == 0:
        return 0.0
    scale = float(np.percentile(magnitude, SIGNED_CLIP_PERCENTILE))
    return scale if scale > 0 else float(magnitude.max())


def normalize_group(maps: np.ndarray, *, shared: bool = False, vmax: float | None = None) -> np.ndarray:
    """Normalize [N, h, w] maps to [0, 1]: by one shared max (``vmax``, default theirs: strengths compare)
    or each by its own max."""
    m = np.asarray(maps, dtype=np.float32)
    if shared:
        return normalize_map(m, vmax)
    return np.stack([normalize_map(x) for x in m]) if len(m) else m.copy()


def colorize(norm_map: np.ndarray, colormap: str = DEFAULT_COLORMAP, *, signed: bool = False) -> np.ndarray:
    """A normalized map ([0, 1], or [-1, 1] if signed) → RGB uint8 [h, w, 3]."""
    m = np.asarray(norm_map, dtype=np.float32)
    t = (m + 1.0) * 0.5 if signed else m
    if t.ndim != 2 or t.size == 0:
        return colormap_lut(colormap)[np.clip(np.rint(t * 255.0), 0, 255).astype(np.uint8)]
    # the same for a 2-D map in OpenCV, about 5× faster: its rounding is numpy's (half to even)
    idx = cv2.convertScaleAbs(np.clip(t, 0.0, 1.0), alpha=255.0)
    return cv2.LUT(cv2.merge([idx, idx, idx]), colormap_lut(colormap).reshape(256, 1, 3))


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
    img = check_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ParameterError(f"alpha must be in [0, 1], got {alpha}", parameter="alpha")
    m = _fit(map_hw, img.shape[:2])
    norm = normalize_map(m, vmax, signed=signed)
    heat = colorize(norm, colormap or (DIVERGING if signed else DEFAULT_COLORMAP), signed=signed)
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
    out = check_image(image).copy()
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
    out = check_image(image).copy()
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
    img = check_image(image)
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
