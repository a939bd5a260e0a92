"""A class's defining parts beside its maps: which parts, and how much the maps prefer them (pure functions).

A checkpoint's card may say which parts define each class (``card["defining_parts"]``: class name → part
or region names, see :mod:`mcloss.data.defining`) and how much its maps preferred them on the fresh-seed
set (``card["parts"]["defining"]["per_class"][name]["mass_ratio_ccmp" | "mass_ratio_channels"]``, as
``mcloss parts`` measures them). For one image and one class's group this module works out what to show:

* with part annotations of the image (a part label map, else keypoints: every pixel within the hit
  radius of a visible keypoint belongs to the nearest one), the image's own figures: the mass ratio
  (:func:`mcloss.metrics.mass.mass_ratio`) of the CCMP map and the geometric mean of the channels'
  ratios, the maps upsampled onto the original and the regions limited to the part the network sees;
* otherwise (or when the image shows no defining part, or no other part) the card's fresh-set figures;
* and a sentence saying it, e.g. "On this image, the CCMP map of Green_Wing puts 2.3× as much mass per
  area on wing and tail as on the other parts (1× = no preference); its channels 1.8× (geometric mean)."

Nothing (None) for a card without defining parts, or a class that has none (the base bird).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mcloss.core.errors import DatasetError
from mcloss.core.transforms import Geometry
from mcloss.data.annotations import PartAnnotations
from mcloss.data.defining import defining_indices
from mcloss.explainability.geometry import crop_mask, to_original
from mcloss.metrics import mass
from mcloss.metrics.localization import DEFAULT_HIT_RADIUS, hit_radius

if TYPE_CHECKING:
    from mcloss.explainability.explanation import Explanation, GroupMaps

__all__ = [
    "SOURCE_CARD",
    "SOURCE_IMAGE",
    "DefiningSummary",
    "card_defining_parts",
    "has_defining_parts",
    "card_mass_ratios",
    "crop_regions",
    "defining_indices",
    "defining_sentence",
    "defining_summaries",
    "defining_summary",
    "format_ratio",
    "image_mass_ratios",
    "join_names",
    "part_regions",
]

#: ``DefiningSummary.source`` values (the export json's ``defining_mass_ratio.source``).
SOURCE_IMAGE = "image"
SOURCE_CARD = "fresh-set card"
_WHERE = {SOURCE_IMAGE: "On this image", SOURCE_CARD: "On the fresh-seed set"}


@dataclass(frozen=True)
class DefiningSummary:
    """What to show about one class's defining parts for one image.

    Attributes:
        class_name: the class.
        parts: its defining part (or region) names, as the card lists them.
        indices: 0-based indices of those parts in the annotations' part names (() without annotations).
        ccmp: mass per area on the defining parts ÷ on the other parts, of the CCMP map, or None.
        channels: the geometric mean of that ratio over the group's channels, or None.
        source: where the ratios come from (:data:`SOURCE_IMAGE`, :data:`SOURCE_CARD`), or None without any.
        regions: the [H, W] region map of the image (0 none, i + 1 part i, larger the object) limited to
            the network's crop, or None without annotations.
    """

    class_name: str
    parts: tuple[str, ...]
    indices: tuple[int, ...] = ()
    ccmp: float | None = None
    channels: float | None = None
    source: str | None = None
    regions: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def located(self) -> bool:
        """Whether the image's annotations say where the defining parts are."""
        return self.regions is not None and bool(self.indices)

    @property
    def sentence(self) -> str | None:
        """The ratio in words (:func:`defining_sentence`)."""
        return defining_sentence(self)

    def record(self) -> dict | None:
        """``{"ccmp", "channels", "source"}`` for the export json, or None when no ratio is known."""
        if self.source is None:
            return None
        return {"ccmp": self.ccmp, "channels": self.channels, "source": self.source}


# ------------------------------------------------------------------------------------------- wording


def format_ratio(value: float) -> str:
    """A mass ratio as ``2.3×`` (``23×`` from 10, ``0.45×`` below 1; ``≥1000×`` at the clip)."""
    v = float(value)
    if v >= mass.RATIO_CLIP * (1 - 1e-9):  # a geometric mean of clipped ratios may round just below
        return f"≥{mass.RATIO_CLIP:g}×"
    if v <= (1 + 1e-9) / mass.RATIO_CLIP:
        return f"≤{1.0 / mass.RATIO_CLIP:g}×"
    if round(v, 1) >= 10:
        return f"{v:.0f}×"
    if v >= 0.995:
        return f"{v:.1f}×"
    if v >= 0.1:
        return f"{v:.2f}×"
    return f"{v:.2g}×"


def join_names(names: Sequence[str]) -> str:
    """``["wing"]`` → ``wing``; ``["wing", "tail"]`` → ``wing and tail``; three or more with commas."""
    items = [str(n) for n in names]
    if len(items) <= 2:
        return " and ".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def defining_sentence(summary: DefiningSummary) -> str | None:
    """The summary's ratio as one sentence, saying where it was measured; None when no ratio is known."""
    if summary.source is None or (summary.ccmp is None and summary.channels is None):
        return None
    where = _WHERE.get(summary.source, f"On the {summary.source}")
    parts = join_names(summary.parts)
    tail = "as on the other parts (1× = no preference)"
    if summary.ccmp is None:
        return (
            f"{where}, the channels of {summary.class_name} put {format_ratio(summary.channels)} as much mass per area "
            f"on {parts} {tail} (geometric mean)."
        )
    text = f"{where}, the CCMP map of {summary.class_name} puts {format_ratio(summary.ccmp)} as much mass per area on {parts} {tail}"
    if summary.channels is not None:
        text += f"; its channels {format_ratio(summary.channels)} (geometric mean)"
    return text + "."


# ------------------------------------------------------------------------------------------- the card


def has_defining_parts(card: Mapping[str, Any] | None) -> bool:
    """Whether a card records its classes' defining parts (``card["defining_parts"]``)."""
    return isinstance(card, Mapping) and isinstance(card.get("defining_parts"), Mapping)


def card_defining_parts(card: Mapping[str, Any] | None, class_name: str) -> list[str] | None:
    """The defining parts a card lists for a class; None when the card does not know its classes' parts."""
    if not has_defining_parts(card):
        return None
    parts = card["defining_parts"].get(class_name)
    if not isinstance(parts, (list, tuple)):
        return []
    return [str(p) for p in parts]


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def card_mass_ratios(card: Mapping[str, Any] | None, class_name: str) -> tuple[float | None, float | None]:
    """(CCMP, channels) fresh-set mass ratios a card records for a class (None where it records none)."""
    entry: Any = card
    for key in ("parts", "defining", "per_class", class_name):
        entry = entry.get(key) if isinstance(entry, Mapping) else None
    if not isinstance(entry, Mapping):
        return None, None
    return _finite(entry.get("mass_ratio_ccmp")), _finite(entry.get("mass_ratio_channels"))


# ------------------------------------------------------------------------------------------- the image


def part_regions(annotations: PartAnnotations, geometry: Geometry, radius: float = DEFAULT_HIT_RADIUS) -> np.ndarray | None:
    """The image's [H, W] region map limited to the network's crop; None when the annotations place no part.

    From the label map when there is one, else from the visible keypoints within ``radius × max(W, H)``.

    Raises:
        DatasetError: the label map is not the image's size.
    """
    w, h = geometry.original
    return crop_regions(annotations.labels, annotations.keypoints, geometry, hit_radius(w, h, radius))


def crop_regions(
    labels: np.ndarray | None, keypoints: np.ndarray | None, geometry: Geometry, radius_px: float
) -> np.ndarray | None:
    """[H, W] region map from a part label map, else from keypoints within ``radius_px``, limited to the crop.

    None when there is neither a label map nor any keypoint. Shared by :func:`part_regions` and
    ``mcloss parts``.

    Raises:
        DatasetError: the label map is not the image's size.
    """
    w, h = geometry.original
    if labels is not None:
        regions = np.asarray(labels).astype(np.int32)
        if regions.shape != (h, w):
            raise DatasetError(f"part label map is {regions.shape[1]}×{regions.shape[0]}, the image {w}×{h}")
    elif keypoints is not None and len(keypoints):
        regions = mass.keypoint_regions(keypoints, (w, h), radius_px)
    else:
        return None
    return np.where(crop_mask(geometry), regions, 0)


def image_mass_ratios(
    group: GroupMaps, geometry: Geometry, regions: np.ndarray, indices: Sequence[int], num_parts: int
) -> tuple[float | None, float | None]:
    """(CCMP ratio, geometric mean of the channels' ratios) on one image; None where undefined."""
    ccmp = mass.mass_ratio(to_original(group.ccmp, geometry), regions, indices, num_parts)
    per_channel = [mass.mass_ratio(to_original(c, geometry), regions, indices, num_parts) for c in group.channels]
    return _finite(ccmp), _finite(mass.geometric_mean(per_channel))


def defining_summary(
    card: Mapping[str, Any] | None,
    group: GroupMaps,
    geometry: Geometry,
    annotations: PartAnnotations | None = None,
    *,
    radius: float = DEFAULT_HIT_RADIUS,
) -> DefiningSummary | None:
    """What to show about ``group``'s class: its defining parts and the image's (else the card's) ratios.

    Args:
        card: the model's card.
        group: the class's maps on the image.
        geometry: the image's geometry.
        annotations: where the image's parts are, if known.
        radius: keypoint hit radius (fraction of max(W, H)) for regions from keypoints.

    Returns:
        None when the card lists no defining parts for the class.
    """
    parts = card_defining_parts(card, group.name)
    if not parts:
        return None
    indices: tuple[int, ...] = ()
    regions = None
    ccmp = channels = None
    if annotations is not None:
        regions = part_regions(annotations, geometry, radius)
        indices = tuple(defining_indices(parts, annotations.part_names))
        if regions is not None and indices:
            ccmp, channels = image_mass_ratios(group, geometry, regions, indices, len(annotations.part_names))
    source = SOURCE_IMAGE if ccmp is not None or channels is not None else None
    if source is None:
        ccmp, channels = card_mass_ratios(card, group.name)
        source = SOURCE_CARD if ccmp is not None or channels is not None else None
    return DefiningSummary(group.name, tuple(parts), indices, ccmp, channels, source, regions)


def defining_summaries(
    card: Mapping[str, Any] | None,
    explanation: Explanation,
    annotations: PartAnnotations | None = None,
    *,
    radius: float = DEFAULT_HIT_RADIUS,
) -> list[DefiningSummary | None]:
    """:func:`defining_summary` of each target of an explanation, in rank order."""
    if not has_defining_parts(card):
        return [None] * len(explanation.groups)
    return [defining_summary(card, g, explanation.geometry, annotations, radius=radius) for g in explanation.groups]
