"""Datasets: CUB_200_2011 layout (with boxes and part keypoints), ImageFolder, and torchvision's
FGVC-Aircraft, Stanford Cars and Flowers102 with their official splits."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets as tv_datasets

from .io import load_image

__all__ = [
    "class_mismatch",
    "DatasetError",
    "CUBRecord",
    "CUBDataset",
    "CUB_FILES",
    "DATASET_KINDS",
    "TORCHVISION_SPLITS",
    "is_cub_layout",
    "find_cub_root",
    "detect_dataset",
    "image_only",
    "build_datasets",
    "clean_class_name",
]

#: The files that make a directory a CUB_200_2011-layout dataset (parts and boxes are optional).
CUB_FILES: tuple[str, ...] = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")

#: Accepted values of ``build_datasets(dataset=...)``.
DATASET_KINDS: tuple[str, ...] = ("auto", "cub", "imagefolder", "aircraft", "cars", "flowers")

#: Official (train, test) splits of the torchvision datasets; a tuple of splits is concatenated.
TORCHVISION_SPLITS: dict[str, tuple[str | tuple[str, ...], str]] = {
    "aircraft": ("trainval", "test"),
    "cars": ("train", "test"),
    "flowers": (("train", "val"), "test"),
}

_TORCHVISION_CLASSES: dict[str, tuple[str, str]] = {
    "aircraft": ("FGVCAircraft", "fgvc-aircraft-2013b"),
    "cars": ("StanfordCars", "stanford_cars"),
    "flowers": ("Flowers102", "flowers-102"),
}


class DatasetError(ValueError):
    """A dataset root is missing or malformed; the message names the path and what was expected."""


def class_mismatch(data_names: Sequence[str], model_names: Sequence[str]) -> str | None:
    """Why a dataset's classes do not match a checkpoint's (None when they match, in order)."""
    data_names, model_names = list(data_names), list(model_names)
    if data_names == model_names:
        return None
    diff = next(
        (f"class {i} is {x!r} in the data but {y!r} in the checkpoint"
         for i, (x, y) in enumerate(zip(data_names, model_names, strict=False)) if x != y),
        "different class counts",
    )
    return f"its {len(data_names)} classes do not match the checkpoint's {len(model_names)} classes ({diff})"


def clean_class_name(name: str) -> str:
    """``001.Black_footed_Albatross`` → ``Black_footed_Albatross`` (names without a numeric prefix stay)."""
    return re.sub(r"^\d+\.", "", name.strip())


def image_only(transform: Callable | None) -> Callable | None:
    """Wrap a transform so that it returns just the tensor, also when it returns ``(tensor, points)``."""
    if transform is None:
        return None
    return _ImageOnly(transform)


@dataclass(frozen=True)
class _ImageOnly:
    transform: Callable

    def __call__(self, image: Image.Image) -> Any:
        out = self.transform(image)
        return out[0] if isinstance(out, tuple) else out


def _load(path: str | os.PathLike) -> Image.Image:
    return load_image(path)


# -------------------------------------------------------------------------------------------------- CUB


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
    :class:`~mcloss.transforms.EvalTransform` (or any image → tensor callable) or a
    :class:`~mcloss.transforms.TrainTransform` (``(image, points) → (tensor, points)``). Without a
    transform, items hold the PIL image and original-pixel parts.

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
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        found = find_cub_root(root)
        if found is None:
            missing = [name for name in (*CUB_FILES, "images/") if not (Path(root) / name.rstrip("/")).exists()]
            raise DatasetError(
                f"{root}: not a CUB_200_2011-layout dataset (missing {', '.join(missing)}; expected "
                f"{', '.join(CUB_FILES)} and an images/ folder)"
            )
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
        path = self.root / "classes.txt"
        rows = _read_table(path, 2, "'class_id class_name' lines", text_tail=True)
        ids = [_int(r[0], path, "class id") for r in rows]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"{path}: duplicate class ids")
        order = sorted(range(len(rows)), key=lambda i: ids[i])
        names = [clean_class_name(rows[i][1]) for i in order]
        return names, {ids[i]: label for label, i in enumerate(order)}

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
            records.append(
                CUBRecord(
                    image_id=image_id,
                    path=root / "images" / images[image_id][0].strip(),
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


def _transform_with_points(transform: Callable, image: Image.Image, xy: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Apply ``transform`` and map [P, 2] original-pixel points to input-tensor pixels."""
    geometry = getattr(transform, "geometry", None)
    if callable(geometry):  # EvalTransform-like: deterministic geometry
        tensor = transform(image)
        return tensor, geometry(*image.size).to_input(xy)
    out = transform(image, xy)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            "with_parts=True needs an EvalTransform (with .geometry) or a TrainTransform-like "
            f"callable(image, points) -> (tensor, points); got {type(transform).__name__}"
        )
    return out[0], np.asarray(out[1], dtype=np.float64)


# -------------------------------------------------------------------------------------------- ImageFolder


class _ImageFolder(tv_datasets.ImageFolder):
    """ImageFolder loading through :func:`mcloss.io.load_image`, optionally with a fixed class mapping."""

    def __init__(self, root: Path, transform: Callable | None, class_to_idx: dict[str, int] | None = None) -> None:
        self._fixed = class_to_idx
        super().__init__(str(root), transform=transform, loader=_load, allow_empty=class_to_idx is not None)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        if self._fixed is None:
            return super().find_classes(directory)
        return sorted(self._fixed, key=self._fixed.__getitem__), dict(self._fixed)


def _image_folders(root: Path, train_transform: Callable | None, eval_transform: Callable | None) -> tuple[Dataset, Dataset, list[str]]:
    for sub in ("train", "test"):
        if not (root / sub).is_dir():
            raise DatasetError(f"{root}: missing {sub}/ (an ImageFolder dataset needs train/<class>/*.jpg and test/<class>/*.jpg)")
    try:
        train = _ImageFolder(root / "train", image_only(train_transform))
    except FileNotFoundError as exc:
        raise DatasetError(f"{root / 'train'}: {exc}") from None
    test_classes = sorted(d.name for d in os.scandir(root / "test") if d.is_dir())
    unknown = [c for c in test_classes if c not in train.class_to_idx]
    if unknown:
        raise DatasetError(f"{root / 'test'}: classes not in {root / 'train'}: {', '.join(unknown[:5])}")
    test = _ImageFolder(root / "test", image_only(eval_transform), train.class_to_idx)
    if len(test) == 0:
        raise DatasetError(f"{root / 'test'}: no images found (expected test/<class>/*.jpg)")
    return train, test, list(train.classes)


# ------------------------------------------------------------------------------------------- torchvision


def _torchvision_split(kind: str, root: Path, split: str | tuple[str, ...], transform: Callable | None, download: bool) -> Dataset:
    cls_name, folder = _TORCHVISION_CLASSES[kind]
    cls = getattr(tv_datasets, cls_name)
    splits = (split,) if isinstance(split, str) else split
    parts = []
    for one in splits:
        kwargs: dict[str, Any] = {"split": one, "transform": transform, "download": download, "loader": _load}
        if kind == "aircraft":
            kwargs["annotation_level"] = "variant"
        try:
            parts.append(cls(str(root), **kwargs))
        except RuntimeError as exc:
            hint = "" if download else "; pass download=True (--download) to fetch it"
            raise DatasetError(f"{root}: {cls_name} split {one!r} not found (expected {root / folder}/...{hint}): {exc}") from None
    return parts[0] if len(parts) == 1 else _Concat(parts)


class _Concat(ConcatDataset):
    """ConcatDataset that keeps the first part's ``classes``."""

    @property
    def classes(self) -> list[str] | None:
        return getattr(self.datasets[0], "classes", None)


def _torchvision_datasets(kind: str, root: Path, train_transform: Callable | None, eval_transform: Callable | None,
                          download: bool) -> tuple[Dataset, Dataset, list[str]]:
    train_split, test_split = TORCHVISION_SPLITS[kind]
    train = _torchvision_split(kind, root, train_split, image_only(train_transform), download)
    test = _torchvision_split(kind, root, test_split, image_only(eval_transform), download)
    return train, test, _class_names(train)


def _class_names(dataset: Dataset) -> list[str]:
    """``dataset.classes``, or numbered names from its labels on torchvision versions without it."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return [str(c) for c in classes]
    parts = getattr(dataset, "datasets", [dataset])
    count = 1 + max(int(label) for part in parts for label in getattr(part, "_labels", [0]))
    return [f"class_{i:03d}" for i in range(count)]


# ------------------------------------------------------------------------------------------------- entry


def detect_dataset(root: str | os.PathLike) -> str:
    """The kind of dataset at ``root``: cub, imagefolder, aircraft, cars or flowers.

    Raises:
        DatasetError: ``root`` is missing or matches none of the known layouts.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found")
    if find_cub_root(root) is not None:
        return "cub"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "imagefolder"
    for kind, (_, folder) in _TORCHVISION_CLASSES.items():
        if (root / folder).is_dir():
            return kind
    raise DatasetError(
        f"{root}: unrecognized dataset layout (expected CUB_200_2011 files {', '.join(CUB_FILES)} + images/, "
        "or train/ and test/ class folders, or a torchvision fgvc-aircraft-2013b/, stanford_cars/ or flowers-102/ folder)"
    )


def build_datasets(
    root: str | os.PathLike,
    dataset: str = "auto",
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
    download: bool = False,
) -> tuple[Dataset, Dataset, list[str]]:
    """Train and test datasets of ``(tensor, label)`` items and the class names (0-based).

    Args:
        root: dataset directory.
        dataset: one of :data:`DATASET_KINDS`; "auto" detects the layout.
        train_transform: e.g. a TrainTransform (its points output is dropped).
        eval_transform: e.g. an EvalTransform.
        download: passed to the torchvision datasets.

    Raises:
        DatasetError: missing root, unknown kind or malformed layout (the message names the path).
    """
    if dataset not in DATASET_KINDS:
        raise DatasetError(f"unknown dataset kind {dataset!r}; expected one of {', '.join(DATASET_KINDS)}")
    root = Path(root)
    if dataset in TORCHVISION_SPLITS:
        if not root.is_dir() and not download:
            raise DatasetError(f"{root}: dataset directory not found (pass download=True to fetch {dataset})")
        return _torchvision_datasets(dataset, root, train_transform, eval_transform, download)
    kind = detect_dataset(root) if dataset == "auto" else dataset
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found")
    if kind == "cub":
        train_ds = CUBDataset(root, "train", image_only(train_transform))
        test_ds = CUBDataset(root, "test", image_only(eval_transform))
        return train_ds, test_ds, list(train_ds.class_names)
    if kind == "imagefolder":
        return _image_folders(root, train_transform, eval_transform)
    return _torchvision_datasets(kind, root, train_transform, eval_transform, download)

