"""Maps on the network-input grid, mapped back onto the original image through the eval transform.

Undoing the eval resize and crop is one affine warp; pixels outside the crop are 0. Feature cell j is
centred at input pixel (j + 0.5)·crop/h; pixel i covers [i, i+1).
"""

from __future__ import annotations

import cv2
import numpy as np

from mcloss.core.errors import ParameterError
from mcloss.core.transforms import Geometry

__all__ = ["INTERPOLATIONS", "channel_peaks", "crop_mask", "to_original", "view_to_map_affine"]

#: Upsampling of maps onto the image: smooth, or the feature cells as blocks.
INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


def crop_mask(geometry: Geometry, size: tuple[int, int] | None = None) -> np.ndarray:
    """[H, W] bool: the pixels of the original (or of it resized to ``size`` = (W, H)) the network saw."""
    w0, h0 = geometry.original
    w, h = size or (w0, h0)
    sx, sy = geometry.scale
    left, top, cw, ch = geometry.crop
    xs = ((np.arange(w) + 0.5) * (w0 / w)) * sx - left
    ys = ((np.arange(h) + 0.5) * (h0 / h)) * sy - top
    return ((ys >= 0) & (ys < ch))[:, None] & ((xs >= 0) & (xs < cw))[None, :]


def to_original(
    map_hw: np.ndarray,
    geometry: Geometry,
    size: tuple[int, int] | None = None,
    *,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Upsample a map on the input grid (feature or input resolution) onto the original image.

    Undoes the eval transform's crop and resize with one ``cv2.warpAffine`` (``WARP_INVERSE_MAP``);
    pixels outside the crop are 0.

    Args:
        map_hw: [h, w] map covering the network input (the crop).
        geometry: the image's geometry.
        size: output (W, H) for a resized view of the original (e.g. a thumbnail); default the original.
        interpolation: ``"bilinear"`` (the convention), or ``"nearest"`` to show the feature cells as blocks
            (cell j is centred on index j, so rounding picks the cell a pixel lies in).

    Returns:
        [H, W] float32.
    """
    if interpolation not in INTERPOLATIONS:
        raise ParameterError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}", parameter="interpolation")
    src = np.ascontiguousarray(np.asarray(map_hw, dtype=np.float32))
    if src.ndim != 2:
        raise ParameterError(f"map_hw: expected a 2-D map, got shape {src.shape}", parameter="map_hw")
    w, h = size or geometry.original
    m = view_to_map_affine(geometry, src.shape, (w, h))
    warped = cv2.warpAffine(
        src, m, (int(w), int(h)), flags=INTERPOLATIONS[interpolation] | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
    )
    warped[~crop_mask(geometry, (w, h))] = 0.0
    return warped


def view_to_map_affine(geometry: Geometry, map_hw: tuple[int, int], size: tuple[int, int] | None = None) -> np.ndarray:
    """The 2×3 affine taking pixel indices of the original (or of it resized to ``size`` = (W, H)) to indices
    of a map of shape ``map_hw`` on the input grid: what :func:`to_original` warps through (axis-aligned)."""
    w0, h0 = geometry.original
    w, h = size or (w0, h0)
    affine = geometry.original_to_feature_affine(map_hw)
    # output pixel u → original pixel (u + 0.5)·w0/w − 0.5, then the original→feature affine.
    kx, ky = w0 / w, h0 / h
    out_to_orig = np.array([[kx, 0.0, 0.5 * kx - 0.5], [0.0, ky, 0.5 * ky - 0.5], [0.0, 0.0, 1.0]])
    return affine @ out_to_orig


def channel_peaks(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax cell of each map: [N, h, w] → ((x, y) int [N, 2], values float32 [N]). Ties: first in row order."""
    n, _, w = maps.shape
    flat = maps.reshape(n, -1)
    idx = flat.argmax(axis=1)
    xy = np.stack([idx % w, idx // w], axis=1).astype(np.int64)
    return xy, flat[np.arange(n), idx].astype(np.float32)


