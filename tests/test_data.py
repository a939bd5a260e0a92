"""mcloss.data: CUB reader (real layout quirks too), keypoints through transforms, ImageFolder,
auto-detection, torchvision wrappers' splits, error messages."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcloss.core.transforms import EvalTransform, TrainTransform
from mcloss.data import datasets as mdata
from mcloss.data.cub import CUBDataset, DatasetError, clean_class_name, find_cub_root, is_cub_layout
from mcloss.data.datasets import build_datasets, detect_dataset, image_only
from mcloss.data.io import ImageLoadError
from mcloss.data.synth import PART_NAMES, generate_dataset


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    generate_dataset(root, classes=3, per_class=4, size=64, seed=5)
    return root


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _dot_image(width: int, height: int, points: list[tuple[int, int]], radius: int = 3) -> Image.Image:
    """Black image with white squares centred on the given pixel indices."""
    arr = np.zeros((height, width, 3), np.uint8)
    for x, y in points:
        arr[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = 255
    return Image.fromarray(arr)


def _real_style_cub(root: Path, images: list[tuple[str, Image.Image]], parts: list[list[tuple[float, float, int]]]) -> Path:
    """A CUB_200_2011 folder written the way the official archive is (prefixed names, spaced part names)."""
    cub = root / "CUB_200_2011"
    names = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    lines = {"images": [], "labels": [], "split": [], "boxes": [], "locs": []}
    for i, (rel, image) in enumerate(images, 1):
        (cub / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(cub / "images" / rel)
        lines["images"].append(f"{i} {rel}")
        lines["labels"].append(f"{i} {names.index(rel.split('/')[0]) + 1}")
        lines["split"].append(f"{i} {i % 2}")
        lines["boxes"].append(f"{i} 1.0 2.0 30.0 40.0")
        lines["locs"] += [f"{i} {p} {x:.1f} {y:.1f} {v}" for p, (x, y, v) in enumerate(parts[i - 1], 1)]
    _write(cub / "images.txt", "\n".join(lines["images"]) + "\n")
    _write(cub / "classes.txt", "\n".join(f"{i} {n}" for i, n in enumerate(names, 1)) + "\n")
    _write(cub / "image_class_labels.txt", "\n".join(lines["labels"]) + "\n")
    _write(cub / "train_test_split.txt", "\n".join(lines["split"]) + "\n")
    _write(cub / "bounding_boxes.txt", "\n".join(lines["boxes"]) + "\n")
    _write(cub / "parts" / "parts.txt", "1 back\n2 left eye\n3 right wing\n")
    _write(cub / "parts" / "part_locs.txt", "\n".join(lines["locs"]) + "\n")
    return cub


# ---------------------------------------------------------------------------------------------- CUB reader


def test_cub_reader_on_synth_output(synth_root):
    train, test, every = (CUBDataset(synth_root, s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(every)) == (6, 6, 12)
    assert train.class_names == ["Common_Bird", "Orange_Head", "Striped_Wing"]
    assert train.part_names == list(PART_NAMES)
    assert sorted(set(train.labels)) == [0, 1, 2] and sorted(test.labels) == [0, 0, 1, 1, 2, 2]
    assert all(r.is_train for r in train.records) and not any(r.is_train for r in test.records)
    assert [r.image_id for r in every.records] == list(range(1, 13))
    rec = every.records[0]
    assert rec.path == synth_root / "images" / "001.Common_Bird" / "Common_Bird_00001.jpg"
    assert rec.parts.shape == (len(PART_NAMES), 3)
    locs = [line.split() for line in (synth_root / "parts" / "part_locs.txt").read_text().splitlines()[: len(PART_NAMES)]]
    np.testing.assert_allclose(rec.parts, [[float(v) for v in row[2:]] for row in locs], atol=1e-4)
    box = (synth_root / "bounding_boxes.txt").read_text().splitlines()[0].split()[1:]
    assert rec.bbox == tuple(float(v) for v in box)

    image, label = every[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64) and label == 0
    tensor, label = CUBDataset(synth_root, "test", EvalTransform((32, 32)))[5]
    assert tensor.shape == (3, 32, 32) and label == 2
    tensor, label = CUBDataset(synth_root, "train", TrainTransform((32, 32), (32, 32)))[0]
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 32, 32)


def test_cub_reader_handles_real_cub_conventions(tmp_path):
    imgs = [
        ("001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", _dot_image(40, 50, [])),
        ("002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", _dot_image(60, 30, [])),
    ]
    parts = [[(10.0, 12.0, 1), (0.0, 0.0, 0), (20.0, 5.0, 1)], [(1.0, 2.0, 1), (3.0, 4.0, 1), (0.0, 0.0, 0)]]
    _real_style_cub(tmp_path, imgs, parts)
    # the archive's top folder is found from its parent
    assert find_cub_root(tmp_path) == tmp_path / "CUB_200_2011" and not is_cub_layout(tmp_path)
    ds = CUBDataset(tmp_path, "all")
    assert ds.class_names == ["Black_footed_Albatross", "Laysan_Albatross"]
    assert ds.part_names == ["back", "left eye", "right wing"]
    assert [r.label for r in ds.records] == [0, 1] and [r.is_train for r in ds.records] == [True, False]
    np.testing.assert_array_equal(ds.records[0].parts, np.array(parts[0], np.float32))
    assert clean_class_name("200.Common_Yellowthroat") == "Common_Yellowthroat"
    assert clean_class_name("no_prefix") == "no_prefix"


# -------------------------------------------------------------------------------------- keypoints ↔ tensor


def _bright_centroid(tensor: torch.Tensor, near: np.ndarray, window: int = 6) -> np.ndarray:
    """Intensity-weighted centroid (pixel-centre convention) of the bright blob near a point."""
    img = tensor.mean(0).numpy()
    img = img - img.min()
    h, w = img.shape
    x0, y0 = max(0, int(near[0]) - window), max(0, int(near[1]) - window)
    x1, y1 = min(w, int(near[0]) + window + 1), min(h, int(near[1]) + window + 1)
    patch = img[y0:y1, x0:x1]
    patch = np.where(patch > 0.5 * patch.max(), patch, 0.0)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    total = patch.sum()
    return np.array([(patch * (xs + 0.5)).sum() / total, (patch * (ys + 0.5)).sum() / total])


@pytest.fixture()
def dotted_cub(tmp_path) -> Path:
    # two asymmetric dots on a non-square image; pixel (i, j) has centre (i + 0.5, j + 0.5)
    pixels = [(30, 20), (95, 61)]
    image = _dot_image(120, 90, pixels)
    parts = [[(x + 0.5, y + 0.5, 1) for x, y in pixels] + [(0.0, 0.0, 0)]] * 2
    imgs = [("001.Black_footed_Albatross/a.png", image), ("002.Laysan_Albatross/b.png", image)]
    return _real_style_cub(tmp_path, imgs, parts)


@pytest.mark.parametrize("transform", [EvalTransform((64, 80)), EvalTransform(72, (64, 64)), EvalTransform(96, None)])
def test_keypoints_follow_eval_transform(dotted_cub, transform):
    ds = CUBDataset(dotted_cub, "all", transform, with_parts=True)
    tensor, label, parts = ds[0]
    assert label == 0 and parts.shape == (3, 3) and parts.dtype == torch.float32
    geo = transform.geometry(120, 90)
    np.testing.assert_allclose(parts[:, :2].numpy(), geo.to_input(ds.records[0].parts[:, :2]), atol=1e-4)
    assert parts[:, 2].tolist() == [1.0, 1.0, 0.0]
    for k in range(2):
        np.testing.assert_allclose(_bright_centroid(tensor, parts[k, :2].numpy()), parts[k, :2].numpy(), atol=0.6)


def test_keypoints_follow_train_transform_with_crop_and_flip(dotted_cub):
    transform = TrainTransform((64, 80), (64, 80), padding=6, flip=True)
    ds = CUBDataset(dotted_cub, "all", transform, with_parts=True)
    unflipped = EvalTransform((64, 80)).geometry(120, 90).to_input(ds.records[0].parts[:2, :2])
    flips = set()
    for seed in range(12):
        random.seed(seed)
        tensor, _, parts = ds[0]
        pts = parts[:2, :2].numpy()
        # the crop only shifts; a flip mirrors x (dot 0 is left of dot 1 unless flipped)
        flipped = bool(pts[0, 0] > pts[1, 0])
        flips.add(flipped)
        expected_dx = -(unflipped[1, 0] - unflipped[0, 0]) if flipped else unflipped[1, 0] - unflipped[0, 0]
        assert pts[1, 0] - pts[0, 0] == pytest.approx(expected_dx, abs=1e-4)
        for k in range(2):
            np.testing.assert_allclose(_bright_centroid(tensor, pts[k]), pts[k], atol=0.6)
    assert flips == {True, False}


def test_parts_outside_the_input_are_marked_invisible(tmp_path):
    imgs = [("001.Black_footed_Albatross/a.png", _dot_image(100, 100, [(2, 50), (50, 50)])),
            ("002.Laysan_Albatross/b.png", _dot_image(100, 100, []))]
    parts = [[(2.5, 50.5, 1), (50.5, 50.5, 1), (0.0, 0.0, 0)]] * 2
    cub = _real_style_cub(tmp_path, imgs, parts)
    _, _, out = CUBDataset(cub, "all", EvalTransform(80, (40, 40)), with_parts=True)[0]
    assert out[:, 2].tolist() == [0.0, 1.0, 0.0]  # the first lies left of the centre crop


def test_image_only_drops_points():
    tf = image_only(TrainTransform((16, 16), (16, 16)))
    out = tf(_dot_image(20, 20, [(5, 5)]))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 16, 16)
    assert image_only(None) is None
    ev = EvalTransform((16, 16))
    assert torch.equal(image_only(ev)(_dot_image(20, 20, [])), ev(_dot_image(20, 20, [])))


# ------------------------------------------------------------------------------------------- ImageFolder


def _image_folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _dot_image(24, 20, [(i + 3, 5)]).save(root / split / name / f"{i}.png")
    return root


def test_image_folder_keeps_train_class_indices_in_test(tmp_path):
    root = _image_folder(tmp_path / "folders", {"train": {"crow": 2, "finch": 3, "wren": 1}, "test": {"wren": 2}})
    train, test, names = build_datasets(root, "auto", TrainTransform((16, 16), (16, 16)), EvalTransform((16, 16)))
    assert names == ["crow", "finch", "wren"]
    assert len(train) == 6 and len(test) == 2
    tensor, label = train[0]
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 16, 16) and label == 0
    assert [test[i][1] for i in range(2)] == [2, 2]


def test_image_folder_errors(tmp_path):
    root = _image_folder(tmp_path / "f1", {"train": {"crow": 1}, "test": {"crow": 1, "gull": 1}})
    with pytest.raises(DatasetError, match=r"test: classes not in .*train: gull"):
        build_datasets(root, "imagefolder")
    root2 = _image_folder(tmp_path / "f2", {"train": {"crow": 1}})
    with pytest.raises(DatasetError, match="missing test/"):
        build_datasets(root2, "imagefolder")


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    """Jupyter's checkpoints folder and macOS's ``._x`` files in a tree: a hidden class would shift every label."""
    root = _image_folder(tmp_path / "folders", {"train": {"crow": 2, "finch": 1}, "test": {"finch": 1}})
    for hidden in (root / "train" / ".ipynb_checkpoints", root / "train" / "crow" / ".thumbs", root / "test" / ".cache"):
        hidden.mkdir()
        _dot_image(24, 20, [(3, 5)]).save(hidden / "x.png")
    (root / "train" / "crow" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    train, test, names = build_datasets(root, "imagefolder", TrainTransform((16, 16), (16, 16)), EvalTransform((16, 16)))
    assert names == ["crow", "finch"] and len(train) == 3 and len(test) == 1
    assert [train[i][1] for i in range(3)] == [0, 0, 1] and test[0][1] == 1


# ---------------------------------------------------------------------------------------- auto-detection


def test_build_datasets_auto_detects_cub(synth_root):
    train, test, names = build_datasets(synth_root, "auto", TrainTransform((32, 32), (32, 32)), EvalTransform((32, 32)))
    assert names == ["Common_Bird", "Orange_Head", "Striped_Wing"]
    assert (len(train), len(test)) == (6, 6)
    tensor, label = train[3]
    assert tensor.shape == (3, 32, 32) and label == 1
    assert detect_dataset(synth_root) == "cub" and is_cub_layout(synth_root)


def test_detection_and_root_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=rf"{empty}: unrecognized dataset layout.*images.txt"):
        build_datasets(empty)
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=rf"{missing}: dataset directory not found"):
        build_datasets(missing)
    with pytest.raises(DatasetError, match="unknown dataset kind 'imagenet'"):
        build_datasets(empty, "imagenet")
    with pytest.raises(DatasetError) as caught:
        CUBDataset(empty)
    lacks = "images.txt, classes.txt, image_class_labels.txt, train_test_split.txt, images/"
    assert str(caught.value) == f"{empty}: not a CUB_200_2011-layout dataset (it lacks {lacks})"
    with pytest.raises(DatasetError, match=rf"^{missing}: dataset directory not found$"):
        CUBDataset(missing)
    (tmp_path / "fgvc-aircraft-2013b").mkdir()
    assert detect_dataset(tmp_path) == "aircraft"


def test_cub_errors_name_file_and_line(synth_root, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(synth_root, root)
    lines = (root / "image_class_labels.txt").read_text().splitlines()
    lines[3] = "4"
    (root / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt line 4: expected 'image_id class_id'"):
        CUBDataset(root)
    lines[3] = "4 9"
    (root / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="image 4 has class id 9, not in classes.txt"):
        CUBDataset(root, "all")
    shutil.copy(synth_root / "image_class_labels.txt", root / "image_class_labels.txt")
    (root / "parts" / "part_locs.txt").unlink()
    assert len(CUBDataset(root, "all")) == 12  # parts are optional ...
    with pytest.raises(DatasetError, match=r"part_locs.txt: file not found \(needed for with_parts=True\)"):
        CUBDataset(root, "all", with_parts=True)  # ... unless asked for
    victim = CUBDataset(root, "all").records[2].path
    victim.unlink()
    with pytest.raises(ImageLoadError, match=rf"{victim}: file not found"):
        CUBDataset(root, "all")[2]
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(ImageLoadError, match=rf"{victim}: not a recognized image format"):
        CUBDataset(root, "all")[2]
    with pytest.raises(ValueError, match="split must be"):
        CUBDataset(root, "val")


# ------------------------------------------------------------------------------------------ torchvision


class _FakeTV:
    """Stands in for a torchvision dataset class, recording how it was constructed."""

    calls: list[tuple[str, dict]] = []
    classes = ["alpha", "beta"]

    def __init__(self, root, **kwargs):
        type(self).calls.append((root, kwargs))
        self.split = kwargs["split"]
        self.transform = kwargs["transform"]

    def __len__(self) -> int:
        return {"train": 3, "val": 2, "trainval": 5, "test": 4}[self.split]

    def __getitem__(self, i):
        image = _dot_image(20, 20, [(4, 4)])
        return (self.transform(image) if self.transform else image), i % 2


@pytest.mark.parametrize(
    ("kind", "cls_name", "train_splits", "test_split", "train_len"),
    [
        ("aircraft", "FGVCAircraft", ["trainval"], "test", 5),
        ("cars", "StanfordCars", ["train"], "test", 3),
        ("flowers", "Flowers102", ["train", "val"], "test", 5),
    ],
)
@pytest.mark.parametrize("download", [False, True])
def test_torchvision_wrappers_use_official_splits(monkeypatch, tmp_path, kind, cls_name, train_splits, test_split,
                                                  train_len, download):
    fake = type(cls_name, (_FakeTV,), {"calls": []})
    monkeypatch.setattr(mdata.tv_datasets, cls_name, fake)
    tt, et = TrainTransform((16, 16), (16, 16)), EvalTransform((16, 16))
    train, test, names = build_datasets(tmp_path, kind, tt, et, download=download)
    assert [kw["split"] for _, kw in fake.calls] == [*train_splits, test_split]
    assert all(kw["download"] is (download and kind != "cars") for _, kw in fake.calls)  # Cars can no longer fetch
    assert all(root == str(tmp_path) for root, _ in fake.calls)
    assert all(kw["loader"] is mdata._load for _, kw in fake.calls)
    if kind == "aircraft":
        assert all(kw["annotation_level"] == "variant" for _, kw in fake.calls)
    assert names == ["alpha", "beta"]
    assert (len(train), len(test)) == (train_len, 4)
    tensor, _ = train[0]
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 16, 16)
    assert test[0][0].shape == (3, 16, 16)


def test_real_fgvc_aircraft_reader_on_its_disk_format(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    variants = ["707-320", "A300B4", "Cessna 172"]
    _write(data / "variants.txt", "\n".join(variants) + "\n")
    rows = {"trainval": [("0001", 0), ("0002", 2), ("0003", 2)], "test": [("0004", 1), ("0005", 2)]}
    for split, items in rows.items():
        _write(data / f"images_variant_{split}.txt", "\n".join(f"{n} {variants[c]}" for n, c in items) + "\n")
        for n, _ in items:
            _dot_image(30, 20, [(5, 5)]).save(data / "images" / f"{n}.jpg")
    train, test, names = build_datasets(tmp_path, "auto", TrainTransform((16, 16), (16, 16)), EvalTransform((16, 16)))
    assert names == variants
    assert [train[i][1] for i in range(3)] == [0, 2, 2] and [test[i][1] for i in range(2)] == [1, 2]
    assert train[0][0].shape == (3, 16, 16)


def test_a_malformed_torchvision_split_is_one_error_naming_it(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    _write(data / "variants.txt", "707-320\n")
    for split in ("trainval", "test"):
        _write(data / f"images_variant_{split}.txt", "0001 Boeing 999\n")  # a variant variants.txt lacks
    _dot_image(30, 20, [(5, 5)]).save(data / "images" / "0001.jpg")
    with pytest.raises(DatasetError, match=r"FGVCAircraft split 'trainval' is malformed \(KeyError: 'Boeing 999'\)"):
        build_datasets(tmp_path, "aircraft")
    (data / "variants.txt").unlink()
    with pytest.raises(DatasetError, match=r"variants\.txt: FGVCAircraft split 'trainval' is malformed \(FileNotFoundError"):
        build_datasets(tmp_path, "aircraft")


def test_cub_files_that_disagree_or_images_that_are_gone_are_refused(synth_root, tmp_path):
    import shutil

    root = tmp_path / "cut"
    shutil.copytree(synth_root, root)
    lines = (root / "images.txt").read_text().splitlines()
    (root / "images.txt").write_text("\n".join(lines[:6]) + "\n")  # cut short: 6 of 12 images
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt: image id 7 is not in images\.txt \(6 such ids\)"):
        CUBDataset(root)
    (root / "images.txt").write_text("\n".join([*lines[:-1], "12 ../../outside.jpg"]) + "\n")
    with pytest.raises(DatasetError, match=r"images\.txt: image 12's path '\.\./\.\./outside\.jpg' leaves images/"):
        CUBDataset(root, "all")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    gone = root / "images" / lines[-1].split(maxsplit=1)[1]
    gone.unlink()
    with pytest.raises(DatasetError, match=rf"{gone}: image file not found \(listed in .*images\.txt\)"):
        build_datasets(root, "cub")
    classes = (root / "classes.txt").read_text().splitlines()
    (root / "classes.txt").write_text("\n".join([classes[0], classes[1].split()[0] + " 009.Common_Bird", *classes[2:]]) + "\n")
    with pytest.raises(DatasetError, match=r"classes\.txt: class name 'Common_Bird' appears twice \(without its number\)"):
        CUBDataset(root)


def test_missing_torchvision_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match=rf"{tmp_path}: FGVCAircraft split 'trainval' not found .*download=True"):
        build_datasets(tmp_path, "aircraft")
    with pytest.raises(DatasetError, match=r"dataset directory not found \(pass download=True"):
        build_datasets(tmp_path / "absent", "flowers")
