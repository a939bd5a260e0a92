"""Part annotations of one image: keypoints and a part label map, from the CUB-layout dataset that holds it.

:func:`image_annotations` finds the nearest enclosing CUB-layout dataset of an image path (as
:func:`mcloss.data.cub.cub_label` does) and returns the image's part keypoints and, where the dataset has
``part_masks/``, its part label map. Each folder is looked at once per process (thread-safe); masks are
read per call.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mcloss.core.errors import DatasetError
from mcloss.data.cub import CUBDataset, CUBRecord, is_cub_layout

__all__ = ["PartAnnotations", "image_annotations", "read_label_map"]


@dataclass(frozen=True)
class PartAnnotations:
    """Where an image's parts are, in original pixels.

    Attributes:
        part_names: the dataset's part names (parts.txt order).
        keypoints: [P, 3] (x, y, visible), or None.
        labels: [H, W] part label map (0 background, i part ``part_names[i - 1]``, ``P + 1`` the object
            outside every part), or None.
    """

    part_names: tuple[str, ...]
    keypoints: np.ndarray | None = field(default=None, compare=False)
    labels: np.ndarray | None = field(default=None, compare=False)

    @property
    def empty(self) -> bool:
        """Whether neither a label map nor a visible keypoint says where a part is."""
        no_points = self.keypoints is None or not bool((np.asarray(self.keypoints).reshape(-1, 3)[:, 2] > 0).any())
        return self.labels is None and no_points


def read_label_map(path: str | os.PathLike, num_parts: int | None = None) -> np.ndarray:
    """A part label map PNG as [H, W] uint8 (8-bit single channel; labels up to ``num_parts + 1``).

    Raises:
        DatasetError: unreadable, not 8-bit single-channel, or a label above ``num_parts + 1``.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise DatasetError(f"{path}: part mask must be an 8-bit single-channel PNG, got mode {img.mode}")
            labels = np.array(img, dtype=np.uint8)
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: corrupt or unreadable part mask ({exc})") from None
    if num_parts is not None and labels.size and int(labels.max()) > num_parts + 1:
        raise DatasetError(f"{path}: label {int(labels.max())} outside 0..{num_parts + 1}")
    return labels


@dataclass(frozen=True)
class _Indexed:
    dataset: CUBDataset
    records: dict[Path, CUBRecord]


_BY_ROOT: dict[Path, _Indexed | DatasetError | None] = {}
_LOCK = threading.Lock()


def _index(root: Path) -> _Indexed | DatasetError | None:
    if not is_cub_layout(root):
        return None
    try:
        dataset = CUBDataset(root, "all")
    except DatasetError as exc:
        return exc
    return _Indexed(dataset, {r.path.resolve(): r for r in dataset.records})


def image_annotations(path: str | os.PathLike) -> PartAnnotations | None:
    """The part annotations of an image file inside a CUB-layout dataset; None outside one or without any.

    The nearest enclosing CUB-layout root wins. Keypoints come from ``parts/part_locs.txt``, the label map
    from ``part_masks/`` (:meth:`mcloss.data.cub.CUBDataset.part_labels`).

    Raises:
        DatasetError: the enclosing dataset's index files, or the image's part mask, are malformed.
    """
    p = Path(path).resolve()
    for root in p.parents:
        with _LOCK:
            if root not in _BY_ROOT:
                _BY_ROOT[root] = _index(root)
            entry = _BY_ROOT[root]
        if isinstance(entry, DatasetError):
            raise entry
        if entry is None:
            continue
        record = entry.records.get(p)
        names = tuple(entry.dataset.part_names)
        if record is None or not names:
            return None
        keypoints = np.asarray(record.parts, dtype=np.float64).reshape(-1, 3)
        labels = entry.dataset.part_labels(record)
        found = PartAnnotations(names, keypoints if len(keypoints) == len(names) else None, labels)
        return None if found.empty else found
    return None
