"""Ground truth on the image: keypoints with their part names, and a class's defining parts outlined and
named (the app's pictures; the same conventions as the tiles)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from mcloss.explainability.defining import join_names
from mcloss.explainability.render.text import halo_label, legend_strip

__all__ = ["DEFINING_RGB", "OTHER_PART_RGB", "SHARED_RGB", "draw_defining_parts", "draw_keypoints", "draw_part_sets"]


#: Outline of a class's defining parts in the defining-parts picture.
DEFINING_RGB = (255, 176, 0)
#: Outline of the other parts.
OTHER_PART_RGB = (96, 96, 96)
#: The outline of the parts two classes share, beside the :data:`DEFINING_RGB` parts that tell them apart.
SHARED_RGB = (64, 170, 255)


def draw_keypoints(
    image: np.ndarray, keypoints_xy: np.ndarray, visible: np.ndarray, names: Sequence[str], *, min_side: int = 640
) -> np.ndarray:
    """Ground-truth keypoints as white-ringed dots with their part name, on a new image.

    Images shorter than ``min_side`` are first enlarged by an integer factor (bicubic) so the labels stay
    legible; ``keypoints_xy`` are in the pixels of ``image`` (pixel i covers [i, i+1)); each dot is drawn
    on the pixel containing its point, as :func:`mcloss.explainability.render.draw_peaks` does. A name goes
    beside its dot (right, left, above or below) where it stays inside the image and covers the fewest other
    dots and names.
    """
    out = np.ascontiguousarray(image)
    factor = max(1, int(np.ceil(min_side / max(1, min(out.shape[:2])))))
    if factor > 1:
        out = cv2.resize(out, (out.shape[1] * factor, out.shape[0] * factor), interpolation=cv2.INTER_CUBIC)
    else:
        out = out.copy()
    r = max(4, min(out.shape[:2]) // 100)
    scale = max(0.45, min(out.shape[:2]) / 800.0)
    pts = np.asarray(keypoints_xy, dtype=np.float64).reshape(-1, 2) * factor
    shown = [
        ((int(np.floor(x)), int(np.floor(y))), name) for (x, y), vis, name in zip(pts, visible, names, strict=True) if vis
    ]
    busy = np.zeros(out.shape[:2], bool)  # the dots, then each name placed: later names keep off them
    for (x, y), _ in shown:
        cv2.circle(out, (x, y), r + 2, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(out, (x, y), r, (20, 20, 20), -1, cv2.LINE_AA)
        busy[max(0, y - r - 2) : y + r + 3, max(0, x - r - 2) : x + r + 3] = True
    nothing = np.zeros_like(busy)
    for (x, y), name in shown:
        if name:
            halo_label(out, name, (x - r - 2, y - r - 2, x + r + 3, y + r + 3), busy, nothing, scale, 3)
    return out


def _resample_regions(regions: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A region map (original pixels) at another size, nearest pixel centre (labels never blend)."""
    h0, w0 = regions.shape
    h, w = shape
    ys = np.minimum(((np.arange(h) + 0.5) * h0 / h).astype(np.int64), h0 - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * w0 / w).astype(np.int64), w0 - 1)
    return regions[ys[:, None], xs[None, :]]


def draw_defining_parts(
    image: np.ndarray,
    regions: np.ndarray,
    defining: Sequence[int],
    part_names: Sequence[str],
    keypoints: np.ndarray | None = None,
    *,
    min_side: int = 640,
) -> np.ndarray:
    """A class's defining parts on the image: in full colour and outlined (:data:`DEFINING_RGB`) and named,
    the other parts outlined thinly (:data:`OTHER_PART_RGB`), everything else faded; a legend below.

    Args:
        image: RGB uint8 view of the original (any size, same aspect ratio).
        regions: [H, W] region map in original pixels (0 none, i + 1 part i, larger the object).
        defining: 0-based indices of the defining parts.
        part_names: the parts' names.
        keypoints: [P, 3] (x, y, visible) in original pixels: the defining ones are dotted (regions from
            keypoints are rings around them); None with a label map.
        min_side: images shorter than this are first enlarged by an integer factor (as :func:`draw_keypoints`).
    """
    return draw_part_sets(image, regions, [("defining", defining, DEFINING_RGB)], part_names, keypoints, min_side=min_side)


def draw_part_sets(
    image: np.ndarray,
    regions: np.ndarray,
    sets: Sequence[tuple[str, Sequence[int], tuple[int, int, int]]],
    part_names: Sequence[str],
    keypoints: np.ndarray | None = None,
    *,
    min_side: int = 640,
) -> np.ndarray:
    """Sets of parts on the image (e.g. the parts that tell two classes apart and the parts they share), as
    :func:`draw_defining_parts` draws one: each set's parts in full colour, outlined in the set's colour and
    named, the other parts outlined thinly, everything else faded; a legend below with one entry per set
    (``"<label>: <its visible parts>"``).

    Args:
        sets: (label, 0-based part indices, RGB outline colour) per set; a part in two sets is drawn in the first.
        image, regions, part_names, keypoints, min_side: as for :func:`draw_defining_parts`.
    """
    img = np.ascontiguousarray(image)
    factor = max(1, int(np.ceil(min_side / max(1, min(img.shape[:2])))))
    if factor > 1:
        img = cv2.resize(img, (img.shape[1] * factor, img.shape[0] * factor), interpolation=cv2.INTER_CUBIC)
    h, w = img.shape[:2]
    num_parts = len(part_names)
    reg = _resample_regions(np.asarray(regions), (h, w))
    on_part = (reg >= 1) & (reg <= num_parts)
    taken: set[int] = set()
    chosen = []  # (label, its parts, colour), each part in the first set that names it
    for label, indices, rgb in sets:
        mine = sorted({int(d) for d in indices if 0 <= int(d) < num_parts} - taken)
        taken |= set(mine)
        chosen.append((label, mine, rgb))
    wanted = sorted(taken)
    is_def = on_part & np.isin(reg - 1, wanted)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)[..., None]
    keep = np.where(reg > 0, 0.6, 0.35)[..., None]  # the object stays more visible than the background
    faded = keep * (0.5 * grey + 0.5 * img.astype(np.float32)) + (1.0 - keep) * 255.0
    out = np.where(is_def[..., None], img.astype(np.float32), faded)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)

    side = min(h, w)
    thick = max(2, side // 150)
    scale = max(0.55, side / 640.0)
    for p in range(num_parts):
        mask = (reg == p + 1).astype(np.uint8)
        if not mask.any() or p in taken:
            continue
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, OTHER_PART_RGB, max(1, thick // 2), cv2.LINE_AA)
    anchors: list[tuple[int, tuple[int, int, int, int]]] = []
    entries = []
    hidden: list[str] = []
    for label, mine, rgb in chosen:
        shown = []
        for p in mine:
            mask = (reg == p + 1).astype(np.uint8)
            if not mask.any():
                hidden.append(part_names[p])
                continue
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, contours, -1, (40, 40, 40), thick + 2, cv2.LINE_AA)
            cv2.drawContours(out, contours, -1, rgb, thick, cv2.LINE_AA)
            ys, xs = np.nonzero(mask)
            if keypoints is not None and p < len(keypoints) and keypoints[p][2] > 0:
                k = (w / regions.shape[1], h / regions.shape[0])
                c = (int(np.floor(keypoints[p][0] * k[0])), int(np.floor(keypoints[p][1] * k[1])))
                r = max(4, side // 100)
                cv2.circle(out, c, r + 2, (255, 255, 255), -1, cv2.LINE_AA)  # as draw_keypoints dots them
                cv2.circle(out, c, r, (20, 20, 20), -1, cv2.LINE_AA)
            anchors.append((p, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))))
            shown.append(part_names[p])
        entries.append((f"{label}: {join_names(shown)}" if shown else f"{label}: not visible here", rgb, True))
    busy = reg > 0
    for p, box in anchors:
        halo_label(out, part_names[p], box, busy, is_def, scale, thick + 4)
    if hidden:
        entries.append((f"not visible: {join_names(hidden)}", (200, 200, 200), True))
    if (on_part & ~is_def).any():
        entries.append(("other parts", OTHER_PART_RGB, False))
    return np.concatenate([out, legend_strip(w, scale, entries)], axis=0)
