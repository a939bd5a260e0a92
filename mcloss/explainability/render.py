"""Pure rendering of maps: arrays in, arrays out (RGB uint8 images, float maps).

Conventions: images are RGB uint8 [H, W, 3]; ``alpha`` is the heatmap's opacity (0 = image only); the
default colormap is ``inferno`` (``viridis``, ``jet`` and any matplotlib name work); signed maps use the
diverging ``RdBu_r`` centred on 0. Maps are normalized for display only. OpenCV is used for resizing and
drawing on RGB arrays (colours are passed as RGB tuples); nothing here converts to BGR — callers that
encode with OpenCV convert explicitly (see :func:`mcloss.export.encode_png`).
"""

from __future__ import annotations

import colorsys
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np

from mcloss.explainability.explanation import Explanation, GroupMaps, to_original

__all__ = [
    "DIVERGING",
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
    "colorbar",
    "resize_to_height",
    "titled_tile",
    "montage",
    "thumbnail",
    "explanation_tiles",
    "explanation_montage",
    "explanation_figure",
    "figure_to_array",
]

DIVERGING = "RdBu_r"
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT_RGB = (30, 30, 30)
_BG_RGB = (255, 255, 255)


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


def normalize_group(maps: np.ndarray, *, shared: bool = True) -> np.ndarray:
    """Normalize [N, h, w] maps to [0, 1]: by one shared max (strengths compare) or each by its own max."""
    m = np.asarray(maps, dtype=np.float32)
    if shared:
        return normalize_map(m)
    return np.stack([normalize_map(x) for x in m]) if len(m) else m.copy()


def colorize(norm_map: np.ndarray, colormap: str = "inferno", *, signed: bool = False) -> np.ndarray:
    """A normalized map ([0, 1], or [-1, 1] if signed) → RGB uint8 [h, w, 3]."""
    m = np.asarray(norm_map, dtype=np.float32)
    t = (m + 1.0) * 0.5 if signed else m
    idx = np.clip(np.rint(t * 255.0), 0, 255).astype(np.uint8)
    return _lut(colormap)[idx]


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
        map_hw: raw map; resized bilinearly to [H, W] if needed (use :func:`mcloss.maps.to_original` first
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
    shared_scale: bool = True,
    alpha: float = 0.85,
    desaturate: float = 0.75,
    gamma: float = 0.75,
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
    """
    img = _check_image(image)
    maps = np.stack([_fit(m, img.shape[:2]) for m in np.asarray(channel_maps, dtype=np.float32)])
    cols = part_colors(len(maps)) if colors is None else np.asarray(colors, dtype=np.uint8)
    norm = normalize_group(maps, shared=shared_scale)
    winner = norm.argmax(axis=0)
    strength = np.take_along_axis(norm, winner[None], axis=0)[0] ** gamma
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None].astype(np.float32)
    base = (1.0 - desaturate) * img.astype(np.float32) + desaturate * grey
    base = base * 0.8 + 0.2 * 255.0 * 0.5
    a = (alpha * strength)[..., None]
    out = (1.0 - a) * base + a * cols[winner].astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def composite_legend(
    colors: np.ndarray, labels: Sequence[str], *, width: int, row_height: int = 18
) -> np.ndarray:
    """A small legend strip [len·row_height, width, 3]: a colour swatch and a label per channel."""
    n = len(labels)
    out = np.full((max(1, n) * row_height, width, 3), _BG_RGB, np.uint8)
    scale = row_height / 40.0
    for i, text in enumerate(labels):
        y0 = i * row_height
        sw = row_height - 6
        c = tuple(int(v) for v in colors[i])
        cv2.rectangle(out, (4, y0 + 3), (4 + sw, y0 + 3 + sw), c, -1)
        _put_text(out, text, (10 + sw, y0 + row_height - 5), scale, width - 14 - sw)
    return out


def colorbar(colormap: str, *, width: int, height: int = 10, signed: bool = False) -> np.ndarray:
    """A horizontal colour bar [height, width, 3] of a colormap (low → high, or −max → +max if signed)."""
    ramp = np.linspace(-1.0 if signed else 0.0, 1.0, width, dtype=np.float32)
    return np.repeat(colorize(ramp[None], colormap, signed=signed), height, axis=0)


# ------------------------------------------------------------------------------------------- montage


def _check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {img.dtype} {img.shape}")
    return img


def resize_to_height(image: np.ndarray, height: int) -> np.ndarray:
    """Resize an RGB image to ``height`` keeping its aspect ratio (area filter when shrinking)."""
    img = _check_image(image)
    h, w = img.shape[:2]
    if h == height:
        return img
    new_w = max(1, int(round(w * height / h)))
    interp = cv2.INTER_AREA if height < h else cv2.INTER_LINEAR
    return cv2.resize(img, (new_w, height), interpolation=interp)


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
    strip = np.full((title_height, img.shape[1], 3), _BG_RGB, np.uint8)
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
    """Lay titled tiles in one row: each image scaled to ``height`` keeping aspect, thin white gutters.

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
        img = resize_to_height(tile[0], height)
        col = titled_tile(img, tile[1], title_height=title_height)
        if len(tile) > 2 and tile[2] is not None:
            col = np.concatenate([col, _fit_width(_check_image(tile[2]), col.shape[1])], axis=0)
        cols.append(col)
    full_h = max(c.shape[0] for c in cols)
    parts = []
    for i, c in enumerate(cols):
        if c.shape[0] < full_h:
            c = np.concatenate([c, np.full((full_h - c.shape[0], c.shape[1], 3), _BG_RGB, np.uint8)])
        parts.append(c)
        if i < len(cols) - 1:
            parts.append(np.full((full_h, gutter, 3), _BG_RGB, np.uint8))
    row = np.concatenate(parts, axis=1)
    row = np.pad(row, ((0, gutter), (gutter, gutter), (0, 0)), constant_values=255)
    if header:
        strip = np.full((title_height + 6, row.shape[1], 3), _BG_RGB, np.uint8)
        _put_text(strip, header, (gutter + 2, title_height - 2), (title_height + 4) / 40.0, row.shape[1] - 2 * gutter)
        row = np.concatenate([strip, row], axis=0)
    return row


def _fit_width(img: np.ndarray, width: int) -> np.ndarray:
    if img.shape[1] >= width:
        return img[:, :width]
    return np.pad(img, ((0, 0), (0, width - img.shape[1]), (0, 0)), constant_values=255)


def thumbnail(image: np.ndarray, height: int) -> tuple[np.ndarray, float]:
    """The image scaled to ``height`` (aspect kept) and the scale factor (thumbnail px per original px)."""
    img = _check_image(image)
    thumb = resize_to_height(img, height)
    return thumb, thumb.shape[1] / img.shape[1]


def explanation_tiles(
    image: np.ndarray,
    explanation: Explanation,
    group: int = 0,
    *,
    colormap: str = "inferno",
    alpha: float = 0.5,
    shared_scale: bool = True,
    peaks: bool = True,
    contour: float | None = None,
    height: int = 224,
) -> list[tuple]:
    """The montage's tiles for one target: original | ξ channel overlays | CCMP | parts | Grad-CAM (| guided).

    Every map is mapped through the eval geometry onto a thumbnail of the original of ``height`` rows;
    ``image`` is the original or any resized view of it (same aspect ratio).
    """
    gm: GroupMaps = explanation.groups[group]
    thumb, _ = thumbnail(image, height)
    size = (thumb.shape[1], thumb.shape[0])
    # thumbnail px per original px (``image`` may itself be any downscaled view of the original)
    k = np.array([size[0] / explanation.image_size[0], size[1] / explanation.image_size[1]])
    geo = explanation.geometry
    chans = np.stack([to_original(c, geo, size) for c in gm.channels])
    vmax = float(gm.channels.max()) if shared_scale else None
    colors = part_colors(len(chans))
    tiles: list[tuple] = [(thumb, "original")]
    for i, c in enumerate(chans):
        pk = gm.peaks_xy[i : i + 1] * k if peaks else None
        tiles.append(
            (
                overlay(thumb, c, colormap=colormap, alpha=alpha, vmax=vmax, peaks_xy=pk, contour=contour),
                f"ch {i + 1}/{len(chans)}  peak {gm.peak_values[i]:.3g}",
            )
        )
    ccmp = to_original(gm.ccmp, geo, size)
    tiles.append((overlay(thumb, ccmp, colormap=colormap, alpha=alpha, contour=contour), f"CCMP {gm.name}"))
    comp = part_composite(thumb, chans, colors=colors, shared_scale=shared_scale)
    if peaks:
        comp = draw_peaks(comp, gm.peaks_xy * k, colors)
    legend = composite_legend(colors, [f"ch {i + 1}" for i in range(len(chans))], width=comp.shape[1])
    tiles.append((comp, "parts", legend))
    if gm.gradcam is not None:
        cam = to_original(gm.gradcam, geo, size)
        pk = None if gm.gradcam_peak_xy is None or not peaks else np.asarray(gm.gradcam_peak_xy)[None] * k
        tiles.append(
            (
                overlay(thumb, cam, colormap=colormap, alpha=alpha, peaks_xy=pk, contour=contour),
                f"Grad-CAM {gm.name} {gm.prob:.2f}",
            )
        )
    if gm.guided is not None:
        g = to_original(gm.guided, geo, size)
        tiles.append((overlay(thumb, g, alpha=0.7, signed=True), "Guided Grad-CAM"))
    return tiles


def _header(explanation: Explanation, gm: GroupMaps, class_names: Sequence[str] | None) -> str:
    def name(i: int) -> str:
        return class_names[i] if class_names is not None else str(i)

    p, q = explanation.prediction, explanation.prediction_mc
    text = (
        f"target {gm.name} (FC {gm.prob:.2f}, MC {gm.prob_mc:.2f})   "
        f"pred FC: {name(p)} {explanation.probs_fc[p]:.2f}   MC: {name(q)} {explanation.probs_mc[q]:.2f}"
    )
    if explanation.label is not None:
        text += f"   label: {name(explanation.label)}"
    return text


def explanation_montage(
    image: np.ndarray,
    explanation: Explanation,
    group: int = 0,
    *,
    class_names: Sequence[str] | None = None,
    colormap: str = "inferno",
    alpha: float = 0.5,
    shared_scale: bool = True,
    peaks: bool = True,
    contour: float | None = None,
    height: int = 224,
) -> np.ndarray:
    """One RGB uint8 picture per target: a header with classes and probabilities over
    original | ξ channel overlays | CCMP | part composite (+ legend) | Grad-CAM."""
    tiles = explanation_tiles(
        image,
        explanation,
        group,
        colormap=colormap,
        alpha=alpha,
        shared_scale=shared_scale,
        peaks=peaks,
        contour=contour,
        height=height,
    )
    header = _header(explanation, explanation.groups[group], class_names)
    return montage(tiles, height=height, header=header)


def explanation_figure(
    image: np.ndarray,
    explanation: Explanation,
    group: int = 0,
    *,
    class_names: Sequence[str] | None = None,
    colormap: str = "inferno",
    alpha: float = 0.5,
    shared_scale: bool = True,
    peaks: bool = True,
    height: int = 320,
    dpi: int = 100,
):
    """The montage as a matplotlib Figure (for reports); no pyplot global state is touched."""
    from matplotlib.figure import Figure

    tiles = explanation_tiles(
        image, explanation, group, colormap=colormap, alpha=alpha, shared_scale=shared_scale, peaks=peaks,
        height=height,
    )
    widths = [t[0].shape[1] for t in tiles]
    fig = Figure(figsize=(sum(widths) / dpi + 0.2 * len(tiles), height / dpi * 1.35 + 0.6), dpi=dpi)
    axes = fig.subplots(1, len(tiles), gridspec_kw={"width_ratios": widths})
    for ax, tile in zip(np.atleast_1d(axes), tiles, strict=True):
        img = tile[0] if len(tile) < 3 else np.concatenate([tile[0], _fit_width(tile[2], tile[0].shape[1])])
        ax.imshow(img)
        ax.set_title(tile[1], fontsize=8)
        ax.set_axis_off()
    fig.suptitle(_header(explanation, explanation.groups[group], class_names), fontsize=9)
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """Render a matplotlib Figure to an RGB uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
