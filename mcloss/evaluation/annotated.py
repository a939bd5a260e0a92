"""The annotated images that maps are scored against (``mcloss parts`` and ``mcloss parts --contrast``):
a CUB-layout split's records with their part keypoints, and its per-pixel annotations where it has them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mcloss.core.errors import DatasetError
from mcloss.core.model import MCModel
from mcloss.data.datasets import class_mismatch

__all__ = ["AnnotatedItem", "annotated_items", "annotation", "open_parts_dataset", "scorable_items"]


@dataclass(frozen=True)
class AnnotatedItem:
    """One image of a split: its id, file, class, part keypoints [P, 3] (x, y, visible) and the dataset's record."""

    image_id: int
    path: Path
    label: int
    keypoints: np.ndarray
    record: Any = None


def annotated_items(dataset: Any) -> list[AnnotatedItem]:
    """Every record of ``dataset`` as an :class:`AnnotatedItem` (no keypoints: an empty [0, 3])."""
    out = []
    for rec in dataset.records:
        parts = rec.parts
        kps = np.zeros((0, 3)) if parts is None else np.asarray(parts, dtype=np.float64).reshape(-1, 3)
        out.append(AnnotatedItem(int(rec.image_id), Path(rec.path), int(rec.label), kps, rec))
    return out


def open_parts_dataset(dataset_or_root: Any, split: str) -> Any:
    """A dataset with ``records`` as it is, or the CUB-layout split at a root, read with its parts."""
    if hasattr(dataset_or_root, "records"):
        return dataset_or_root
    from mcloss.data.cub import CUBDataset

    root = Path(dataset_or_root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found")
    return CUBDataset(root, split, with_parts=True)


def scorable_items(dataset: Any, model: MCModel, limit: int | None) -> tuple[list[AnnotatedItem], list[str]]:
    """The images to score (the first ``limit``) and the part names; refuses other classes or no keypoints."""
    mismatch = class_mismatch(getattr(dataset, "class_names", model.class_names), model.class_names)
    if mismatch:
        raise DatasetError(mismatch)
    part_names = list(getattr(dataset, "part_names", []) or [])
    items = annotated_items(dataset)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise DatasetError("no images to evaluate (empty split)")
    num_parts = len(part_names) or max(len(it.keypoints) for it in items)
    if num_parts == 0 or all(len(it.keypoints) == 0 for it in items):
        raise DatasetError("the dataset has no part keypoints (parts/parts.txt, parts/part_locs.txt)")
    return items, part_names or [f"part_{i}" for i in range(num_parts)]


def annotation(dataset: Any, reader: str, item: AnnotatedItem) -> np.ndarray | None:
    """``dataset.<reader>(record)`` (``part_labels`` or ``silhouette``) where the dataset has it, else None."""
    read = getattr(dataset, reader, None)
    return read(item.record) if callable(read) and item.record is not None else None
