"""Montages composed on a torch device: the same picture as :func:`explanation_montage`, its map pixels
drawn by tensor ops where the model ran (a CUDA GPU), so that only the encoded bytes come back.

What runs on the device: the warp of every map onto the view (the eval crop undone, bilinear, 0 outside
the crop; one matrix product per axis), the display normalization, the colormap lookup, the alpha blend,
the colour bars, the part composite and the peak marks. What the CPU still draws, with the renderer's own
functions: the thumbnail of the original, the text (header, titles, legend) as a "chrome" picture with
white tiles, and each peak mark's small patch (once per radius and colour, cached). Contours and kinds
with a drawing function of their own are drawn by the CPU renderer, whole.

The code is device-agnostic: on CPU tensors it runs too (the tests compare it with the CPU renderer)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from mcloss.explainability.geometry import crop_mask, view_to_map_affine
from mcloss.explainability.render.colour import DIVERGING, colormap_lut, draw_peaks, part_colors, signed_scale
from mcloss.explainability.render.compose import (
    GUTTER,
    TITLE_HEIGHT,
    explanation_montage,
    explanation_tile_height,
    header_text,
    montage,
    present_kinds,
)
from mcloss.explainability.render.layout import aspect_padding, blank_canvas, pad_to_aspect, thumbnail
from mcloss.explainability.render.text import channel_labels, composite_legend
from mcloss.explainability.render.tiles import (
    _BAR_ROWS,
    Style,
    _group_max,
    _tile,
    _view_scale,
    channel_group_tiles,
)

if TYPE_CHECKING:
    from mcloss.explainability.explanation import Explanation, GroupMaps
    from mcloss.explainability.kinds import MapKind

__all__ = ["device_montage", "device_montage_jpeg", "drawn_on_device"]


#: cv2.warpAffine quantizes source coordinates to 1/32 pixel (INTER_BITS = 5); the device warp does too.
_WARP_STEPS = 32


def drawn_on_device(explanation: Explanation, group: int, style: Style) -> bool:
    """Whether :func:`device_montage` draws this target's tiles on the device (else the CPU renderer draws
    the montage and it is only uploaded): no contours, and only kinds drawn by the renderer's built-in tiles."""
    if style.contour is not None:
        return False
    return all(k.draw in (None, channel_group_tiles) for k in present_kinds(explanation.groups[group], montage=True))


def device_montage(
    image: np.ndarray,
    explanation: Explanation,
    group: int = 0,
    style: Style | None = None,
    *,
    device: torch.device | str,
    title: str | None = None,
) -> torch.Tensor:
    """:func:`explanation_montage` as an RGB uint8 [H, W, 3] tensor on ``device``, its maps drawn there.

    Same shape and layout as the CPU montage; its pixels agree up to rounding (the warp's and the blend's)
    and the antialiasing of the peak marks.
    """
    style = style or Style()
    device = torch.device(device)
    if not drawn_on_device(explanation, group, style):
        return torch.from_numpy(explanation_montage(image, explanation, group, style, title=title)).to(device)
    height = explanation_tile_height(image, explanation, group, style)
    thumb, _ = thumbnail(image, height)
    gm = explanation.groups[group]
    view = torch.tensor(thumb, device=device)  # a copy: the thumbnail may be the caller's read-only image
    tiles: list[tuple[torch.Tensor, str, np.ndarray | None]] = [(view, "original", None)]
    for k in present_kinds(gm, montage=True):
        tiles += _kind_tiles(view, thumb.shape[:2], explanation, gm, k, style)
    header = header_text(explanation, gm)
    header = f"{title}: {header}" if title else header
    h, w = thumb.shape[:2]
    chrome = montage([(blank_canvas(h, w), t, footer) for _, t, footer in tiles], height=height, header=header)
    top, bottom, left, right = aspect_padding((h, w), height)
    y = (TITLE_HEIGHT + 6) + TITLE_HEIGHT + top  # the header strip, the title strip, the letterbox
    width = GUTTER + len(tiles) * (left + w + right + GUTTER)
    if chrome.shape[1] != width or chrome.shape[0] < y + h:  # scaled down to the pixel cap: the CPU draws it
        return torch.from_numpy(explanation_montage(image, explanation, group, style, title=title)).to(device)
    # the chrome's tile band is background (white tiles, gutters and letterbox), what the tiles are drawn over
    canvas = torch.from_numpy(np.ascontiguousarray(chrome)).to(device)
    step, row = left + w + right + GUTTER, chrome.shape[1] * 3
    # every tile in one copy, through a strided view of the canvas: tile i at row y, column GUTTER + left + i·step
    start = canvas.storage_offset() + y * row + (GUTTER + left) * 3
    canvas.as_strided((len(tiles), h, w, 3), (step * 3, row, 3, 1), start).copy_(torch.stack([t for t, _, _ in tiles]))
    return canvas


def device_montage_jpeg(
    image: np.ndarray,
    explanation: Explanation,
    group: int,
    style: Style | None,
    *,
    device: torch.device | str,
    quality: int,
    title: str | None = None,
) -> bytes:
    """:func:`device_montage`, encoded as JPEG on ``device`` (:func:`mcloss.data.io.encode_jpeg_tensor`)."""
    from mcloss.data.io import encode_jpeg_tensor

    return encode_jpeg_tensor(device_montage(image, explanation, group, style, device=device, title=title), quality)


# ------------------------------------------------------------------------------------------ tiles


def _kind_tiles(
    view: torch.Tensor, size_hw: tuple[int, int], explanation: Explanation, gm: GroupMaps, kind: MapKind, style: Style
) -> list[tuple[torch.Tensor, str, np.ndarray | None]]:
    """``kind``'s tiles as (image tensor, title, footer): what its CPU drawing function draws."""
    scale = _view_scale(np.empty((*size_hw, 3)), explanation)
    if kind.draw is channel_group_tiles:
        return _channel_group(view, size_hw, explanation, gm, kind, style, scale)
    values = gm.maps[kind.name]
    if kind.per_channel:
        maps = _warp(values, explanation, size_hw, style.interpolation, view.device)
        vmax = float(values.max()) if style.shared_scale else None
        imgs = _with_bars(_overlay(view, maps, _lut(style.colormap, view.device), style.alpha, vmax), len(maps))
        return [(imgs[i], _tile(None, kind, gm, channel=i + 1).title, None) for i in range(len(maps))]
    interpolation = "bilinear" if kind.at_input else style.interpolation
    warped = _warp(values[None], explanation, size_hw, interpolation, view.device)[0]
    title = _tile(None, kind, gm).title
    if kind.signed:
        lut = _lut(DIVERGING, view.device)
        return [(_overlay(view, warped, lut, style.alpha, signed_scale(values), signed=True), title, None)]
    img = _overlay(view, warped, _lut(style.colormap, view.device), style.alpha, None)
    if style.peaks and gm.map_peaks.get(kind.name) is not None:
        img = _draw_peaks(img[None], np.asarray(gm.map_peaks[kind.name])[None] * scale, None)[0]
    return [(img, title, None)]


def _channel_group(
    view: torch.Tensor, size_hw: tuple[int, int], explanation: Explanation, gm: GroupMaps, kind: MapKind,
    style: Style, scale: np.ndarray,
) -> list[tuple[torch.Tensor, str, np.ndarray | None]]:  # fmt: skip
    """The channels kind: the ξ channel overlays, CCMP and the part composite (with its legend)."""
    xi = len(gm.channels)
    maps = _warp(np.concatenate([gm.channels, gm.ccmp[None]]), explanation, size_hw, style.interpolation, view.device)
    colors = part_colors(xi)
    vmax = _group_max(gm, style)
    imgs = _overlay(view, maps, _lut(style.colormap, view.device), style.alpha, vmax)  # the ξ channels, then CCMP
    if style.peaks:  # channel i's own peak on its tile
        imgs = _draw_peaks(imgs, gm.peaks_xy[:xi] * scale, None, tiles=range(xi))
    imgs = _with_bars(imgs, xi)
    out = [
        (imgs[i], _tile(None, kind, gm, channel=i + 1, peak=f"{gm.peak_values[i]:.3g}").title, None) for i in range(xi)
    ]
    out.append((imgs[xi], f"CCMP {gm.name}", None))
    comp = _part_composite(view, maps[:xi], _part_colors(xi, view.device), shared=style.shared_scale, vmax=vmax)
    if style.peaks:
        comp = _draw_peaks(comp[None], gm.peaks_xy * scale, colors)[0]
    legend_width = pad_to_aspect(np.empty((*size_hw, 3), np.uint8)).shape[1]
    legend = composite_legend(colors, channel_labels(xi), width=legend_width)
    out.append((comp, "parts", legend))
    return out


def _with_bars(images: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` of [N, H, W, 3] tiles with their channel's colour bar on top (the CPU's :func:`_tile`)."""
    images[:n, :_BAR_ROWS] = _part_colors(n, images.device)[:, None, None]
    return images


@lru_cache(maxsize=32)
def _part_colors(n: int, device: torch.device) -> torch.Tensor:
    """[n, 3] uint8 :func:`part_colors` on ``device``."""
    return torch.from_numpy(part_colors(n)).to(device)


@lru_cache(maxsize=8)
def _grey_weights(device: torch.device) -> torch.Tensor:
    """The luma weights of :func:`part_composite`'s grey, on ``device``."""
    return torch.tensor([0.299, 0.587, 0.114], device=device)


# ------------------------------------------------------------------------------------------ pixels


def _axis_weights(coef: float, offset: float, n_out: int, n_src: int, keep: np.ndarray, nearest: bool) -> np.ndarray:
    """[n_out, n_src] interpolation weights along one axis: output index u samples the map at
    ``coef·u + offset`` (bilinear with replicated borders, or nearest), rows outside ``keep`` are 0."""
    s = np.round((coef * np.arange(n_out) + offset) * _WARP_STEPS) / _WARP_STEPS
    weights = np.zeros((n_out, n_src), np.float32)
    rows = np.arange(n_out)
    if nearest:
        weights[rows, np.clip(np.floor(s + 0.5), 0, n_src - 1).astype(np.int64)] = 1.0
    else:
        i0 = np.floor(s)
        frac = (s - i0).astype(np.float32)
        np.add.at(weights, (rows, np.clip(i0, 0, n_src - 1).astype(np.int64)), 1.0 - frac)
        np.add.at(weights, (rows, np.clip(i0 + 1, 0, n_src - 1).astype(np.int64)), frac)
    weights[~keep] = 0.0
    return weights


def _warp(maps: np.ndarray, explanation: Explanation, size_hw: tuple[int, int], interpolation: str, device: torch.device) -> torch.Tensor:
    """[N, h, w] maps on the input grid → [N, H, W] float32 on ``device``: :func:`to_original` of each onto a
    view of ``size_hw``, as one product per axis (the warp is axis-aligned)."""
    src = np.asarray(maps, dtype=np.float32)
    h, w = size_hw
    m = view_to_map_affine(explanation.geometry, src.shape[1:], (w, h))
    mask = crop_mask(explanation.geometry, (w, h))
    nearest = interpolation == "nearest"
    wy = _axis_weights(m[1, 1], m[1, 2], h, src.shape[1], mask.any(axis=1), nearest)
    wx = _axis_weights(m[0, 0], m[0, 2], w, src.shape[2], mask.any(axis=0), nearest)
    t = torch.from_numpy(src).to(device)
    return torch.from_numpy(wy).to(device) @ t @ torch.from_numpy(wx.T.copy()).to(device)


@lru_cache(maxsize=16)
def _lut(name: str, device: torch.device) -> torch.Tensor:
    """[256, 3] uint8 colormap table on ``device`` (the CPU renderer's :func:`colormap_lut`)."""
    return torch.from_numpy(colormap_lut(name).copy()).to(device)


def _normalize(maps: torch.Tensor, vmax: float | None, *, signed: bool = False, each: bool = False) -> torch.Tensor:
    """:func:`normalize_map` (``each``: every map of [N, H, W] by its own maximum, as :func:`normalize_group`)."""
    if vmax is not None:
        scale = torch.full((len(maps), 1, 1) if each else (), float(vmax), device=maps.device)
    elif each:
        scale = (maps.abs() if signed else maps).amax(dim=(1, 2), keepdim=True)
    else:
        scale = (maps.abs() if signed else maps).max()
    norm = (maps / torch.where(scale > 0, scale, 1.0)).clamp(-1.0 if signed else 0.0, 1.0)
    return torch.where(scale > 0, norm, 0.0)


def _overlay(
    view: torch.Tensor, warped: torch.Tensor, lut: torch.Tensor, alpha: float, vmax: float | None, *, signed: bool = False
) -> torch.Tensor:
    """:func:`overlay` without contour or peaks: ``(1 − alpha)·view + alpha·colour``, rounded. ``warped``:
    one map [H, W], or [N, H, W] maps drawn at once (without ``vmax``, each by its own maximum, as one alone)."""
    norm = _normalize(warped, vmax, signed=signed, each=warped.dim() == 3)
    t = (norm + 1.0) * 0.5 if signed else norm
    heat = lut[torch.round(t.clamp(0.0, 1.0) * 255.0).long()]
    out = view.float() * (1.0 - alpha) + heat.float() * alpha
    return torch.round(out).clamp(0, 255).to(torch.uint8)


def _part_composite(
    view: torch.Tensor, chans: torch.Tensor, colors: torch.Tensor, *, shared: bool, vmax: float | None,
    alpha: float = 0.85, desaturate: float = 0.75, gamma: float = 0.75,
) -> torch.Tensor:  # fmt: skip
    """:func:`part_composite` with its defaults: the strongest channel's colour over a dimmed grey image
    (``colors``: [ξ, 3] uint8 on the view's device)."""
    norm = _normalize(chans, vmax if shared else None, each=not shared)
    strength = norm.amax(dim=0)
    winner = norm.argmax(dim=0)  # the first on ties, as the CPU's
    img = view.float()
    grey = torch.round(img @ _grey_weights(view.device))
    base = img * (0.8 * (1.0 - desaturate)) + (grey * (0.8 * desaturate) + 0.2 * 255.0 * 0.5)[..., None]
    cols = colors.float()[winner]
    out = (cols - base) * (alpha * strength**gamma)[..., None] + base + 0.5
    return out.clamp(0, 255).to(torch.uint8)


@lru_cache(maxsize=64)
def _peak_patch(radius: int, color: tuple[int, int, int] | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One peak mark as (gain, offset) [n, n, 3] float32 on ``device``, centred: the CPU's
    :func:`draw_peaks` drawn on black and on white, so that ``pixel·gain + offset`` draws it on any image."""
    half = radius + 5
    n = 2 * half + 1
    colors = None if color is None else np.array([color], np.uint8)
    black = draw_peaks(np.zeros((n, n, 3), np.uint8), np.array([[half, half]]), colors, size=radius).astype(np.float32)
    white = draw_peaks(np.full((n, n, 3), 255, np.uint8), np.array([[half, half]]), colors, size=radius).astype(np.float32)
    return torch.from_numpy((white - black) / 255.0).to(device), torch.from_numpy(black).to(device)


def _draw_peaks(
    images: torch.Tensor, peaks_xy: np.ndarray, colors: np.ndarray | None, tiles: Sequence[int] | None = None
) -> torch.Tensor:
    """:func:`draw_peaks` on [N, H, W, 3] tiles (default size), each mark pasted from its cached patch: every
    peak on tile 0, or peak i on tile ``tiles[i]``."""
    h, w = images.shape[1:3]
    radius = max(4, min(h, w) // 28)
    half = radius + 5
    out = images.float()
    for i, (x, y) in enumerate(np.asarray(peaks_xy, dtype=np.float64).reshape(-1, 2)):
        color = None if colors is None else tuple(int(v) for v in colors[i % len(colors)])
        gain, offset = _peak_patch(radius, color, images.device)
        px, py = int(np.floor(x)), int(np.floor(y))
        x0, y0, x1, y1 = max(0, px - half), max(0, py - half), min(w, px + half + 1), min(h, py + half + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        g = gain[y0 - py + half : y1 - py + half, x0 - px + half : x1 - px + half]
        o = offset[y0 - py + half : y1 - py + half, x0 - px + half : x1 - px + half]
        tile = out[0 if tiles is None else tiles[i]]
        tile[y0:y1, x0:x1] = torch.round(tile[y0:y1, x0:x1] * g + o)
    return out.clamp(0, 255).to(torch.uint8)
