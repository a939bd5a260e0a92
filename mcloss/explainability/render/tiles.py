"""Tiles: the pictures of one target's maps (channels, CCMP, part composite, single and per-channel maps)
and the display :class:`Style` they are drawn with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mcloss.core.errors import ParameterError
from mcloss.explainability.geometry import INTERPOLATIONS, to_original
from mcloss.explainability.render.colour import (
    DEFAULT_COLORMAP,
    colormap_lut,
    draw_peaks,
    overlay,
    part_colors,
    part_composite,
    signed_scale,
)
from mcloss.explainability.render.layout import (
    DEFAULT_TILE_HEIGHT,
    MAX_TILE_HEIGHT,
    MIN_TILE_HEIGHT,
    pad_to_aspect,
)
from mcloss.explainability.render.text import channel_labels, composite_legend

if TYPE_CHECKING:
    from mcloss.explainability.explanation import Explanation, GroupMaps
    from mcloss.explainability.kinds import MapKind

__all__ = [
    "Style",
    "Tile",
    "ccmp_tile",
    "channel_group_tiles",
    "channel_tile",
    "map_tile",
    "per_channel_tiles",
]


#: Rows of the colour bar that ties a channel's tile to its colour in the part composite.
_BAR_ROWS = 5


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

    colormap: str = DEFAULT_COLORMAP
    alpha: float = 0.5
    shared_scale: bool = False
    peaks: bool = True
    interpolation: str = "bilinear"
    contour: float | None = None
    tile_height: int = DEFAULT_TILE_HEIGHT
    group_max: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ParameterError(f"alpha must be in [0, 1], got {self.alpha}", parameter="alpha")
        if self.interpolation not in INTERPOLATIONS:
            raise ParameterError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}", parameter="interpolation"
            )
        if self.group_max is not None and not self.group_max >= 0:
            raise ParameterError(f"group_max must be >= 0, got {self.group_max}", parameter="group_max")
        if self.contour is not None and not 0.0 < self.contour <= 1.0:
            raise ParameterError(f"contour must be in (0, 1], got {self.contour}", parameter="contour")
        if not MIN_TILE_HEIGHT <= self.tile_height <= MAX_TILE_HEIGHT:
            raise ParameterError(
                f"tile_height must be {MIN_TILE_HEIGHT}..{MAX_TILE_HEIGHT} pixels, got {self.tile_height}",
                parameter="tile_height",
            )
        colormap_lut(self.colormap)  # an unknown colormap fails here, before any work (ParameterError)


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


def _to_view(map_hw: np.ndarray, explanation: Explanation, size: tuple[int, int], style: Style) -> np.ndarray:
    return to_original(map_hw, explanation.geometry, size, interpolation=style.interpolation)


def _view_scale(view: np.ndarray, explanation: Explanation) -> np.ndarray:
    """(kx, ky): view pixels per original pixel, per axis (a view's rounding makes them differ slightly)."""
    return np.array([view.shape[1] / explanation.image_size[0], view.shape[0] / explanation.image_size[1]])


def _with_bar(image: np.ndarray, color: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[:_BAR_ROWS] = color
    return out


def _tile(image: np.ndarray, kind: MapKind, group: GroupMaps, **fields: object) -> Tile:
    """A tile titled by ``kind``'s templates (see :class:`~mcloss.explainability.kinds.MapKind`)."""
    values = {"name": group.name, "prob": group.prob, "xi": len(group.channels), **fields}
    if group.versus is not None:
        values |= {"other": group.versus.names[0], "versus": group.versus.label(), "versus_all": group.versus.described()}
    return Tile(
        image,
        kind.title.format(**values),
        kind.caption.format(**values),
        kind.alt.format(**values),
        kind.slug.format(**values),
    )


def _group_max(group: GroupMaps, style: Style) -> float | None:
    """The maximum a group is normalized by under ``shared_scale`` (None: each map by its own)."""
    if not style.shared_scale:
        return None
    return style.group_max if style.group_max is not None else float(group.channels.max())


def channel_tile(
    view: np.ndarray, explanation: Explanation, group: GroupMaps, kind: MapKind, style: Style, i: int,
    channel_map: np.ndarray | None = None,
) -> Tile:
    """Channel ``i``'s tile (``kind``: the channels kind); ``channel_map``: that channel already warped
    onto ``view`` (default: warped here)."""
    if channel_map is None:
        channel_map = _to_view(group.channels[i], explanation, (view.shape[1], view.shape[0]), style)
    colors = part_colors(len(group.channels))
    pk = group.peaks_xy[i : i + 1] * _view_scale(view, explanation) if style.peaks else None
    img = overlay(
        view, channel_map, colormap=style.colormap, alpha=style.alpha, vmax=_group_max(group, style), peaks_xy=pk,
        contour=style.contour,
    )  # fmt: skip
    return _tile(_with_bar(img, colors[i]), kind, group, channel=i + 1, peak=f"{group.peak_values[i]:.3g}")


def ccmp_tile(view: np.ndarray, explanation: Explanation, group: GroupMaps, style: Style) -> Tile:
    """The CCMP map (the maximum over the group's channels), on the group's scale."""
    size = (view.shape[1], view.shape[0])
    ccmp = _to_view(group.ccmp, explanation, size, style)
    vmax = _group_max(group, style)  # CCMP's own max is the group's
    img = overlay(view, ccmp, colormap=style.colormap, alpha=style.alpha, vmax=vmax, contour=style.contour)
    xi = len(group.channels)
    return Tile(img, f"CCMP {group.name}", f"CCMP (max over {xi} channels)", f"CCMP of {group.name}", "ccmp")


def _parts_tile(view: np.ndarray, explanation: Explanation, group: GroupMaps, style: Style, chans: np.ndarray) -> Tile:
    """The part composite (each channel in its colour) with its legend; ``chans``: the channels on ``view``."""
    colors = part_colors(len(group.channels))
    comp = part_composite(view, chans, colors=colors, shared_scale=style.shared_scale, vmax=_group_max(group, style))
    if style.peaks:
        comp = draw_peaks(comp, group.peaks_xy * _view_scale(view, explanation), colors)
    labels = channel_labels(len(group.channels))
    legend = composite_legend(colors, labels, width=pad_to_aspect(comp).shape[1])
    return Tile(comp, "parts", "parts: each channel in its colour", f"part composite of {group.name}", "parts", legend)


def channel_group_tiles(
    view: np.ndarray, explanation: Explanation, group: GroupMaps, kind: MapKind, style: Style
) -> list[Tile]:
    """The channels kind's tiles: the ξ channel overlays, CCMP and the part composite."""
    size = (view.shape[1], view.shape[0])
    chans = np.stack([_to_view(c, explanation, size, style) for c in group.channels])
    tiles = [channel_tile(view, explanation, group, kind, style, i, chans[i]) for i in range(len(chans))]
    return [*tiles, ccmp_tile(view, explanation, group, style), _parts_tile(view, explanation, group, style, chans)]


def map_tile(view: np.ndarray, explanation: Explanation, group: GroupMaps, kind: MapKind, style: Style) -> Tile:
    """The tile of a kind with one map per target: its own scale, the diverging colormap when signed, its
    peak marked when it keeps one."""
    size = (view.shape[1], view.shape[0])
    m = group.maps[kind.name]
    warped = to_original(m, explanation.geometry, size) if kind.at_input else _to_view(m, explanation, size, style)
    if kind.signed:
        return _tile(overlay(view, warped, alpha=style.alpha, vmax=signed_scale(m), signed=True), kind, group)
    pk = None
    if style.peaks and group.map_peaks.get(kind.name) is not None:
        pk = np.asarray(group.map_peaks[kind.name])[None] * _view_scale(view, explanation)
    img = overlay(view, warped, colormap=style.colormap, alpha=style.alpha, peaks_xy=pk, contour=style.contour)
    return _tile(img, kind, group)


def per_channel_tiles(
    view: np.ndarray, explanation: Explanation, group: GroupMaps, kind: MapKind, style: Style
) -> list[Tile]:
    """The tiles of a kind with one map per channel of the group, each with its channel's colour bar; under
    ``shared_scale`` normalized by their common maximum."""
    values = group.maps[kind.name]
    size = (view.shape[1], view.shape[0])
    maps = [_to_view(c, explanation, size, style) for c in values]
    vmax = float(values.max()) if style.shared_scale else None
    colors = part_colors(len(maps))
    return [
        _tile(
            _with_bar(overlay(view, m, colormap=style.colormap, alpha=style.alpha, vmax=vmax, contour=style.contour), colors[i]),
            kind, group, channel=i + 1,
        )  # fmt: skip
        for i, m in enumerate(maps)
    ]
