"""Dataset roots: layout detection, and train/test splits of CUB-layout folders, ImageFolder trees, and
torchvision's FGVC-Aircraft, Stanford Cars and Flowers102 with their official splits."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets as tv_datasets
from torchvision.datasets.folder import IMG_EXTENSIONS

from mcloss.core.errors import DatasetError
from mcloss.core.model import same_class_name, same_class_names
from mcloss.data.cub import CUB_FILES, CUBDataset, find_cub_root
from mcloss.data.io import load_image

__all__ = [
    "DATASET_KINDS",
    "TORCHVISION_SPLITS",
    "DatasetError",
    "build_datasets",
    "check_classes",
    "class_mismatch",
    "detect_dataset",
    "image_only",
]

#: Accepted values of ``build_datasets(dataset=...)`` and of every ``--dataset`` flag.
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


def class_mismatch(data_names: Sequence[str], model_names: Sequence[str]) -> str | None:
    """Why a dataset's classes do not match a checkpoint's (None when they match, in order)."""
    data_names, model_names = list(data_names), list(model_names)
    if same_class_names(data_names, model_names):
        return None
    diff = next(
        (f" (class {i} is {x!r} in the data but {y!r} in the checkpoint)"
         for i, (x, y) in enumerate(zip(data_names, model_names, strict=False)) if not same_class_name(x, y)),
        "",
    )
    if len(data_names) == len(model_names):
        return f"its classes do not match the checkpoint's{diff}"
    return f"its {len(data_names)} classes do not match the checkpoint's {len(model_names)} classes{diff}"


def check_classes(label: object, data_names: Sequence[str], model_names: Sequence[str]) -> None:
    """Raise a DatasetError ``"<label>: <why>"`` when a dataset's classes are not a checkpoint's
    (:func:`class_mismatch`)."""
    mismatch = class_mismatch(data_names, model_names)
    if mismatch is not None:
        raise DatasetError(f"{label}: {mismatch}")


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


# -------------------------------------------------------------------------------------------- ImageFolder


class _ImageFolder(tv_datasets.ImageFolder):
    """ImageFolder loading through :func:`mcloss.data.io.load_image`, optionally with a fixed class mapping.
    Hidden folders and files (``.ipynb_checkpoints/``, macOS's ``._x.jpg``) are neither classes nor images."""

    def __init__(self, root: Path, transform: Callable | None, class_to_idx: dict[str, int] | None = None) -> None:
        self._fixed = class_to_idx
        super().__init__(
            str(root), transform=transform, loader=_load, allow_empty=class_to_idx is not None,
            is_valid_file=functools.partial(_visible_image, root=root),
        )  # fmt: skip

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        if self._fixed is None:
            classes = _class_folders(Path(directory))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {name: i for i, name in enumerate(classes)}
        return sorted(self._fixed, key=self._fixed.__getitem__), dict(self._fixed)


def _class_folders(directory: Path) -> list[str]:
    """The class folders of an ImageFolder split, sorted (torchvision's order), hidden ones left out."""
    return sorted(d.name for d in os.scandir(directory) if d.is_dir() and not d.name.startswith("."))


def _visible_image(path: str, root: Path) -> bool:
    relative = Path(path).relative_to(root)
    return not any(part.startswith(".") for part in relative.parts) and relative.suffix.lower() in IMG_EXTENSIONS


def _image_folders(root: Path, train_transform: Callable | None, eval_transform: Callable | None) -> tuple[Dataset, Dataset, list[str]]:
    for sub in ("train", "test"):
        if not (root / sub).is_dir():
            raise DatasetError(f"{root}: missing {sub}/ (an ImageFolder dataset needs train/<class>/*.jpg and test/<class>/*.jpg)")
    try:
        train = _ImageFolder(root / "train", image_only(train_transform))
    except FileNotFoundError as exc:
        raise DatasetError(f"{root / 'train'}: {exc}") from None
    test_classes = _class_folders(root / "test")
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
        fetchable = kind != "cars"  # Stanford Cars' download address is gone; torchvision refuses it
        kwargs: dict[str, Any] = {"split": one, "transform": transform, "download": download and fetchable, "loader": _load}
        if kind == "aircraft":
            kwargs["annotation_level"] = "variant"
        try:
            parts.append(cls(str(root), **kwargs))
        except RuntimeError as exc:
            suggest = fetchable and not download
            hint = "; pass download=True to fetch it" if suggest else ""
            raise DatasetError(
                f"{root}: {cls_name} split {one!r} not found (expected {root / folder}/...{hint}): {exc}",
                parameter="download" if suggest else (),
            ) from None
        except (OSError, KeyError, ValueError, IndexError) as exc:  # a file of the split missing or malformed
            where = getattr(exc, "filename", None) or root / folder
            raise DatasetError(f"{where}: {cls_name} split {one!r} is malformed ({type(exc).__name__}: {exc})") from None
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
            raise DatasetError(
                f"{root}: dataset directory not found (pass download=True to fetch {dataset})", parameter="download"
            )
        return _torchvision_datasets(dataset, root, train_transform, eval_transform, download)
    kind = detect_dataset(root) if dataset == "auto" else dataset
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found")
    if kind == "cub":
        train_ds = CUBDataset(root, "train", image_only(train_transform))
        test_ds = CUBDataset(root, "test", image_only(eval_transform))
        gone = next((r.path for r in (*train_ds.records, *test_ds.records) if not r.path.is_file()), None)
        if gone is not None:  # found now, not at the end of an epoch
            raise DatasetError(f"{gone}: image file not found (listed in {train_ds.root / 'images.txt'})")
        return train_ds, test_ds, list(train_ds.class_names)
    if kind == "imagefolder":
        return _image_folders(root, train_transform, eval_transform)
    return _torchvision_datasets(kind, root, train_transform, eval_transform, download)

