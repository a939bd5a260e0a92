"""Part-localization and faithfulness metrics: pure functions on numpy arrays.

Conventions (shared with ``mcloss parts``):

* Points and keypoints are (x, y) in original-image pixels; keypoints are [P, 3] rows (x, y, visible).
* The hit radius is ``radius × image size``, where the image size is, by default, ``max(width, height)``
  of the original image (``size_reference``: ``"max"``, ``"sqrt-area"`` = √(w·h) or ``"diagonal"``).
  A point hits when its distance to its nearest *visible* keypoint is ≤ that radius (inclusive).
* Part index ``-1`` means "no part": the point has no visible keypoint to compare with, or there is no point.
* Top-k% masks keep the pixels whose value is ≥ the k-th largest value (ties at the threshold are all kept,
  so the mask never depends on pixel order) and strictly positive (a ReLU'd map that is 0 there sees nothing).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from mcloss.core.errors import ParameterError

__all__ = [
    "DEFAULT_HIT_RADIUS",
    "SIZE_REFERENCES",
    "image_size_reference",
    "hit_radius",
    "nearest_keypoints",
    "hit_mask",
    "hit_rate",
    "distinct_parts",
    "topk_mask",
    "mask_iou",
    "mean_pairwise_iou",
    "channel_part_matrix",
    "normalize_rows",
    "part_histogram",
    "random_points",
    "trapezoid_auc",
    "step_fractions",
    "step_counts",
    "saliency_rank",
    "perturbation_masks",
]

#: The hit radius every command, the app and the library default to, as a fraction of the image size.
DEFAULT_HIT_RADIUS = 0.12
#: Accepted definitions of "image size" for the hit radius.
SIZE_REFERENCES = ("max", "sqrt-area", "diagonal")


def image_size_reference(width: float, height: float, reference: str = "max") -> float:
    """The image size that the hit radius is a fraction of.

    Args:
        width, height: original image size in pixels.
        reference: ``"max"`` = max(w, h) (default), ``"sqrt-area"`` = √(w·h), ``"diagonal"`` = √(w² + h²).
    """
    if width <= 0 or height <= 0:
        raise ParameterError(f"image size must be positive, got {width}×{height}")
    if reference == "max":
        return float(max(width, height))
    if reference == "sqrt-area":
        return math.sqrt(float(width) * float(height))
    if reference == "diagonal":
        return math.hypot(float(width), float(height))
    raise ParameterError(f"size reference must be one of {', '.join(SIZE_REFERENCES)}, got {reference!r}", parameter="reference")


def hit_radius(width: float, height: float, radius: float, reference: str = "max") -> float:
    """The hit radius in pixels: ``radius × image_size_reference(width, height, reference)``."""
    if not radius > 0:
        raise ParameterError(f"radius must be > 0, got {radius}", parameter="radius")
    return float(radius) * image_size_reference(width, height, reference)


def nearest_keypoints(points: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest visible keypoint of each point.

    Args:
        points: [N, 2] (x, y); rows with a NaN coordinate are "no point".
        keypoints: [P, 3] (x, y, visible); rows with visible == 0 are ignored.

    Returns:
        (part [N] int, distance [N] float): the keypoint row index (−1 when there is no visible keypoint or
        no point) and the Euclidean distance (inf then). Ties go to the lower part index.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    kps = np.asarray(keypoints, dtype=np.float64).reshape(-1, 3)
    part = np.full(len(pts), -1, dtype=np.int64)
    dist = np.full(len(pts), np.inf, dtype=np.float64)
    visible = np.flatnonzero(kps[:, 2] > 0)
    valid = ~np.isnan(pts).any(axis=1)
    if visible.size == 0 or not valid.any():
        return part, dist
    diff = pts[valid, None, :] - kps[None, visible, :2]
    d = np.hypot(diff[..., 0], diff[..., 1])  # [Nvalid, Pvisible]
    best = np.argmin(d, axis=1)
    part[valid] = visible[best]
    dist[valid] = d[np.arange(len(best)), best]
    return part, dist


def hit_mask(distances: np.ndarray, radius_px: float) -> np.ndarray:
    """[N] bool: distance ≤ radius_px (inf never hits)."""
    return np.asarray(distances, dtype=np.float64) <= float(radius_px)


def hit_rate(hits: np.ndarray) -> float:
    """Fraction of True in ``hits``; NaN for an empty array."""
    h = np.asarray(hits, dtype=bool).ravel()
    return float(h.mean()) if h.size else float("nan")


def distinct_parts(parts: np.ndarray, hits: np.ndarray) -> int:
    """Number of distinct parts among the points that hit (0 when none does)."""
    p = np.asarray(parts).ravel()
    h = np.asarray(hits, dtype=bool).ravel()
    return int(np.unique(p[h & (p >= 0)]).size)


def separated_parts(parts: np.ndarray, hits: np.ndarray, keypoints: np.ndarray, radius: float) -> int:
    """Number of distinct hit parts, counting parts whose hit disks overlap as one location.

    Two parts are one location when their keypoints are less than ``2 * radius`` apart (some point hits
    both); locations are the connected components of that relation among the hit parts. On birds this
    merges, e.g., head, crest and beak, which a peak between them can "hit" interchangeably, so a group
    that only spreads over the head scores 1 here while :func:`distinct_parts` gives up to 3.

    Args:
        parts: [n] nearest part index per point (−1 = none).
        hits: [n] whether each point hit its part.
        keypoints: [P, 3] (x, y, visible) in the same pixels as ``radius``.
        radius: the hit radius.
    """
    p = np.asarray(parts).ravel()
    hit = sorted({int(i) for i in p[np.asarray(hits, dtype=bool).ravel() & (p >= 0)]})
    if not hit:
        return 0
    xy = np.asarray(keypoints, dtype=np.float64)[hit, :2]
    near = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1)) < 2.0 * radius
    label = list(range(len(hit)))
    for i in range(len(hit)):  # union-find over the (tiny) set of hit parts
        for j in range(i + 1, len(hit)):
            if near[i, j]:
                a, b = label[i], label[j]
                label = [a if x == b else x for x in label]
    return len(set(label))


def topk_mask(values: np.ndarray, percent: float) -> np.ndarray:
    """Binary mask of a map's top ``percent`` % pixels.

    k = ceil(percent/100 · size), at least 1. Pixels ≥ the k-th largest value are kept (ties included) if
    they are also > 0.
    """
    v = np.asarray(values, dtype=np.float64)
    if not 0 < percent <= 100:
        raise ParameterError(f"top-k percent must be in (0, 100], got {percent}", parameter="percent")
    if v.size == 0:
        return np.zeros(v.shape, dtype=bool)
    k = max(1, math.ceil(percent / 100.0 * v.size - 1e-9))
    threshold = np.partition(v.ravel(), v.size - k)[v.size - k]
    return (v >= threshold) & (v > 0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; NaN when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    union = int(np.logical_or(a, b).sum())
    if union == 0:
        return float("nan")
    return int(np.logical_and(a, b).sum()) / union


def mean_pairwise_iou(masks: np.ndarray) -> float:
    """Mean IoU over all unordered pairs of masks [N, h, w]; pairs of two empty masks are left out.

    Returns NaN with fewer than two masks or when every pair is empty.
    """
    m = np.asarray(masks, dtype=bool)
    values = [mask_iou(m[i], m[j]) for i in range(len(m)) for j in range(i + 1, len(m))]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def channel_part_matrix(assignments: Iterable[np.ndarray], num_parts: int, num_channels: int | None = None) -> np.ndarray:
    """Count, for each channel index within a group, how often each part was its nearest part.

    Args:
        assignments: one [ξ_i] int array per image (part index per channel, −1 = none, not counted).
        num_parts: P.
        num_channels: rows of the result (default: the longest assignment).

    Returns:
        [ξ, P] int64 counts.
    """
    rows = [np.asarray(a, dtype=np.int64).ravel() for a in assignments]
    xi = num_channels if num_channels is not None else max((len(r) for r in rows), default=0)
    matrix = np.zeros((xi, num_parts), dtype=np.int64)
    for r in rows:
        if len(r) > xi:
            raise ParameterError(f"assignment of {len(r)} channels for a {xi}-row matrix")
        if r.size and r.max() >= num_parts:
            raise ParameterError(f"part index {int(r.max())} out of range for {num_parts} parts")
        ch = np.flatnonzero(r >= 0)
        np.add.at(matrix, (ch, r[ch]), 1)
    return matrix


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1 (float64); all-zero rows stay zero."""
    m = np.asarray(matrix, dtype=np.float64)
    sums = m.sum(axis=1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def part_histogram(parts: np.ndarray, num_parts: int) -> np.ndarray:
    """[P] int64 counts of part indices (−1 not counted)."""
    p = np.asarray(parts, dtype=np.int64).ravel()
    return np.bincount(p[p >= 0], minlength=num_parts)[:num_parts].astype(np.int64)


def random_points(rng: np.random.Generator, count: int, box: Sequence[float]) -> np.ndarray:
    """[count, 2] points uniform in the box (x0, y0, x1, y1), i.e. x ∈ [x0, x1), y ∈ [y0, y1)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ParameterError(f"empty box {tuple(box)}")
    u = rng.random((int(count), 2))
    return np.stack([x0 + u[:, 0] * (x1 - x0), y0 + u[:, 1] * (y1 - y0)], axis=1)


def trapezoid_auc(values: np.ndarray, fractions: np.ndarray | None = None) -> float:
    """Area under a curve by the trapezoid rule; ``fractions`` defaults to evenly spaced on [0, 1]."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < 2:
        raise ParameterError("a curve needs at least two points")
    f = np.linspace(0.0, 1.0, v.size) if fractions is None else np.asarray(fractions, dtype=np.float64).ravel()
    if f.shape != v.shape:
        raise ParameterError(f"{f.size} fractions for {v.size} values")
    return float(np.sum((v[1:] + v[:-1]) * np.diff(f)) / 2.0)


def step_fractions(steps: int) -> np.ndarray:
    """[steps + 1] fractions 0, 1/steps, …, 1."""
    if steps < 1:
        raise ParameterError(f"steps must be >= 1, got {steps}", parameter="steps")
    return np.linspace(0.0, 1.0, int(steps) + 1)


def step_counts(num_pixels: int, steps: int) -> np.ndarray:
    """[steps + 1] pixel counts round(fraction · num_pixels), from 0 to num_pixels."""
    return np.rint(step_fractions(steps) * int(num_pixels)).astype(np.int64)


def saliency_rank(saliency: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Rank of every pixel by decreasing saliency (0 = most salient), same shape as ``saliency``.

    Ties are broken by a random permutation from ``rng`` (by flat index when None), so flat regions of a map
    are perturbed in no particular spatial order.
    """
    s = np.asarray(saliency, dtype=np.float64)
    flat = s.ravel()
    if np.isnan(flat).any():
        raise ParameterError("saliency map contains NaN")
    tiebreak = rng.permutation(flat.size) if rng is not None else np.arange(flat.size)
    order = np.lexsort((tiebreak, -flat))
    rank = np.empty(flat.size, dtype=np.int64)
    rank[order] = np.arange(flat.size)
    return rank.reshape(s.shape)


def perturbation_masks(rank: np.ndarray, steps: int) -> np.ndarray:
    """[steps + 1, *rank.shape] bool: at step i, the round(i/steps · N) most salient pixels are True."""
    r = np.asarray(rank)
    counts = step_counts(r.size, steps)
    return r[None, ...] < counts.reshape((-1,) + (1,) * r.ndim)
