"""The CUB_200_2011 layout: index files, boxes, part keypoints and masks; real CUB and ``mcloss synth`` output alike.

Masks are optional, one PNG per image, at the image's relative path with ``.png``:
``segmentations/`` holds a bird silhouette (real CUB's segmentation archive, which extracts next to
``CUB_200_2011/``, or ``mcloss synth``'s 0/255 masks) and ``part_masks/`` a label map of the visible
pixels (0 background, i part i of parts.txt, ``len(part_names) + 1`` the body outside the parts; written
by ``mcloss synth``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mcloss.core.errors import DatasetError, ParameterError, first_line
from mcloss.core.model import clean_class_name
from mcloss.data.io import MAX_IMAGE_PIXELS, load_image

__all__ = [
    "CUB_FILES",
    "CUBDataset",
    "CUBRecord",
    "DatasetError",
    "PART_MASKS_DIR",
    "SEGMENTATIONS_DIR",
    "clean_class_name",
    "cub_label",
    "find_cub_root",
    "find_record",
    "is_cub_layout",
    "read_class_names",
    "read_label_map",
]

#: Folders of the optional per-image masks (each mirrors images/, one .png per image).
SEGMENTATIONS_DIR = "segmentations"
PART_MASKS_DIR = "part_masks"

#: The files that make a directory a CUB_200_2011-layout dataset (parts and boxes are optional).
CUB_FILES: tuple[str, ...] = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")


def is_cub_layout(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds a CUB_200_2011-layout dataset (its index files and an images/ folder)."""
    root = Path(root)
    return root.is_dir() and (root / "images").is_dir() and all((root / name).is_file() for name in CUB_FILES)


def find_cub_root(root: str | os.PathLike) -> Path | None:
    """``root`` itself or its ``CUB_200_2011`` sub-folder (the official archive's), whichever is CUB layout."""
    root = Path(root)
    for candidate in (root, root / "CUB_200_2011"):
        if is_cub_layout(candidate):
            return candidate
    return None


@dataclass(frozen=True)
class CUBRecord:
    """One annotated image.

    Attributes:
        image_id: CUB image id (1-based).
        path: image file.
        label: 0-based class index.
        is_train: the image's split in train_test_split.txt.
        bbox: (x, y, w, h) in original pixels, or None without bounding_boxes.txt.
        parts: [P, 3] float32 (x, y, visible) in original pixels; [0, 3] without part annotations.
    """

    image_id: int
    path: Path
    label: int
    is_train: bool
    bbox: tuple[float, float, float, float] | None
    parts: np.ndarray


def _read_table(path: Path, columns: int, what: str, *, text_tail: bool = False) -> list[list[str]]:
    """Rows of a whitespace-separated index file; ``text_tail`` keeps the last column's spaces."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (expected {what})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1) if text_tail else line.split()
        if len(fields) != columns:
            raise DatasetError(f"{path} line {number}: expected {what}, got {line.strip()!r}")
        rows.append(fields)
    return rows


def _int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{path}: {what} must be an integer, got {value!r}") from None


def _float(value: str, path: Path, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DatasetError(f"{path}: {what} must be a number, got {value!r}") from None


def _read_classes(root: Path) -> tuple[list[str], dict[int, int]]:
    """Clean class names in class-id order, and class id → 0-based label."""
    path = root / "classes.txt"
    rows = _read_table(path, 2, "'class_id class_name' lines", text_tail=True)
    ids = [_int(r[0], path, "class id") for r in rows]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: duplicate class ids")
    order = sorted(range(len(rows)), key=lambda i: ids[i])
    names = [clean_class_name(rows[i][1]) for i in order]
    twice = next((n for k, n in enumerate(names) if n in names[:k]), None)
    if twice is not None:  # "001.Common_Bird" and "002.Common_Bird" are one name once the numbers go
        raise DatasetError(f"{path}: class name {twice!r} appears twice (without its number)")
    return names, {ids[i]: label for label, i in enumerate(order)}


def read_class_names(root: str | os.PathLike) -> list[str]:
    """The clean class names of a CUB-layout root's classes.txt, indexed by label (as :class:`CUBDataset` gives them).

    Raises:
        DatasetError: classes.txt is missing or malformed.
    """
    return _read_classes(Path(root))[0]


def _ids_to(rows: list[list[str]], path: Path, what: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for row in rows:
        key = _int(row[0], path, "image id")
        if key in out:
            raise DatasetError(f"{path}: duplicate image id {key} ({what})")
        out[key] = row[1:]
    return out


class CUBDataset(Dataset):
    """A CUB_200_2011-layout dataset (real CUB or ``mcloss synth`` output).

    Items are ``(tensor, label)``, or ``(tensor, label, parts)`` with ``with_parts=True``, where
    ``parts`` is a float32 tensor [P, 3] (x, y, visible) in input-tensor pixels; a part is visible when
    it is annotated visible and lies inside the input. The transform may be an
    :class:`~mcloss.core.transforms.EvalTransform` (or any image → tensor callable) or a
    :class:`~mcloss.core.transforms.TrainTransform` (``(image, points) → (tensor, points)``). Without a
    transform, items hold the PIL image and original-pixel parts. Per-image masks in original pixels,
    where the dataset has them: :meth:`part_labels` (``part_masks/``) and :meth:`silhouette`
    (``segmentations/``).

    Attributes:
        root: the dataset directory.
        split: "train", "test" or "all".
        records: one :class:`CUBRecord` per image of the split, in image-id order.
        class_names: clean class names (numeric prefix removed), indexed by label.
        part_names: part names in part-id order (empty without parts/parts.txt).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable | None = None,
        with_parts: bool = False,
    ) -> None:
        if split not in ("train", "test", "all"):
            raise ParameterError(f"split must be 'train', 'test' or 'all', got {split!r}", parameter="split")
        found = find_cub_root(root)
        if found is None:
            if not Path(root).is_dir():
                raise DatasetError(f"{root}: dataset directory not found")
            missing = [name for name in (*CUB_FILES, "images/") if not (Path(root) / name.rstrip("/")).exists()]
            raise DatasetError(f"{root}: not a CUB_200_2011-layout dataset (it lacks {', '.join(missing)})")
        self.root = found
        self.split = split
        self.transform = transform
        self.with_parts = with_parts
        self.class_names, self._label_of_class = self._read_classes()
        self.part_names = self._read_part_names()
        if with_parts and not self.part_names:
            raise DatasetError(f"{self.root / 'parts' / 'parts.txt'}: file not found (needed for with_parts=True)")
        self.records = self._read_records()

    # -- reading

    def _read_classes(self) -> tuple[list[str], dict[int, int]]:
        return _read_classes(self.root)

    def _read_part_names(self) -> list[str]:
        path = self.root / "parts" / "parts.txt"
        if not path.is_file():
            return []
        rows = _read_table(path, 2, "'part_id part_name' lines", text_tail=True)
        rows.sort(key=lambda r: _int(r[0], path, "part id"))
        return [r[1].strip() for r in rows]

    def _read_records(self) -> list[CUBRecord]:
        root = self.root
        images = _ids_to(_read_table(root / "images.txt", 2, "'image_id relative/path.jpg' lines", text_tail=True),
                         root / "images.txt", "images")
        labels_path = root / "image_class_labels.txt"
        labels = _ids_to(_read_table(labels_path, 2, "'image_id class_id' lines"), labels_path, "labels")
        split_path = root / "train_test_split.txt"
        splits = _ids_to(_read_table(split_path, 2, "'image_id is_training_image' lines"), split_path, "split")
        boxes_path = root / "bounding_boxes.txt"
        boxes = (
            _ids_to(_read_table(boxes_path, 5, "'image_id x y width height' lines"), boxes_path, "boxes")
            if boxes_path.is_file()
            else None
        )
        for table, path in ((labels, labels_path), (splits, split_path)):
            unknown = sorted(set(table) - set(images))
            if unknown:  # images.txt cut short, or another dataset's file beside it
                raise DatasetError(f"{path}: image id {unknown[0]} is not in images.txt ({len(unknown)} such ids)")
        parts = self._read_part_locs(set(images))

        records = []
        for image_id in sorted(images):
            for table, path in ((labels, labels_path), (splits, split_path)):
                if image_id not in table:
                    raise DatasetError(f"{path}: no entry for image id {image_id}")
            flag = splits[image_id][0]
            if flag not in ("0", "1"):
                raise DatasetError(f"{split_path}: is_training_image must be 0 or 1, got {flag!r} (image {image_id})")
            is_train = flag == "1"
            if self.split == "train" and not is_train or self.split == "test" and is_train:
                continue
            class_id = _int(labels[image_id][0], labels_path, "class id")
            if class_id not in self._label_of_class:
                raise DatasetError(f"{labels_path}: image {image_id} has class id {class_id}, not in classes.txt")
            bbox = None
            if boxes is not None:
                if image_id not in boxes:
                    raise DatasetError(f"{boxes_path}: no entry for image id {image_id}")
                x, y, w, h = (_float(v, boxes_path, "box coordinate") for v in boxes[image_id])
                bbox = (x, y, w, h)
            relative = images[image_id][0].strip()
            if Path(relative).is_absolute() or ".." in Path(relative).parts:
                raise DatasetError(f"{root / 'images.txt'}: image {image_id}'s path {relative!r} leaves images/")
            records.append(
                CUBRecord(
                    image_id=image_id,
                    path=root / "images" / relative,
                    label=self._label_of_class[class_id],
                    is_train=is_train,
                    bbox=bbox,
                    parts=parts.get(image_id, np.zeros((len(self.part_names), 3), np.float32)),
                )
            )
        return records

    def _read_part_locs(self, image_ids: set[int]) -> dict[int, np.ndarray]:
        path = self.root / "parts" / "part_locs.txt"
        if not self.part_names or not path.is_file():
            if self.with_parts:
                raise DatasetError(f"{path}: file not found (needed for with_parts=True)")
            return {}
        num_parts = len(self.part_names)
        out: dict[int, np.ndarray] = {}
        try:
            table = np.loadtxt(path, dtype=np.float64, ndmin=2)
        except ValueError as exc:
            raise DatasetError(f"{path}: expected 'image_id part_id x y visible' lines ({exc})") from None
        if table.size and table.shape[1] != 5:
            raise DatasetError(f"{path}: expected 5 columns 'image_id part_id x y visible', got {table.shape[1]}")
        for image_id, part_id, x, y, visible in table:
            iid, pid = int(image_id), int(part_id)
            if not 1 <= pid <= num_parts:
                raise DatasetError(f"{path}: part id {pid} outside 1..{num_parts} (image {iid})")
            if iid not in image_ids:
                raise DatasetError(f"{path}: image id {iid} is not in images.txt")
            if not (np.isfinite(x) and np.isfinite(y)):  # a NaN would match every distance test it meets
                raise DatasetError(f"{path}: part {pid} of image {iid} is at ({x}, {y}), not a finite position")
            arr = out.setdefault(iid, np.zeros((num_parts, 3), np.float32))
            arr[pid - 1] = (x, y, 1.0 if visible > 0 else 0.0)
        return out

    # -- items

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        """0-based labels of the records, in order."""
        return [r.label for r in self.records]

    # -- masks

    @property
    def has_part_masks(self) -> bool:
        """Whether the dataset has a ``part_masks/`` folder (``mcloss synth`` output since format 2)."""
        return (self.root / PART_MASKS_DIR).is_dir()

    def part_labels(self, record: CUBRecord) -> np.ndarray | None:
        """The [H, W] uint8 part label map of an image, or None without one.

        0 is background (or an occluder), i (1-based) part ``part_names[i - 1]``, ``len(part_names) + 1``
        the bird outside every part. Read from ``part_masks/<image path with .png>``.

        Raises:
            DatasetError: the mask is corrupt, not 8-bit single-channel, not the image's size, or has a
                label above ``len(part_names) + 1``.
        """
        if not self.has_part_masks:
            return None
        path = self.root / PART_MASKS_DIR / _mask_rel(self.root, record)
        if not path.is_file():
            return None
        labels = read_label_map(path, len(self.part_names))
        _check_size(path, labels.shape, record.path)
        return labels

    def silhouette(self, record: CUBRecord) -> np.ndarray | None:
        """The [H, W] float32 bird mask of an image in [0, 1], or None without one.

        Read from ``segmentations/<image path with .png>`` in the dataset root or beside it (where CUB's
        segmentation archive extracts). Soft values are kept; multi-channel PNGs give their first channel.

        Raises:
            DatasetError: the mask is corrupt or not the image's size.
        """
        rel = _mask_rel(self.root, record)
        for base in (self.root, self.root.parent):
            path = base / SEGMENTATIONS_DIR / rel
            if path.is_file():
                break
        else:
            return None
        with _open_mask(path) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                mask = np.asarray(img, dtype=np.float32) / np.float32(65535.0)
            elif img.mode in ("1", "L", "P", "I", "F"):
                mask = np.asarray(img.convert("L"), dtype=np.float32) / np.float32(255.0)
            else:  # LA, RGB, RGBA, ...: the first channel
                mask = np.asarray(img.getchannel(0), dtype=np.float32) / np.float32(255.0)
        _check_size(path, mask.shape, record.path)
        return np.clip(mask, 0.0, 1.0)

    def __getitem__(self, index: int) -> tuple[Any, int] | tuple[Any, int, Any]:
        record = self.records[index]
        image = load_image(record.path)
        if not self.with_parts:
            if self.transform is None:
                return image, record.label
            out = self.transform(image)
            return (out[0] if isinstance(out, tuple) else out), record.label
        xy, visible = record.parts[:, :2].astype(np.float64), record.parts[:, 2] > 0
        if self.transform is None:
            return image, record.label, torch.from_numpy(record.parts.copy())
        tensor, moved = _transform_with_points(self.transform, image, xy)
        h, w = tensor.shape[-2:]
        inside = (moved[:, 0] >= 0) & (moved[:, 0] < w) & (moved[:, 1] >= 0) & (moved[:, 1] < h)
        parts = np.concatenate([moved, (visible & inside)[:, None]], axis=1).astype(np.float32)
        return tensor, record.label, torch.from_numpy(parts)


def _mask_rel(root: Path, record: CUBRecord) -> Path:
    """An image's mask path relative to a mask folder: its path under images/ with ``.png``."""
    try:
        rel = record.path.relative_to(root / "images")
    except ValueError:
        raise DatasetError(f"{record.path}: image is not under {root / 'images'}") from None
    return rel.with_suffix(".png")


def read_label_map(path: str | os.PathLike, num_parts: int | None = None) -> np.ndarray:
    """A part label map PNG as [H, W] uint8 (8-bit single channel; labels up to ``num_parts + 1``).

    Raises:
        DatasetError: unreadable, not 8-bit single-channel, or a label above ``num_parts + 1``.
    """
    path = Path(path)
    with _open_mask(path) as img:
        if img.mode not in ("L", "P"):
            raise DatasetError(f"{path}: part mask must be an 8-bit single-channel PNG, got mode {img.mode}")
        labels = np.array(img, dtype=np.uint8)
    if num_parts is not None and labels.size and int(labels.max()) > num_parts + 1:
        top = num_parts + 1
        raise DatasetError(f"{path}: label {int(labels.max())} outside 0..{top} (0 background, 1..{num_parts} parts, {top} body)")
    return labels


def _open_mask(path: Path) -> Image.Image:
    """Decode a mask PNG fully (Pillow, decompression-bomb guarded); errors name the file and reason."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DatasetError(f"{path}: mask too large ({width}×{height})")
            img.load()
            return img.copy()
    except DatasetError:
        raise
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path}: mask refused as a possible decompression bomb ({first_line(exc, 160)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: corrupt or unreadable mask ({first_line(exc, 160)})") from None


_EXIF_ORIENTATION = 0x0112


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as :func:`~mcloss.data.io.load_image` returns it (EXIF orientation applied)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: cannot read the image's size ({first_line(exc, 160)})") from None
    return width, height


def _check_size(path: Path, shape: tuple[int, ...], image: Path) -> None:
    width, height = _image_size(image)
    if shape[:2] != (height, width):
        raise DatasetError(f"{path}: mask is {shape[1]}×{shape[0]} pixels but its image {image.name} is {width}×{height}")


def _transform_with_points(transform: Callable, image: Image.Image, xy: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Apply ``transform`` and map [P, 2] original-pixel points to input-tensor pixels."""
    geometry = getattr(transform, "geometry", None)
    if callable(geometry):  # EvalTransform-like: deterministic geometry
        tensor = transform(image)
        return tensor, geometry(*image.size).to_input(xy)
    out = transform(image, xy)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ParameterError(
            "with_parts=True needs an EvalTransform (with .geometry) or a TrainTransform-like "
            f"callable(image, points) -> (tensor, points); got {type(transform).__name__}",
            parameter="transform",
        )
    return out[0], np.asarray(out[1], dtype=np.float64)


# ------------------------------------------------------------------------------------------- labels by file


def cub_label(path: str | os.PathLike) -> int | None:
    """The 0-based class of an image file inside a CUB-layout dataset, or None outside one.

    The label is the one :class:`CUBDataset` gives the image (class ids ranked in sorted order, so
    non-contiguous ids are handled); the nearest enclosing CUB-layout root wins.

    Raises:
        DatasetError: the enclosing dataset's index files are malformed.
    """
    found = find_record(path)
    return None if found is None else found[1].label


def find_record(path: str | os.PathLike) -> tuple[CUBDataset, CUBRecord] | None:
    """The dataset (split "all") and record of an image file inside a CUB-layout dataset, or None outside one.

    The nearest enclosing CUB-layout root wins. Each folder is looked at once per process (thread-safe), a
    malformed dataset included.

    Raises:
        DatasetError: the enclosing dataset's index files are malformed.
    """
    p = Path(path).resolve()
    for root in p.parents:
        with _INDEX_LOCK:
            if root not in _INDEX_BY_ROOT:
                _INDEX_BY_ROOT[root] = _index(root)
            entry = _INDEX_BY_ROOT[root]
        if isinstance(entry, DatasetError):
            raise entry
        if entry is not None:
            record = entry[1].get(p)
            return None if record is None else (entry[0], record)
    return None


_INDEX_BY_ROOT: dict[Path, tuple[CUBDataset, dict[Path, CUBRecord]] | DatasetError | None] = {}
_INDEX_LOCK = threading.Lock()


def _new_index_lock() -> None:
    """A forked child's own lock: another thread may have held the parent's at the fork, and the child would
    inherit it held for good (an export's writer processes read part annotations through it). An index is
    stored whole once read, so the child's copy of ``_INDEX_BY_ROOT`` is never half-built."""
    global _INDEX_LOCK
    _INDEX_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_index_lock)


def _index(root: Path) -> tuple[CUBDataset, dict[Path, CUBRecord]] | DatasetError | None:
    if not is_cub_layout(root):
        return None
    try:
        dataset = CUBDataset(root, "all")
    except DatasetError as exc:
        return exc
    return dataset, {r.path.resolve(): r for r in dataset.records}
