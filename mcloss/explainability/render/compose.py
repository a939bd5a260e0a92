"""Montages: every tile of a target in one titled row, two models one above the other, single overlays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from mcloss.core.errors import OutOfRangeError, ParameterError
from mcloss.explainability import kinds
from mcloss.explainability.render.layout import (
    DEFAULT_TILE_HEIGHT,
    MAX_TILE_ASPECT,
    blank_canvas,
    check_image,
    fit_width,
    letterbox,
    montage_height,
    thumbnail,
    within_cap,
)
from mcloss.explainability.render.text import channel_labels, legend_columns, put_text
from mcloss.explainability.render.tiles import Style, Tile, ccmp_tile, channel_tile

if TYPE_CHECKING:
    from mcloss.explainability.explanation import Explanation, GroupMaps
    from mcloss.explainability.kinds import MapKind

__all__ = [
    "GUTTER",
    "TITLE_HEIGHT",
    "header_text",
    "titled_tile",
    "montage",
    "present_kinds",
    "group_tiles",
    "side_rows",
    "overlay_names",
    "map_overlay",
    "common_style",
    "explanation_tile_height",
    "montage_tiles",
    "explanation_montage",
    "compare_montage",
    "stacked_rows",
]


#: Rows of each montage title strip (the header strip has 6 more).
TITLE_HEIGHT = 22
#: White columns between and around montage tiles (and rows under them).
GUTTER = 4


def titled_tile(image: np.ndarray, title: str, *, title_height: int = TITLE_HEIGHT) -> np.ndarray:
    """An image with a white title strip above it (text fitted to the image width)."""
    img = check_image(image)
    return np.concatenate([_title_strip(title, img.shape[1], title_height), img], axis=0)


@lru_cache(maxsize=512)
def _title_strip(title: str, width: int, title_height: int) -> np.ndarray:
    """The white strip of :func:`titled_tile` (cached, read-only: a montage's titles repeat from image to image)."""
    strip = blank_canvas(title_height, width)
    put_text(strip, title, (3, title_height - 7), title_height / 40.0, width - 6)
    strip.setflags(write=False)
    return strip


def montage(
    tiles: Sequence[tuple[np.ndarray, str] | tuple[np.ndarray, str, np.ndarray]],
    *,
    height: int = DEFAULT_TILE_HEIGHT,
    gutter: int = GUTTER,
    title_height: int = TITLE_HEIGHT,
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
        raise ParameterError("tiles: a montage needs at least one tile", parameter="tiles")
    cols = []
    for tile in tiles:
        img = letterbox(tile[0], height)
        col = titled_tile(img, tile[1], title_height=title_height)
        if len(tile) > 2 and tile[2] is not None:
            col = np.concatenate([col, fit_width(check_image(tile[2]), col.shape[1])], axis=0)
        cols.append(col)
    full_h = max(c.shape[0] for c in cols)
    row = blank_canvas(full_h + gutter, sum(c.shape[1] for c in cols) + gutter * (len(cols) + 1))  # gutters around
    x = gutter
    for c in cols:
        row[: c.shape[0], x : x + c.shape[1]] = c
        x += c.shape[1] + gutter
    if header:
        strip = blank_canvas(title_height + 6, row.shape[1])
        put_text(strip, header, (gutter + 2, title_height - 2), (title_height + 4) / 40.0, row.shape[1] - 2 * gutter, min_shrink=0)
        row = np.concatenate([strip, row], axis=0)
    return within_cap(row)  # only a caller's huge height is scaled down here


def present_kinds(group: GroupMaps, *, montage: bool | None = None) -> list[MapKind]:
    """The kinds whose maps ``group`` holds, in table order (``montage``: only those drawn in montages, or
    only those that are not; None: all)."""
    return [
        k for k in kinds.kinds()
        if (k.name == kinds.CHANNELS or group.maps.get(k.name) is not None) and montage in (None, k.in_montage)
    ]  # fmt: skip


def group_tiles(view: np.ndarray, explanation: Explanation, group: GroupMaps, style: Style) -> list[Tile]:
    """The montage tiles of one target, drawn at the size of ``view``: the ξ channel overlays, CCMP and the
    part composite, then each further kind drawn in montages that was computed (Grad-CAM, Guided Grad-CAM).

    Args:
        view: RGB uint8 view of the original (any size, same aspect ratio); maps are warped onto it through
            the eval geometry.
        explanation: the image's explanation (geometry, image size).
        group: the target's maps.
        style: display settings.
    """
    view = check_image(view)
    return [tile for k in present_kinds(group, montage=True) for tile in k.tiles(view, explanation, group, style)]


def side_rows(view: np.ndarray, explanation: Explanation, group: GroupMaps, style: Style) -> list[list[Tile]]:
    """The tiles of the computed kinds that montages leave out (per-channel Grad-CAM), one row per kind."""
    view = check_image(view)
    return [k.tiles(view, explanation, group, style) for k in present_kinds(group, montage=False)]


def overlay_names() -> tuple[str, ...]:
    """What :func:`map_overlay` draws: every map kind, and ``ccmp``."""
    return (kinds.CHANNELS, "ccmp", *kinds.names()[1:])


def map_overlay(
    view: np.ndarray, explanation: Explanation, group: GroupMaps, kind: str, channel: int, style: Style
) -> np.ndarray:
    """One map of a target over ``view``, drawn as its tile is.

    ``kind`` is one of :func:`overlay_names` (``"channel"`` also means ``"channels"``); ``channel`` picks the
    map of a per-channel kind.
    """
    name = kinds.CHANNELS if kind == "channel" else kind
    if name not in overlay_names():
        raise ParameterError(f"kind must be one of {', '.join(overlay_names())}, got {kind!r}", parameter="kind")
    view = check_image(view)
    if name == "ccmp":
        return ccmp_tile(view, explanation, group, style).image
    k = kinds.get(name)
    if k not in present_kinds(group):
        raise ParameterError(f"this explanation has no {name} map (explain with maps=(..., {name!r}))", parameter="maps")
    if k.per_channel and not 0 <= channel < len(group.channels):
        raise OutOfRangeError(f"channel {channel} out of range [0, {len(group.channels)})", parameter="channel")
    if name == kinds.CHANNELS:
        return channel_tile(view, explanation, group, k, style, channel).image
    return k.tiles(view, explanation, group, style)[channel if k.per_channel else 0].image


def header_text(explanation: Explanation, gm: GroupMaps) -> str:
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
    tiles = 1 + sum(k.tile_count(len(gm.channels)) for k in present_kinds(gm, montage=True))
    labels = channel_labels(len(gm.channels))
    h, w = np.asarray(image).shape[:2]
    aspect = min(max(w / h, 1 / MAX_TILE_ASPECT), MAX_TILE_ASPECT)
    height = style.tile_height
    for _ in range(16):  # a lower tile is narrower: its legend may need more rows, and the tile to be lower still
        legend = 18 * -(-len(labels) // legend_columns(labels, int(height * aspect)))  # at the parts tile's width
        lowered = montage_height((h, w), tiles, style.tile_height, extra_rows=2 * 22 + 10 + legend)
        if lowered == height:
            break
        height = lowered
    return height


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
    header = header_text(explanation, explanation.groups[group])
    header = f"{title}: {header}" if title else header
    height = explanation_tile_height(image, explanation, group, style)
    return montage([(t.image, t.title, t.footer) for t in tiles], height=height, header=header)


def common_style(style: Style, first: GroupMaps, second: GroupMaps | None) -> Style:
    """``style``; with a second model's group and ``shared_scale``, both groups normalized by one maximum
    (the larger), so their strengths compare across the models."""
    if second is None or not style.shared_scale:
        return style
    return replace(style, group_max=max(float(first.channels.max()), float(second.channels.max())))


def compare_montage(
    image: np.ndarray, first: Explanation, second: Explanation, group: int, style: Style, titles: Sequence[str]
) -> np.ndarray:
    """Two models' montages of the same image and target, one above the other, drawn alike; with
    ``style.shared_scale`` both channel groups are normalized by one maximum (the larger), so their strengths
    compare across the models (Grad-CAM keeps its own scale: its units are each model's gradients)."""
    a, b = first.groups[group], second.groups[group]
    if a.target != b.target:
        raise ParameterError(f"compare_montage: targets {a.name!r} and {b.name!r} differ")
    style = common_style(style, a, b)
    return stacked_rows([explanation_montage(image, e, group, style, title=t) for e, t in zip((first, second), titles, strict=True)])


def stacked_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Montages one above the other, left-aligned on white, 6 white rows apart (scaled down to the pixel cap)."""
    if not rows:
        raise ParameterError("stacked_rows: no montage to stack")
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    parts = [padded[0]]
    for r in padded[1:]:
        parts += [blank_canvas(6, width), r]
    return within_cap(np.concatenate(parts, axis=0))
