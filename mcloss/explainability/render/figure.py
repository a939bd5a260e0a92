"""The montage as a matplotlib Figure, for reports (no pyplot state is touched)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mcloss.explainability.render.compose import explanation_tile_height, header_text, montage_tiles
from mcloss.explainability.render.layout import fit_width
from mcloss.explainability.render.tiles import Style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mcloss.explainability.explanation import Explanation

__all__ = ["explanation_figure"]


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
        img = tile.image if tile.footer is None else np.concatenate([tile.image, fit_width(tile.footer, tile.image.shape[1])])
        ax.imshow(img)
        ax.set_title(tile.title, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(header_text(explanation, explanation.groups[group]), fontsize=9)
    fig.tight_layout()
    return fig
