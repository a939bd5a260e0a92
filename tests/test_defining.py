"""Ground truth about parts: per-image part masks and silhouettes (synth and CUB layouts), and the parts or
regions that define each class (synth.json's changed parts; CUB's class attribute percentages)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcloss.data.cub import CUBDataset, DatasetError
from mcloss.data.defining import (
    ATTRIBUTE_REGIONS,
    GLOBAL_ATTRIBUTE_GROUPS,
    REGION_PARTS,
    cub_defining_parts,
    defining_parts,
    region_part_indices,
    synth_defining_parts,
)
from mcloss.data.synth import (
    BODY_LABEL,
    PART_NAMES,
    class_definitions,
    generate_dataset,
    instance_rng,
    render_bird,
)

#: CUB_200_2011's parts/parts.txt, in id order.
CUB_PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
             "right eye", "right leg", "right wing", "tail", "throat"]

#: The 28 attribute groups of CUB_200_2011's attributes.txt, in file order.
CUB_GROUPS = ["has_bill_shape", "has_wing_color", "has_upperparts_color", "has_underparts_color",
              "has_breast_pattern", "has_back_color", "has_tail_shape", "has_upper_tail_color", "has_head_pattern",
              "has_breast_color", "has_throat_color", "has_eye_color", "has_bill_length", "has_forehead_color",
              "has_under_tail_color", "has_nape_color", "has_belly_color", "has_wing_shape", "has_size", "has_shape",
              "has_back_pattern", "has_tail_pattern", "has_belly_pattern", "has_primary_color", "has_leg_color",
              "has_bill_color", "has_crown_color", "has_wing_pattern"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("defining") / "synth"
    generate_dataset(root, classes=4, per_class=2, size=48, seed=1)
    return root


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


#: A 4-class CUB fixture: attributes (id, name) and class percentages, one row per class.
ATTRIBUTES = ["has_bill_shape::cone", "has_bill_color::black", "has_wing_color::red", "has_breast_pattern::solid",
              "has_size::small_(5_-_9_in)", "has_leg_color::grey"]
PERCENT = [
    [100.0, 0.0, 50.0, 40.0, 90.0, 20.0],
    [0.0, 0.0, 50.0, 100.0, 10.0, 20.0],
    [0.0, 40.0, 10.0, 0.0, 50.0, 60.0],
    [0.0, 0.0, 90.0, 20.0, 50.0, 20.0],
]
CLASSES = ["Cone_Bill", "Solid_Breast", "Black_Bill", "Red_Wing"]
# By hand. Means over classes: 25, 10, 50, 40, (50, size: no region), 30. |p - mean|, region = mean of its columns:
#   beak (bill shape, bill colour)   c1 (75+10)/2=42.5  c2 (25+10)/2=17.5  c3 (25+30)/2=27.5  c4 17.5
#   wing (wing colour)               c1 0               c2 0               c3 40              c4 40
#   underparts (breast pattern)      c1 0               c2 60              c3 40              c4 20
#   legs (leg colour)                c1 10              c2 10              c3 30              c4 10
# c1: ties at 0 → name order (underparts < wing); c3: wing and underparts tie at 40 → underparts first.
EXPECTED_TOP3 = {
    "Cone_Bill": ["beak", "legs", "underparts"],
    "Solid_Breast": ["underparts", "beak", "legs"],
    "Black_Bill": ["underparts", "wing", "legs"],
    "Red_Wing": ["wing", "underparts", "beak"],
}


def _cub(tmp_path: Path, *, names_beside: bool = True, sizes: tuple[tuple[int, int], ...] = ((40, 30),) * 4) -> Path:
    """CUB_200_2011 as the official archive extracts it, with attribute files; returns the CUB root."""
    cub = tmp_path / "CUB_200_2011"
    images, labels, split = [], [], []
    for i, (name, size) in enumerate(zip(CLASSES, sizes, strict=True), 1):
        rel = f"{i:03d}.{name}/{name}_0001.jpg"
        (cub / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (90, 120, 60)).save(cub / "images" / rel)
        images.append(f"{i} {rel}")
        labels.append(f"{i} {i}")
        split.append(f"{i} {i % 2}")
    _write(cub / "images.txt", "\n".join(images) + "\n")
    _write(cub / "classes.txt", "".join(f"{i} {i:03d}.{n}\n" for i, n in enumerate(CLASSES, 1)))
    _write(cub / "image_class_labels.txt", "\n".join(labels) + "\n")
    _write(cub / "train_test_split.txt", "\n".join(split) + "\n")
    _write(cub / "parts" / "parts.txt", "".join(f"{i} {n}\n" for i, n in enumerate(CUB_PARTS, 1)))
    names = "".join(f"{i} {n}\n" for i, n in enumerate(ATTRIBUTES, 1))
    _write(tmp_path / "attributes.txt" if names_beside else cub / "attributes" / "attributes.txt", names)
    rows = "".join(" ".join(f"{v:.12f}" for v in row) + "\n" for row in PERCENT)
    _write(cub / "attributes" / "class_attribute_labels_continuous.txt", rows)
    return cub


# -------------------------------------------------------------------------------------------- defining parts


def test_synth_defining_parts_are_the_changed_parts(synth_root, tmp_path):
    got = synth_defining_parts(synth_root)
    birds = class_definitions(4)
    assert got == {b.name: list(b.changed) for b in birds}
    assert got["Common_Bird"] == [] and all(len(v) >= 1 for k, v in got.items() if k != "Common_Bird")
    meta = json.loads((synth_root / "synth.json").read_text())
    assert got == {d["name"]: d["changed"] for d in meta["class_definitions"]}
    assert list(got) == CUBDataset(synth_root, "all").class_names
    assert defining_parts(synth_root) == got and defining_parts(synth_root, top=1) == got
    for parts in got.values():
        assert all(region_part_indices(p, PART_NAMES) == [PART_NAMES.index(p)] for p in parts)
    # a non-synth CUB layout without attributes, and a directory that is no dataset at all
    plain = tmp_path / "plain"
    shutil.copytree(synth_root, plain)
    (plain / "synth.json").unlink()
    assert synth_defining_parts(plain) is None and defining_parts(plain) is None
    assert synth_defining_parts(tmp_path / "nothing") is None and defining_parts(tmp_path / "nothing") is None
    # a synth.json whose definitions are broken is an error naming it
    broken = tmp_path / "broken"
    shutil.copytree(synth_root, broken)
    meta["class_definitions"][1] = {"name": "X"}
    (broken / "synth.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"synth\.json: class definition 2"):
        synth_defining_parts(broken)


def test_combo_synth_defining_parts(tmp_path):
    root = tmp_path / "combo"
    generate_dataset(root, classes=3, per_class=2, size=32, seed=0, design="combo")
    assert synth_defining_parts(root) == {b.name: list(b.changed) for b in class_definitions(3, "combo")}


@pytest.mark.parametrize("names_beside", [True, False])
def test_cub_defining_regions_follow_the_documented_rule(tmp_path, names_beside):
    cub = _cub(tmp_path, names_beside=names_beside)
    assert cub_defining_parts(cub, top=3) == EXPECTED_TOP3
    assert cub_defining_parts(tmp_path, top=3) == EXPECTED_TOP3  # the archive's parent folder works too
    assert cub_defining_parts(cub, top=1) == {k: v[:1] for k, v in EXPECTED_TOP3.items()}
    assert cub_defining_parts(cub) == {k: v[:2] for k, v in EXPECTED_TOP3.items()}
    assert defining_parts(cub, top=3) == EXPECTED_TOP3 and synth_defining_parts(cub) is None
    # more than there are regions: every region, ranked
    assert all(len(v) == 4 for v in cub_defining_parts(cub, top=10).values())
    assert list(cub_defining_parts(cub)) == CUBDataset(cub, "all").class_names
    with pytest.raises(ValueError, match="top must be"):
        cub_defining_parts(cub, top=0)


def test_cub_defining_regions_need_both_attribute_files(tmp_path):
    cub = _cub(tmp_path)
    (cub / "attributes" / "class_attribute_labels_continuous.txt").unlink()
    assert cub_defining_parts(cub) is None and defining_parts(cub) is None
    cub = _cub(tmp_path / "b")
    (tmp_path / "b" / "attributes.txt").unlink()
    assert cub_defining_parts(cub) is None


def _set(rows: list[str], row: int, column: int, value: str) -> list[str]:
    """``rows`` with the 1-based (row, column) field replaced."""
    fields = rows[row - 1].split()
    fields[column - 1] = value
    return [*rows[: row - 1], " ".join(fields), *rows[row:]]


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        ("continuous", lambda rows: rows[:1] + [" ".join(rows[1].split()[:5])] + rows[2:], "row 2: 5 values, expected one per attribute .6."),
        ("continuous", lambda rows: _set(rows, 3, 3, "ten"), "row 3: value 3 is not a number"),
        ("continuous", lambda rows: rows[:3], "3 rows, expected one per class .4 in classes.txt."),
        ("continuous", lambda rows: _set(rows, 4, 4, "nan"), "row 4: value 4 is not finite"),
        ("names", lambda rows: rows[:2] + ["three has_wing_color::red"] + rows[3:], "line 3: expected 'attribute_id attribute_name'"),
        ("names", lambda rows: rows[:2] + ["9 has_wing_color::red"] + rows[3:], "attribute ids must be 1..6"),
    ],
)
def test_malformed_attribute_files_name_the_file(tmp_path, file, edit, message):
    cub = _cub(tmp_path)
    path = tmp_path / "attributes.txt" if file == "names" else cub / "attributes" / "class_attribute_labels_continuous.txt"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(DatasetError, match=message) as info:
        cub_defining_parts(cub)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_attribute_regions_cover_cub_groups_and_regions_partition_cub_parts():
    assert set(ATTRIBUTE_REGIONS) | set(GLOBAL_ATTRIBUTE_GROUPS) == set(CUB_GROUPS)
    assert not set(ATTRIBUTE_REGIONS) & set(GLOBAL_ATTRIBUTE_GROUPS) and len(ATTRIBUTE_REGIONS) == 25
    assert set(ATTRIBUTE_REGIONS.values()) == set(REGION_PARTS)
    covered = [p for parts in REGION_PARTS.values() for p in parts]
    assert sorted(covered) == sorted(CUB_PARTS)  # each CUB part in exactly one region
    assert ATTRIBUTE_REGIONS["has_bill_shape"] == "beak" and ATTRIBUTE_REGIONS["has_wing_color"] == "wing"
    assert ATTRIBUTE_REGIONS["has_upperparts_color"] == "back" and ATTRIBUTE_REGIONS["has_underparts_color"] == "underparts"


def test_region_part_indices():
    assert region_part_indices("wing", CUB_PARTS) == [8, 12]
    assert region_part_indices("underparts", CUB_PARTS) == [2, 3]
    assert region_part_indices("head", CUB_PARTS) == [4, 5, 9, 14]
    assert region_part_indices("eye", CUB_PARTS) == [6, 10] and region_part_indices("legs", CUB_PARTS) == [7, 11]
    assert region_part_indices("beak", CUB_PARTS) == [1] and region_part_indices("left wing", CUB_PARTS) == [8]
    assert region_part_indices("crest", CUB_PARTS) == [] and region_part_indices("nowhere", CUB_PARTS) == []
    # synth: the region is the part
    assert region_part_indices("wing", PART_NAMES) == [3] and region_part_indices("crest", PART_NAMES) == [2]
    assert region_part_indices("head", PART_NAMES) == [0] and region_part_indices("legs", list(PART_NAMES)) == [6]
    assert region_part_indices("eye", PART_NAMES) == []


# ---------------------------------------------------------------------------------------------------- masks


def test_synth_masks_read_back_exactly(synth_root):
    ds = CUBDataset(synth_root, "all")
    assert ds.has_part_masks
    birds = class_definitions(4)
    for index, record in enumerate(ds.records):
        labels = ds.part_labels(record)
        silhouette = ds.silhouette(record)
        rendered = render_bird(birds[record.label], 48, instance_rng(1, index))
        np.testing.assert_array_equal(labels, rendered.labels)
        assert labels.dtype == np.uint8 and labels.shape == (48, 48) and labels.max() <= BODY_LABEL
        assert silhouette.dtype == np.float32 and silhouette.shape == (48, 48)
        np.testing.assert_array_equal(silhouette, (labels > 0).astype(np.float32))
        assert set(np.unique(labels).tolist()) <= set(range(len(ds.part_names) + 2))


def test_dataset_without_masks_reads_as_before(synth_root, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(synth_root, old)
    shutil.rmtree(old / "part_masks")
    shutil.rmtree(old / "segmentations")
    meta = json.loads((old / "synth.json").read_text())
    meta["version"] = 1
    del meta["masks"]
    (old / "synth.json").write_text(json.dumps(meta))
    ds = CUBDataset(old, "all", with_parts=True)
    assert not ds.has_part_masks and len(ds) == 8
    assert ds.part_labels(ds.records[0]) is None and ds.silhouette(ds.records[0]) is None
    image, label, parts = ds[0]
    assert image.size == (48, 48) and parts.shape == (len(PART_NAMES), 3)
    assert synth_defining_parts(old) == synth_defining_parts(synth_root)
    # one mask file missing: None for that image only
    partial = tmp_path / "partial"
    shutil.copytree(synth_root, partial)
    ds = CUBDataset(partial, "all")
    rel = ds.records[1].path.relative_to(partial / "images").with_suffix(".png")
    (partial / "part_masks" / rel).unlink()
    (partial / "segmentations" / rel).unlink()
    assert ds.part_labels(ds.records[1]) is None and ds.silhouette(ds.records[1]) is None
    assert ds.part_labels(ds.records[0]) is not None and ds.silhouette(ds.records[0]) is not None


def test_real_cub_segmentations_beside_the_archive_with_soft_values_and_any_mode(tmp_path):
    cub = _cub(tmp_path)
    ds = CUBDataset(tmp_path, "all")
    assert not ds.has_part_masks and ds.part_labels(ds.records[0]) is None and ds.silhouette(ds.records[0]) is None
    soft = np.tile(np.linspace(0, 255, 40).round().astype(np.uint8), (30, 1))
    modes = {0: Image.fromarray(soft), 1: Image.fromarray(np.stack([soft, soft // 2, soft // 3], -1)),
             2: Image.fromarray(np.stack([soft, soft, soft, np.full_like(soft, 255)], -1)),
             3: Image.fromarray(soft).convert("LA")}
    for i, img in modes.items():
        rel = ds.records[i].path.relative_to(cub / "images").with_suffix(".png")
        (tmp_path / "segmentations" / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "segmentations" / rel)
    for i in modes:
        mask = ds.silhouette(ds.records[i])
        assert mask.dtype == np.float32 and mask.shape == (30, 40), i
        np.testing.assert_allclose(mask, soft / 255.0, atol=1e-6, err_msg=str(i))
    # inside the dataset root wins over beside it
    rel = ds.records[0].path.relative_to(cub / "images").with_suffix(".png")
    (cub / "segmentations" / rel).parent.mkdir(parents=True)
    Image.new("L", (40, 30), 255).save(cub / "segmentations" / rel)
    assert ds.silhouette(ds.records[0]).min() == 1.0


def _with_part_mask(tmp_path: Path, image: Image.Image | bytes) -> tuple[CUBDataset, Path]:
    cub = _cub(tmp_path)
    ds = CUBDataset(cub, "all")
    path = cub / "part_masks" / ds.records[0].path.relative_to(cub / "images").with_suffix(".png")
    path.parent.mkdir(parents=True)
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path)
    return ds, path


def test_cub_part_masks_are_checked(tmp_path):
    labels = np.zeros((30, 40), np.uint8)
    labels[5:10, 5:10] = 16  # body of a 15-part dataset
    labels[12:14, 20:30] = 9
    ds, path = _with_part_mask(tmp_path / "ok", Image.fromarray(labels))
    assert ds.has_part_masks
    np.testing.assert_array_equal(ds.part_labels(ds.records[0]), labels)
    assert ds.part_labels(ds.records[1]) is None  # no file for that image
    cases = [
        (Image.fromarray(np.full((30, 40), 17, np.uint8)), r"label 17 outside 0\.\.16"),
        (Image.fromarray(np.zeros((31, 40), np.uint8)), r"mask is 40×31 pixels but its image .* is 40×30"),
        (Image.fromarray(np.zeros((30, 40, 3), np.uint8)), "8-bit single-channel PNG, got mode RGB"),
        (b"\x89PNG\r\n\x1a\nnot really a png", "corrupt or unreadable mask"),
        (b"", "corrupt or unreadable mask"),
    ]
    for n, (image, message) in enumerate(cases):
        ds, path = _with_part_mask(tmp_path / f"bad{n}", image)
        with pytest.raises(DatasetError, match=message) as info:
            ds.part_labels(ds.records[0])
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_corrupt_silhouette_names_the_file(tmp_path):
    cub = _cub(tmp_path)
    ds = CUBDataset(cub, "all")
    path = tmp_path / "segmentations" / ds.records[2].path.relative_to(cub / "images").with_suffix(".png")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GIF89a broken")
    with pytest.raises(DatasetError, match="corrupt or unreadable mask") as info:
        ds.silhouette(ds.records[2])
    assert str(path) in str(info.value)
    Image.new("L", (12, 12)).save(path)
    with pytest.raises(DatasetError, match="mask is 12×12 pixels"):
        ds.silhouette(ds.records[2])
