"""mcloss synth: CUB layout, annotations, determinism, class design, colour-histogram blindness, CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from mcloss.cli.synth import main as synth_main
from mcloss.data import synth
from mcloss.data.cub import CUBDataset
from mcloss.data.synth import (
    CLASS_PARTS,
    PART_NAMES,
    SynthError,
    class_definitions,
    generate_dataset,
    instance_rng,
    render_bird,
    writing,
)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate_dataset(out, classes=4, per_class=6, size=64, seed=3)
    return out


def test_layout_files_and_counts_are_consistent(small):
    names = ["images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt",
             "bounding_boxes.txt", "parts/parts.txt", "parts/part_locs.txt", "synth.json"]
    for name in names:
        assert (small / name).is_file(), name
    images = _rows(small / "images.txt")
    classes = _rows(small / "classes.txt")
    labels = _rows(small / "image_class_labels.txt")
    split = _rows(small / "train_test_split.txt")
    boxes = _rows(small / "bounding_boxes.txt")
    assert [int(r[0]) for r in images] == list(range(1, 25))
    assert [int(r[0]) for r in classes] == [1, 2, 3, 4]
    assert classes[0][1] == "001.Common_Bird"
    folders = {r[1] for r in classes}
    for (iid, rel), (lid, cid) in zip(images, labels, strict=True):
        assert iid == lid
        folder = rel.split("/")[0]
        assert folder in folders and folder == classes[int(cid) - 1][1]
        assert (small / "images" / rel).is_file()
        assert cv2.imread(str(small / "images" / rel)).shape == (64, 64, 3)
    # 50/50 per class: 3 train and 3 test of each class
    per_class = {}
    for (_, cid), (_, is_train) in zip(labels, split, strict=True):
        per_class.setdefault(cid, []).append(int(is_train))
    assert all(sorted(v) == [0, 0, 0, 1, 1, 1] for v in per_class.values())
    assert len(boxes) == 24 and all(len(r) == 5 for r in boxes)
    assert [r[1] for r in _rows(small / "parts" / "parts.txt")] == list(PART_NAMES)
    assert len(_rows(small / "parts" / "part_locs.txt")) == 24 * len(PART_NAMES)
    meta = json.loads((small / "synth.json").read_text())
    assert (meta["classes"], meta["per_class"], meta["size"], meta["seed"]) == (4, 6, 64, 3)
    assert [c["name"] for c in meta["class_definitions"]] == [r[1][4:] for r in classes]


def test_keypoints_lie_inside_box_and_image_when_visible(small):
    boxes = {int(r[0]): [float(v) for v in r[1:]] for r in _rows(small / "bounding_boxes.txt")}
    visible_count = 0
    for iid, _pid, x, y, vis in ([int(r[0]), int(r[1]), float(r[2]), float(r[3]), int(r[4])]
                                 for r in _rows(small / "parts" / "part_locs.txt")):
        bx, by, bw, bh = boxes[iid]
        assert min(bx, by) >= 0 and bx + bw <= 64 and by + bh <= 64 and bw > 0 and bh > 0
        if vis:
            visible_count += 1
            assert 0 <= x < 64 and 0 <= y < 64
            assert bx - 1 <= x <= bx + bw + 1 and by - 1 <= y <= by + bh + 1
        else:
            assert (x, y) == (0.0, 0.0)
    assert visible_count > 0.8 * 24 * len(PART_NAMES)


def test_at_least_five_parts_and_parts_are_drawn_at_their_keypoints():
    assert len(PART_NAMES) >= 5 and len(CLASS_PARTS) >= 5
    # the head's colour is a class attribute: at a visible head keypoint the pixel is close to that hue
    birds = class_definitions(12)
    hits, total = 0, 0
    for i in range(40):
        bird = birds[i % 12]
        out = render_bird(bird, 160, instance_rng(11, i))
        x, y, vis = out.parts[PART_NAMES.index("head")]
        if not vis:
            continue
        total += 1
        pixel = out.image[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3].reshape(-1, 3).mean(0)
        ref = np.array(synth.COLOURS[bird.attributes["head"]["colour"]], float)
        hits += int(np.linalg.norm(pixel - ref) < 90)
    assert total >= 30 and hits >= 0.8 * total


def test_same_seed_gives_identical_bytes_and_new_seed_new_images_same_classes(tmp_path, small):
    again = tmp_path / "again"
    generate_dataset(again, classes=4, per_class=6, size=64, seed=3, workers=2)
    first, second = _tree(small), _tree(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []

    other = tmp_path / "other"
    generate_dataset(other, classes=4, per_class=6, size=64, seed=4)
    third = _tree(other)
    assert third["classes.txt"] == first["classes.txt"]
    meta, meta_other = json.loads(first["synth.json"]), json.loads(third["synth.json"])
    assert meta_other["class_definitions"] == meta["class_definitions"] and meta_other["seed"] == 4
    images = [k for k in first if k.endswith(".jpg")]
    assert sum(first[k] != third[k] for k in images) == len(images)


def test_cli_and_library_write_identical_files(tmp_path, small):
    out = tmp_path / "cli" / "ds"
    assert synth_main(["--out", str(out), "--classes", "4", "--per-class", "6", "--size", "64", "--seed", "3"]) == 0
    assert _tree(out) == _tree(small)


def _differing_parts(a: synth.BirdClass, b: synth.BirdClass) -> int:
    return sum(a.attributes[p] != b.attributes[p] for p in CLASS_PARTS)


@pytest.mark.parametrize("n", [2, 12, 30, 139, 200])
def test_classes_are_distinct_and_most_pairs_differ_in_one_or_two_parts(n):
    birds = class_definitions(n)
    assert len({b.name for b in birds}) == n
    dists = [_differing_parts(a, b) for a, b in itertools.combinations(birds, 2)]
    assert min(dists) >= 1
    close = sum(d <= 2 for d in dists) / len(dists)
    assert close >= (1.0 if n <= 139 else 0.5)
    for bird in birds:
        for part in CLASS_PARTS:
            for attr, value in bird.attributes[part].items():
                assert value in synth.ATTRIBUTES[part][attr]


def test_classes_depend_only_on_the_count():
    assert class_definitions(30)[:12] == class_definitions(12)
    assert class_definitions(12) == class_definitions(12)
    # changes are spread over all attribute parts, not piled on one
    changed = [p for b in class_definitions(13) for p in b.changed]
    assert set(changed) == set(CLASS_PARTS)


@pytest.mark.parametrize("n", [2, 8, 12, 16, 32])
def test_combo_classes_need_several_parts(n):
    birds = class_definitions(n, "combo")
    assert birds[0].changed == () and len({b.name for b in birds}) == n
    assert birds == class_definitions(32, "combo")[:n]
    assert [len(b.changed) for b in birds] == sorted(len(b.changed) for b in birds)
    assert all(len(b.changed) == 2 for b in birds[1:16])
    # any two classes differ in at least two parts, so no single part separates every pair
    assert min(_differing_parts(a, b) for a, b in itertools.combinations(birds, 2)) >= 2
    for bird in birds:
        for part in CLASS_PARTS:
            for attr, value in bird.attributes[part].items():
                assert value in synth.ATTRIBUTES[part][attr]
    if n >= 8:
        # each part takes at least two states and no part state belongs to a single class
        for part in CLASS_PARTS:
            states = [json.dumps(b.attributes[part], sort_keys=True) for b in birds]
            counts = {state: states.count(state) for state in states}
            assert len(counts) >= 2 and min(counts.values()) >= 2, (part, counts)
    with pytest.raises(SynthError, match="for design combo") as info:  # the library names parameters, not flags
        class_definitions(33, "combo")
    assert info.value.parameters == ("classes", "design")
    with pytest.raises(SynthError, match="^design must be one of"):
        class_definitions(4, "grid")


def test_design_is_recorded_and_changes_only_the_classes(tmp_path, small):
    combo = tmp_path / "combo"
    assert synth_main(["--out", str(combo), "--classes", "4", "--per-class", "6", "--size", "64", "--seed", "3",
                       "--design", "combo"]) == 0
    meta = json.loads((combo / "synth.json").read_text())
    assert meta["design"] == "combo" and meta["command"].endswith("--design combo")
    assert [c["name"] for c in meta["class_definitions"]] == [b.name for b in class_definitions(4, "combo")]
    plain = json.loads((small / "synth.json").read_text())
    assert plain["design"] == "single" and "--design" not in plain["command"]
    assert [c["name"] for c in meta["class_definitions"]] != [c["name"] for c in plain["class_definitions"]]


def _histograms(paths: list[Path]) -> dict[str, np.ndarray]:
    rgb, hs = [], []
    for path in paths:
        img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        q = (img // 32).astype(np.int64)
        rgb.append(np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), minlength=512))
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hs.append(cv2.calcHist([hsv], [0, 1], None, [18, 4], [0, 180, 0, 256]).ravel())
    return {name: np.stack(h).astype(np.float64) / np.stack(h).sum(1, keepdims=True)
            for name, h in (("rgb", rgb), ("hue-sat", hs))}


def test_global_colour_histograms_do_not_separate_classes(tmp_path):
    n = 12
    out = tmp_path / "hist"
    generate_dataset(out, classes=n, per_class=20, size=96, seed=0)
    images = {int(r[0]): out / "images" / r[1] for r in _rows(out / "images.txt")}
    labels = np.array([int(r[1]) - 1 for r in _rows(out / "image_class_labels.txt")])
    train = np.array([r[1] == "1" for r in _rows(out / "train_test_split.txt")])
    feats = _histograms([images[i] for i in sorted(images)])
    for name, x in feats.items():
        centroids = np.stack([x[train & (labels == c)].mean(0) for c in range(n)])
        dist = ((x[~train][:, None, :] - centroids[None]) ** 2).sum(-1)
        accuracy = float((dist.argmin(1) == labels[~train]).mean())
        assert accuracy <= 2.0 / n, f"{name}: nearest-centroid accuracy {accuracy:.3f} > 2 × chance"
    # sanity of the probe itself: the same histograms do separate classes that differ in global colour
    shifted = feats["rgb"].copy()
    shifted[np.arange(len(labels)), labels * 40] += 0.2
    centroids = np.stack([shifted[train & (labels == c)].mean(0) for c in range(n)])
    dist = ((shifted[~train][:, None, :] - centroids[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == labels[~train]).mean() > 0.9


def test_cli_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synth_main(["--out", str(out), "--classes", "2", "--per-class", "4", "--size", "48", "--seed", "1",
                       "--test-fraction", "0.25"]) == 0
    assert "wrote 8 images (6 train / 2 test)" in capsys.readouterr().out
    assert sorted(r[1] for r in _rows(out / "train_test_split.txt")) == ["0", "0"] + ["1"] * 6
    # a previous synth output may be overwritten in place
    assert synth_main(["--out", str(out), "--classes", "3", "--per-class", "2", "--size", "48"]) == 0
    assert len(_rows(out / "images.txt")) == 6
    assert not [p for p in tmp_path.iterdir() if p.name != "cli"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--classes", "1", "--per-class", "2"], "--classes must be"),
        (["--classes", "3", "--per-class", "0"], "--per-class must be"),
        (["--classes", "3", "--per-class", "1"], "cannot be split"),
        (["--classes", "3", "--per-class", "2", "--size", "8"], "--size must be"),
        (["--classes", "3", "--per-class", "2", "--seed", "-1"], "--seed must be"),
        (["--classes", "3", "--per-class", "2", "--test-fraction", "1.5"], "--test-fraction must be"),
        (["--classes", "99999", "--per-class", "2"], "--classes must be between 2 and"),
        (["--classes", "three", "--per-class", "2"], "invalid int value"),
        (["--classes", "3", "--per-class", "2", "--object-scale", "9"], "--object-scale must be"),
    ],
)
def test_cli_rejects_bad_arguments_clearly(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert synth_main(["--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_refuses_foreign_non_empty_directory(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert synth_main(["--out", str(out), "--classes", "2", "--per-class", "2", "--size", "48"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not a previous 'mcloss synth' output" in err
    assert (out / "thesis.tex").read_text() == "precious" and len(list(out.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(SynthError, match="exists and is not a directory"):
        generate_dataset(tmp_path / "file", 2, 2, 48, 0)
    assert synth_main(["--out", str(tmp_path / "file" / "sub"), "--classes", "2", "--per-class", "2"]) == 2
    assert f"{tmp_path / 'file'} is not a directory" in capsys.readouterr().err


def test_failure_midway_leaves_previous_output_and_no_temporaries(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    generate_dataset(out, 2, 2, 48, 0)
    before = _tree(out)
    calls = []

    def broken(job):
        calls.append(job)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(job)

    original = writing._render_job
    monkeypatch.setattr(writing, "_render_job", broken)
    with pytest.raises(OSError, match="disk full"):
        generate_dataset(out, 2, 4, 48, 1)
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_render_is_deterministic_and_annotations_match_pose():
    bird = class_definitions(5)[4]
    a = render_bird(bird, 128, instance_rng(7, 3))
    b = render_bird(bird, 128, instance_rng(7, 3))
    c = render_bird(bird, 128, instance_rng(7, 4))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.parts, b.parts) and a.bbox == b.bbox
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.uint8 and a.image.shape == (128, 128, 3)
    assert a.parts.shape == (len(PART_NAMES), 3)


def test_object_scale_enlarges_the_bird_and_is_recorded(tmp_path):
    sizes = {}
    for scale in (1.0, 1.6):
        out = tmp_path / f"s{scale}"
        generate_dataset(out, classes=3, per_class=4, size=96, seed=5, object_scale=scale)
        boxes = np.array([[float(v) for v in row[1:]] for row in _rows(out / "bounding_boxes.txt")])
        sizes[scale] = np.median(boxes[:, 2] * boxes[:, 3])
        meta = json.loads((out / "synth.json").read_text())
        assert meta["object_scale"] == scale
        assert ("--object-scale 1.6" in meta["command"]) == (scale == 1.6)
    assert sizes[1.6] > 1.8 * sizes[1.0]  # area grows roughly with the square of the scale (cropping limits it)


def test_output_directory_gets_the_mode_of_a_plain_new_directory(small, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert small.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkdtemp's private 0700


# ------------------------------------------------------------------------------------------------- masks

#: sha256 of the images of ``small`` (relative path + JPEG bytes, sorted) and of its annotation files, and of
#: six 64-px renders (raw RGB pixels; their JPEG bytes), computed before part masks existed: adding the masks
#: must not change the random stream or a single image byte. (JPEG bytes pin the OpenCV build's libjpeg.)
#: part_locs.txt's digest is the one after keypoints were moved onto their parts (issue 26 item 9; before:
#: 7ebc7e84…, which differed only in the legs' keypoints and one belly keypoint).
_DATASET_SHA256 = "654e64eb0a44d5e7ab684870a87c7b717b6fdf377b163caa5336e5bfde784e4f"
_ANNOTATION_SHA256 = {
    "bounding_boxes.txt": "e53404409a583ef10506c0df40b39fa82d4906e4129465e11731be45329fe3f0",
    "parts/part_locs.txt": "d29f204f01790edf69c8e6a978da25c672458b2a9b8e1a2ad5506244f76b7e3e",
}
_RENDER_SHA256 = {"pixels": "1cdabcf70039c799", "jpeg": "2c438add73b70289"}


def test_images_and_annotations_are_byte_identical_to_before_masks(small):
    import hashlib

    from mcloss.data.io import encode_image

    digest = hashlib.sha256()
    for path in sorted((small / "images").rglob("*.jpg")):
        digest.update(path.relative_to(small).as_posix().encode())
        digest.update(path.read_bytes())
    assert digest.hexdigest() == _DATASET_SHA256
    for rel, expected in _ANNOTATION_SHA256.items():
        assert hashlib.sha256((small / rel).read_bytes()).hexdigest() == expected, rel
    pixels, jpeg = hashlib.sha256(), hashlib.sha256()
    for i, bird in enumerate(class_definitions(6)):
        image = render_bird(bird, 64, instance_rng(3, i)).image
        pixels.update(image.tobytes())
        jpeg.update(encode_image(image, "jpeg", quality=90))
    assert pixels.hexdigest()[:16] == _RENDER_SHA256["pixels"] and jpeg.hexdigest()[:16] == _RENDER_SHA256["jpeg"]


def test_masks_are_written_beside_the_images_in_cub_segmentation_layout(small):
    meta = json.loads((small / "synth.json").read_text())
    assert meta["version"] == 2
    assert meta["masks"]["labels"] == {"0": "background or occluder", **{str(i + 1): p for i, p in enumerate(PART_NAMES)},
                                       str(synth.BODY_LABEL): "body"}
    assert synth.BODY_LABEL == len(PART_NAMES) + 1 == 8
    images = [r[1] for r in _rows(small / "images.txt")]
    for rel in images:
        png = rel[: -len(".jpg")] + ".png"
        seg = cv2.imread(str(small / "segmentations" / png), cv2.IMREAD_UNCHANGED)
        labels = cv2.imread(str(small / "part_masks" / png), cv2.IMREAD_UNCHANGED)
        assert seg.shape == labels.shape == (64, 64) and seg.dtype == labels.dtype == np.uint8
        assert set(np.unique(seg).tolist()) <= {0, 255} and labels.max() <= synth.BODY_LABEL
        np.testing.assert_array_equal(seg, np.where(labels > 0, 255, 0))
    # the label map of each file is exactly the rendered one (lossless)
    birds = class_definitions(4)
    for index in (0, 7, 23):
        rendered = render_bird(birds[index // 6], 64, instance_rng(3, index))
        labels = cv2.imread(str(small / "part_masks" / (images[index][:-4] + ".png")), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(labels, rendered.labels)
    assert sorted(p.name for p in small.iterdir()) == sorted(
        ["bounding_boxes.txt", "classes.txt", "image_class_labels.txt", "images", "images.txt", "part_masks",
         "parts", "segmentations", "synth.json", "train_test_split.txt"])


def test_part_labels_agree_with_keypoints_and_cover_the_bird():
    birds = class_definitions(12)
    at_point = {p: [] for p in PART_NAMES}
    dominant = {p: [] for p in PART_NAMES}
    for i in range(40):
        out = render_bird(birds[i % 12], 160, instance_rng(11, i))
        assert out.labels.shape == (160, 160) and out.labels.dtype == np.uint8
        assert set(np.unique(out.labels).tolist()) <= set(range(synth.BODY_LABEL + 1))
        # the bird's box holds every labelled pixel
        ys, xs = np.nonzero(out.labels)
        x, y, w, h = out.bbox
        assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h
        for k, name in enumerate(PART_NAMES):
            px, py, visible = out.parts[k]
            if not visible:
                continue
            xi, yi = int(px), int(py)
            at_point[name].append(out.labels[yi, xi] == k + 1)
            window = out.labels[max(0, yi - 4) : yi + 5, max(0, xi - 4) : xi + 5]
            parts = window[(window > 0) & (window != synth.BODY_LABEL)]
            dominant[name].append(parts.size > 0 and np.bincount(parts).argmax() == k + 1)
    for name in PART_NAMES:
        assert len(dominant[name]) >= 30, name
        assert np.mean(dominant[name]) >= 0.9, name
        assert all(at_point[name]), name  # every visible keypoint on its own part, the legs' too


def test_every_visible_keypoint_lies_on_a_pixel_of_its_part_in_the_written_masks(tmp_path):
    # fresh images as the shipped default's fresh-seed set makes them (bigger birds, varied design): the
    # legs' centre lies between the two legs, and occluders or overlaps push some other centres off their part
    out = tmp_path / "fresh"
    generate_dataset(out, classes=12, per_class=6, size=160, seed=1, test_fraction=1.0, object_scale=1.6, design="varied")
    ds = CUBDataset(out, split="all")
    assert ds.has_part_masks and ds.part_names == list(PART_NAMES)
    seen = dict.fromkeys(PART_NAMES, 0)
    for record in ds.records:
        labels = ds.part_labels(record)
        for k, name in enumerate(PART_NAMES):
            x, y, visible = record.parts[k].tolist()
            if not visible:
                assert (x, y) == (0.0, 0.0)
                continue
            seen[name] += 1
            assert labels[int(math.floor(y)), int(math.floor(x))] == k + 1, (record.path.name, name, x, y)
    assert min(seen.values()) >= 0.8 * len(ds), seen


def test_occluders_are_background_in_the_label_map(monkeypatch):
    from mcloss.data.synth import drawing

    original = drawing._draw_clutter
    captured: list[np.ndarray] = []

    def capture(img, rng, count, scale, mask=None):
        original(img, rng, count, scale, mask)
        if mask is not None:
            captured.append(mask.copy())

    def no_mask(img, rng, count, scale, mask=None):
        original(img, rng, count, scale, None)  # same random draws, nothing recorded as occluded

    bird = class_definitions(3)[1]
    covered = 0
    for i in range(30):
        captured.clear()
        monkeypatch.setattr(drawing, "_draw_clutter", capture)
        occluded = render_bird(bird, 96, instance_rng(5, i))
        monkeypatch.setattr(drawing, "_draw_clutter", no_mask)
        whole = render_bird(bird, 96, instance_rng(5, i))
        np.testing.assert_array_equal(occluded.image, whole.image)
        if not captured:
            np.testing.assert_array_equal(occluded.labels, whole.labels)
            continue
        mask = captured[0] > 0
        assert not occluded.labels[mask].any()
        np.testing.assert_array_equal(occluded.labels, np.where(mask, 0, whole.labels))
        covered += int(np.count_nonzero(whole.labels[mask]) > 0)
    assert covered >= 2  # some occluders did cover the bird


def test_varied_design_keeps_only_the_defining_parts_fixed(tmp_path):
    combo, varied = class_definitions(12, "combo"), class_definitions(12, "varied")
    assert [c.name for c in varied] == [c.name for c in combo]
    assert [c.changed for c in varied] == [c.changed for c in combo] and not any(c.varies for c in combo)
    for bird in varied:
        assert set(bird.varies) == set(CLASS_PARTS) - set(bird.changed)
        seen = {part: set() for part in bird.varies}
        for i in range(60):
            attrs = bird.instance_attributes(instance_rng(0, i))
            for part in CLASS_PARTS:
                if part in bird.changed:  # a defining part always shows the class's value
                    assert attrs[part] == bird.attributes[part]
                else:
                    (name,) = bird.varies[part]
                    seen[part].add(attrs[part][name])
        for part, values in seen.items():
            (name,) = bird.varies[part]
            # the varying attribute takes its other values, never the value some class defines there
            defining_value = next(c.attributes[part][name] for c in varied if part in c.changed)
            assert defining_value not in values and len(values) >= 2
            assert values <= set(bird.varies[part][name])
    out = tmp_path / "varied"
    generate_dataset(out, classes=4, per_class=2, size=64, seed=0, design="varied")
    meta = json.loads((out / "synth.json").read_text())
    assert meta["design"] == "varied" and all("varies" in c for c in meta["class_definitions"])
