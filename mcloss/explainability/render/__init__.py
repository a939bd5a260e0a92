"""Pure rendering of maps: arrays in, arrays out (RGB uint8 images, float maps), in four parts.

- :mod:`~mcloss.explainability.render.colour`: colormaps, normalization, overlays, peaks, the part composite.
- :mod:`~mcloss.explainability.render.layout` and :mod:`~mcloss.explainability.render.text`: tile sizes,
  letterboxing, views and thumbnails; titles, labels and legends.
- :mod:`~mcloss.explainability.render.tiles` and :mod:`~mcloss.explainability.render.compose`: the tiles
  of one target and the montage rows the app, the export and the figures share (one rendering path).
- :mod:`~mcloss.explainability.render.figure`: the montage as a matplotlib Figure.
- :mod:`~mcloss.explainability.render.annotations`: ground-truth keypoints and a class's defining parts.

Conventions: images are RGB uint8 [H, W, 3]; ``alpha`` is the heatmap's opacity (0 = image only); the
default colormap is :data:`DEFAULT_COLORMAP` (``viridis``, ``jet`` and any matplotlib name work); signed
maps use the diverging :data:`DIVERGING` centred on 0. Maps are normalized for display only, each by its
own maximum or, with ``Style.shared_scale``, a whole channel group by one maximum. OpenCV resizes and draws
on RGB arrays (colours are RGB tuples); nothing here converts to BGR: the one encoder,
:func:`mcloss.data.io.encode_image`, does that.

Every public name of the parts is importable from here (``render.Style``); the parts are loaded on first use.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

_PARTS = ("colour", "layout", "text", "tiles", "compose", "figure", "annotations")


@functools.cache
def _exports() -> dict[str, str]:
    """public name → the part that defines it (read from each part's ``__all__``)."""
    table = {}
    for part in _PARTS:
        module = importlib.import_module(f"{__name__}.{part}")
        table.update(dict.fromkeys(module.__all__, module.__name__))
    return table


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    if name in _PARTS:
        return importlib.import_module(f"{__name__}.{name}")
    module = _exports().get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_exports()))


if TYPE_CHECKING:  # for type checkers and IDEs; nothing is imported at run time
    from mcloss.explainability.render.annotations import *  # noqa: F403
    from mcloss.explainability.render.colour import *  # noqa: F403
    from mcloss.explainability.render.compose import *  # noqa: F403
    from mcloss.explainability.render.figure import *  # noqa: F403
    from mcloss.explainability.render.layout import *  # noqa: F403
    from mcloss.explainability.render.text import *  # noqa: F403
    from mcloss.explainability.render.tiles import *  # noqa: F403
