"""Part annotations of one image: keypoints and a part label map, from the CUB-layout dataset that holds it.

:func:`image_annotations` finds the nearest enclosing CUB-layout dataset of an image path (as
:func:`mcloss.data.cub.cub_label` does) and returns the image's part keypoints and, where the dataset has
``part_masks/``, its part label map. Each folder is looked at once per process (thread-safe); masks are
read per call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from mcloss.data.cub import find_record

__all__ = ["PartAnnotations", "image_annotations"]


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


def image_annotations(path: str | os.PathLike) -> PartAnnotations | None:
    """The part annotations of an image file inside a CUB-layout dataset; None outside one or without any.

    The nearest enclosing CUB-layout root wins. Keypoints come from ``parts/part_locs.txt``, the label map
    from ``part_masks/`` (:meth:`mcloss.data.cub.CUBDataset.part_labels`).

    Raises:
        DatasetError: the enclosing dataset's index files, or the image's part mask, are malformed.
    """
    found = find_record(path)
    if found is None or not found[0].part_names:
        return None
    dataset, record = found
    names = tuple(dataset.part_names)
    keypoints = np.asarray(record.parts, dtype=np.float64).reshape(-1, 3)
    annotations = PartAnnotations(names, keypoints if len(keypoints) == len(names) else None, dataset.part_labels(record))
    return None if annotations.empty else annotations
