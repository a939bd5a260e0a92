"""Where a map's mass lies against part regions: defining-part metrics, pure functions on numpy arrays.

Conventions (shared with ``mcloss parts``):

* A *region map* is an [H, W] integer array over the original image: 0 = no part, ``i + 1`` = part ``i``
  (0-based in the dataset's part order), and any larger value (the synth ``body`` label) = the object
  outside every part. It comes from the dataset's part masks when it has them, otherwise from the
  keypoints: every pixel within the hit radius of a visible keypoint belongs to the nearest one
  (:func:`keypoint_regions`).
* A map's *mass* is its non-negative part (maps are ReLU outputs, Grad-CAM is ReLU'd, the random map is
  uniform noise in [0, 1)); it is never shifted or rescaled, so a map's floor counts as mass.
* The *defining parts* of a class are given as 0-based part indices. The *other parts* are the remaining
  parts that have area in the region map (visible), not the body or the background.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from mcloss.core.errors import ParameterError

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "CI_LEVEL",
    "RATIO_CLIP",
    "paired",
    "paired_quotient",
    "keypoint_regions",
    "region_areas",
    "mass_ratio",
    "geometric_mean",
    "geometric_mean_ci",
    "peak_region",
    "defining_chance",
    "energy_shares",
    "rank_accuracy",
]

#: Mass ratios are clipped to [1 / RATIO_CLIP, RATIO_CLIP] so that one map with no mass on one side
#: cannot dominate a geometric mean.
RATIO_CLIP = 1000.0


def keypoint_regions(keypoints: np.ndarray, size: tuple[int, int], radius_px: float) -> np.ndarray:
    """[H, W] region map from keypoints: the nearest visible keypoint within ``radius_px`` (+1), else 0.

    Args:
        keypoints: [P, 3] (x, y, visible) in original pixels (pixel i covers [i, i + 1)).
        size: (width, height) of the original image.
        radius_px: the hit radius in pixels.
    """
    w, h = int(size[0]), int(size[1])
    kp = np.asarray(keypoints, dtype=np.float64).reshape(-1, 3)
    out = np.zeros((h, w), np.int32)
    visible = np.flatnonzero(kp[:, 2] > 0) if len(kp) else np.zeros(0, np.int64)
    if not visible.size:
        return out
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    dist = np.stack([np.hypot(xx - kp[i, 0], yy - kp[i, 1]) for i in visible])
    nearest = dist.argmin(0)
    inside = dist.min(0) <= radius_px
    out[inside] = visible[nearest[inside]] + 1
    return out


def region_areas(regions: np.ndarray, num_parts: int) -> np.ndarray:
    """[num_parts] pixel count of each part in a region map."""
    counts = np.bincount(np.asarray(regions).ravel().clip(0, num_parts + 1), minlength=num_parts + 2)
    return counts[1 : num_parts + 1].astype(np.float64)


def _part_mass(values: np.ndarray, regions: np.ndarray, num_parts: int) -> np.ndarray:
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, None).ravel()
    labels = np.asarray(regions).ravel().clip(0, num_parts + 1)
    return np.bincount(labels, weights=v, minlength=num_parts + 2)[1 : num_parts + 1]


def mass_ratio(
    values: np.ndarray,
    regions: np.ndarray,
    defining: Sequence[int],
    num_parts: int,
    others: Sequence[int] | None = None,
) -> float:
    """Mass per area on the defining parts ÷ mass per area on the other visible parts (or on ``others``).

    1.0 means no preference. NaN when no defining part or no other part is visible, or the map has no
    mass on those parts at all; otherwise clipped to [1 / RATIO_CLIP, RATIO_CLIP].

    Args:
        values: [H, W] map on the original image (same shape as ``regions``).
        regions: [H, W] region map (see the module docstring).
        defining: 0-based indices of the defining parts.
        num_parts: number of parts P.
        others: 0-based indices of the parts to compare with (default: every part not in ``defining``),
            e.g. the parts two classes share, against the parts that tell them apart.
    """
    if np.shape(values) != np.shape(regions):
        raise ParameterError(f"map {np.shape(values)} and region map {np.shape(regions)} differ in shape")
    area = region_areas(regions, num_parts)
    mass = _part_mass(values, regions, num_parts)
    is_def = np.zeros(num_parts, bool)
    is_def[[d for d in defining if 0 <= d < num_parts]] = True
    is_other = ~is_def
    if others is not None:
        is_other = np.zeros(num_parts, bool)
        is_other[[o for o in others if 0 <= o < num_parts]] = True
    def_area, other_area = area[is_def].sum(), area[is_other].sum()
    if def_area == 0 or other_area == 0 or mass[is_def | is_other].sum() <= 0:
        return float("nan")
    def_density, other_density = mass[is_def].sum() / def_area, mass[is_other].sum() / other_area
    if other_density <= 0:
        return RATIO_CLIP
    return float(np.clip(def_density / other_density, 1.0 / RATIO_CLIP, RATIO_CLIP))


def _finite_positive(values: Iterable[float]) -> np.ndarray:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return v[np.isfinite(v) & (v > 0)]


def geometric_mean(values: Iterable[float]) -> float:
    """Geometric mean of the finite positive values (NaN when there are none)."""
    v = _finite_positive(values)
    return float(np.exp(np.log(v).mean())) if v.size else float("nan")


def paired(per_image: Sequence[Iterable[float]], versus: Sequence[Iterable[float]]) -> tuple[list[list[float]], list[list[float]]]:
    """Two maps' values over the same images, kept where both have a finite positive value (an image where one
    map has none, e.g. a Grad-CAM that is zero after its ReLU, drops out of both)."""
    if len(versus) != len(per_image):
        raise ParameterError(f"versus has {len(versus)} images, per_image {len(per_image)}: a paired comparison needs the same images")
    pairs = [(list(a), list(b)) for a, b in zip(per_image, versus, strict=True)]
    kept = [(a, b) for a, b in pairs if _finite_positive(a).size and _finite_positive(b).size]
    return [a for a, _ in kept], [b for _, b in kept]


def paired_quotient(per_image: Sequence[Iterable[float]], versus: Sequence[Iterable[float]]) -> float:
    """geometric_mean(per_image) ÷ geometric_mean(versus) over the images where both have values (:func:`paired`)."""
    mine, theirs = paired(per_image, versus)
    return geometric_mean(v for values in mine for v in values) / geometric_mean(v for values in theirs for v in values)


#: Bootstrap resamples of a confidence interval, and the interval's level.
BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95


def _log_sums(per_image: Sequence[Iterable[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the sum of the logs of its finite positive values, and how many there are."""
    sums, counts = [], []
    for values in per_image:
        v = _finite_positive(values)
        sums.append(float(np.log(v).sum()))
        counts.append(v.size)
    return np.asarray(sums), np.asarray(counts)


def _resampled_log_mean(sums: np.ndarray, counts: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The log of the geometric mean of each resample (a row of image indices; NaN where it holds no value)."""
    total = counts[draws].sum(axis=1)
    return np.where(total > 0, sums[draws].sum(axis=1) / np.maximum(total, 1), np.nan)


def geometric_mean_ci(
    per_image: Sequence[Iterable[float]],
    versus: Sequence[Iterable[float]] | None = None,
    *,
    level: float = CI_LEVEL,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of :func:`geometric_mean` over values grouped by image.

    Images are resampled with replacement, so an image's values (its ξ channels) move together: the interval
    reflects how much the figure depends on which images were drawn. With ``versus`` (the same images, in the
    same order, e.g. Grad-CAM's ratios), the interval is that of :func:`paired_quotient`, both geometric means
    taken over the same resample of the images where both maps have values: a paired comparison, in which what
    the two maps share about an image cancels. (NaN, NaN) when there is no value. ``seed`` fixes the resamples, so a
    report is reproducible.
    """
    if not 0 < level < 1:
        raise ParameterError(f"level must be in (0, 1), got {level}", parameter="level")
    if versus is not None:
        per_image, versus = paired(per_image, versus)
    sums, counts = _log_sums(per_image)
    if not counts.sum():
        return float("nan"), float("nan")
    draws = np.random.default_rng(seed).integers(0, len(counts), (resamples, len(counts)))
    stat = _resampled_log_mean(sums, counts, draws)
    if versus is not None:
        other_sums, other_counts = _log_sums(versus)
        stat = stat - _resampled_log_mean(other_sums, other_counts, draws)
    lo, hi = np.nanpercentile(stat, [50 * (1 - level), 50 * (1 + level)])
    return float(np.exp(lo)), float(np.exp(hi))


def peak_region(xy: Sequence[float], regions: np.ndarray) -> int:
    """The region value at point (x, y) in original pixels (0 outside the image or for a NaN point)."""
    x, y = float(xy[0]), float(xy[1])
    h, w = np.shape(regions)
    if math.isnan(x) or math.isnan(y) or not (0 <= x < w and 0 <= y < h):
        return 0
    return int(regions[int(y), int(x)])


def defining_chance(regions: np.ndarray, defining: Sequence[int], num_parts: int) -> float:
    """The chance that a point uniform over the image's visible parts lands on a defining part (NaN: no parts)."""
    area = region_areas(regions, num_parts)
    total = area.sum()
    if total == 0:
        return float("nan")
    return float(area[[d for d in defining if 0 <= d < num_parts]].sum() / total)


def energy_shares(values: np.ndarray, regions: np.ndarray, num_parts: int, silhouette: np.ndarray | None = None) -> dict:
    """The energy-based pointing game: shares of a map's mass inside the object and inside each part.

    Args:
        values: [H, W] map on the original image.
        regions: [H, W] region map from part masks.
        num_parts: number of parts P.
        silhouette: [H, W] object mask in [0, 1] (thresholded at 0.5); default: every labelled pixel.

    Returns:
        ``object`` (share inside the silhouette) and ``parts`` ([P] share inside each part); NaN when the
        map has no mass.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    total = v.sum()
    if total <= 0:
        return {"object": float("nan"), "parts": np.full(num_parts, np.nan)}
    inside = np.asarray(silhouette) >= 0.5 if silhouette is not None else np.asarray(regions) > 0
    if inside.shape != v.shape:
        raise ParameterError(f"map {v.shape} and silhouette {inside.shape} differ in shape")
    return {"object": float(v[inside].sum() / total), "parts": _part_mass(v, regions, num_parts) / total}


def rank_accuracy(values: np.ndarray, mask: np.ndarray) -> float:
    """Relevance rank accuracy: the share of the map's K highest pixels inside ``mask`` (K = its area).

    Ties at the K-th value are shared out in proportion (the expectation under random tie-breaking), so
    a constant map scores the mask's share of the image. NaN for an empty mask.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    m = np.asarray(mask, dtype=bool).ravel()
    k = int(m.sum())
    if k == 0:
        return float("nan")
    threshold = np.partition(v, v.size - k)[v.size - k]
    above = v > threshold
    tied = v == threshold
    left = k - int(above.sum())
    inside = float((above & m).sum()) + left * float((tied & m).sum()) / float(tied.sum())
    return inside / k
