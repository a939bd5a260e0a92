"""A class's defining parts beside its maps: the ratios and sentence, the annotation lookup, the export json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model
from PIL import Image

import mcloss
from mcloss.cli.export import main as export_main
from mcloss.core.transforms import Geometry
from mcloss.data.annotations import PartAnnotations, image_annotations
from mcloss.explainability import defining as D
from mcloss.explainability.explanation import Explanation, GroupMaps
from mcloss.explainability.geometry import channel_peaks, crop_mask
from mcloss.explainability.outputs import explanation_record
from mcloss.metrics import mass

PARTS = ("head", "wing", "tail")
SIZE = 40


def _regions() -> np.ndarray:
    """Rows 0-9 head, 10-19 wing, 20-29 tail, the rest body (label 4 = P + 1)."""
    labels = np.full((SIZE, SIZE), 4, np.uint8)
    for i in range(3):
        labels[10 * i : 10 * (i + 1)] = i + 1
    return labels


def _group(channels: np.ndarray, name: str = "Green_Wing") -> GroupMaps:
    peaks, values = channel_peaks(channels)
    return GroupMaps(
        target=0, name=name, channels=channels, ccmp=channels.max(0), peaks_feature=peaks,
        peaks_xy=peaks.astype(np.float64) + 0.5, peak_values=values,
    )  # fmt: skip


IDENTITY = Geometry(original=(SIZE, SIZE), resized=(SIZE, SIZE), crop=(0, 0, SIZE, SIZE))
CARD = {"defining_parts": {"Green_Wing": ["wing"], "Plain": []}}


def _planted() -> np.ndarray:
    """Channel 1 exactly on the wing, channel 2 uniform (maps at image resolution: upsampling is exact)."""
    on_wing = (_regions() == 2).astype(np.float32)
    return np.stack([on_wing, np.full((SIZE, SIZE), 0.5, np.float32)])


def test_a_map_on_the_defining_parts_hits_the_clip_and_a_uniform_one_is_one():
    annotations = PartAnnotations(PARTS, labels=_regions())
    chans = _planted()
    s = D.defining_summary(CARD, _group(chans[:1]), IDENTITY, annotations)
    assert s.parts == ("wing",) and s.indices == (1,) and s.source == D.SOURCE_IMAGE and s.located
    assert s.ccmp == mass.RATIO_CLIP and s.channels == pytest.approx(mass.RATIO_CLIP)
    assert s.sentence == (
        "On this image, the CCMP map of Green_Wing puts ≥1000× as much mass per area on wing as on the other "
        "parts (1× = no preference); its channels ≥1000× (geometric mean)."
    )

    uniform = D.defining_summary(CARD, _group(chans[1:]), IDENTITY, annotations)
    assert uniform.ccmp == pytest.approx(1.0) and uniform.channels == pytest.approx(1.0)
    assert uniform.sentence == (
        "On this image, the CCMP map of Green_Wing puts 1.0× as much mass per area on wing as on the other "
        "parts (1× = no preference); its channels 1.0× (geometric mean)."
    )
    # both channels: CCMP = max(on wing, 0.5): 1 on the wing, 0.5 elsewhere; channels: sqrt(1000 · 1)
    both = D.defining_summary(CARD, _group(chans), IDENTITY, annotations)
    assert both.ccmp == pytest.approx(2.0)
    assert both.channels == pytest.approx(math.sqrt(mass.RATIO_CLIP))
    assert both.sentence.endswith("puts 2.0× as much mass per area on wing as on the other parts "
                                  "(1× = no preference); its channels 32× (geometric mean).")
    assert both.record() == {"ccmp": both.ccmp, "channels": both.channels, "source": "image"}


def test_regions_from_keypoints_use_the_hit_radius_and_the_crop():
    kps = np.array([[5.0, 5.0, 1], [30.0, 20.0, 1], [10.0, 30.0, 1]])
    annotations = PartAnnotations(PARTS, keypoints=kps)
    regions = D.part_regions(annotations, IDENTITY, radius=0.1)
    np.testing.assert_array_equal(regions, mass.keypoint_regions(kps, (SIZE, SIZE), 4.0))
    wing = (regions == 2).astype(np.float32)
    s = D.defining_summary(CARD, _group(wing[None] + 0.1), IDENTITY, annotations, radius=0.1)
    want = mass.mass_ratio(wing + 0.1, regions, [1], 3)
    assert s.ccmp == pytest.approx(want) and s.channels == pytest.approx(want)

    # a centre crop that leaves the wing (x = 30) out: no figure on the image, the card's instead
    geo = Geometry(original=(SIZE, SIZE), resized=(SIZE, SIZE), crop=(0, 0, 20, SIZE))
    assert not crop_mask(geo)[20, 30]
    card = CARD | {"parts": {"defining": {"per_class": {"Green_Wing": {"mass_ratio_ccmp": 1.37, "mass_ratio_channels": None}}}}}
    s = D.defining_summary(card, _group(np.ones((1, SIZE, 20), np.float32)), geo, annotations, radius=0.1)
    assert s.located and s.source == D.SOURCE_CARD and (s.ccmp, s.channels) == (1.37, None)
    assert s.sentence == (
        "On the fresh-seed set, the CCMP map of Green_Wing puts 1.4× as much mass per area on wing as on the "
        "other parts (1× = no preference)."
    )


def test_without_annotations_the_card_figure_is_shown_and_said_so():
    card = {"defining_parts": {"Green_Wing": ["wing", "tail"]},
            "parts": {"defining": {"per_class": {"Green_Wing": {"mass_ratio_ccmp": 2.345, "mass_ratio_channels": 1.8}}}}}
    s = D.defining_summary(card, _group(_planted()), IDENTITY)
    assert (s.ccmp, s.channels, s.source, s.indices, s.located) == (2.345, 1.8, "fresh-set card", (), False)
    assert s.sentence == (
        "On the fresh-seed set, the CCMP map of Green_Wing puts 2.3× as much mass per area on wing and tail "
        "as on the other parts (1× = no preference); its channels 1.8× (geometric mean)."
    )
    assert s.record() == {"ccmp": 2.345, "channels": 1.8, "source": "fresh-set card"}
    bare = D.defining_summary({"defining_parts": {"Green_Wing": ["wing"]}}, _group(_planted()), IDENTITY)
    assert bare.parts == ("wing",) and bare.source is None and bare.sentence is None and bare.record() is None


def test_nothing_without_defining_parts():
    group = _group(_planted())
    assert not D.has_defining_parts({}) and D.has_defining_parts({"defining_parts": {}})
    assert D.defining_summary({}, group, IDENTITY) is None
    assert D.defining_summary({"defining_parts": {"Plain": []}}, group, IDENTITY) is None
    assert D.defining_summary(CARD, _group(_planted(), name="Plain"), IDENTITY) is None
    exp = Explanation((SIZE, SIZE), IDENTITY, (SIZE, SIZE), np.array([1.0]), np.array([1.0]), [group])
    assert D.defining_summaries({"run_id": "x"}, exp) == [None]
    entry = explanation_record(exp)["targets"][0]
    assert entry["defining_parts"] == [] and "defining_mass_ratio" not in entry
    entry = explanation_record(exp, defining=D.defining_summaries(CARD, exp, PartAnnotations(PARTS, labels=_regions())))
    assert entry["targets"][0]["defining_parts"] == ["wing"]
    assert entry["targets"][0]["defining_mass_ratio"]["source"] == "image"


def test_cub_regions_cover_their_parts():
    assert D.defining_indices(["wing", "beak"], ["beak", "left wing", "right wing", "tail"]) == [0, 1, 2]
    assert D.defining_indices(["crest"], ["beak"]) == []


def test_wording():
    assert [D.format_ratio(v) for v in (2.345, 1.0, 9.97, 23.4, 0.45, 0.042, 1000.0, 0.001)] == [
        "2.3×", "1.0×", "10×", "23×", "0.45×", "0.042×", "≥1000×", "≤0.001×",
    ]  # fmt: skip
    assert [D.join_names(n) for n in (["wing"], ["wing", "tail"], ["head", "wing", "tail"])] == [
        "wing", "wing and tail", "head, wing and tail",
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------- export


def _cub(root: Path, with_masks: bool = True) -> Path:
    """A two-class CUB-layout dataset with 3 parts: keypoints for both images, part masks for the first."""
    rng = np.random.default_rng(0)
    for folder in ("001.Green_Wing", "002.Plain"):
        (root / "images" / folder).mkdir(parents=True)
    files = ["001.Green_Wing/a.png", "002.Plain/b.png"]
    for rel in files:
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "images" / rel)
    (root / "images.txt").write_text("1 001.Green_Wing/a.png\n2 002.Plain/b.png\n")
    (root / "classes.txt").write_text("1 001.Green_Wing\n2 002.Plain\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 2\n")
    (root / "train_test_split.txt").write_text("1 0\n2 0\n")
    (root / "parts").mkdir()
    (root / "parts" / "parts.txt").write_text("1 head\n2 wing\n3 tail\n")
    locs = [f"{i} {p} {x} {y} 1" for i in (1, 2) for p, (x, y) in enumerate([(5, 5), (30, 15), (10, 25)], 1)]
    (root / "parts" / "part_locs.txt").write_text("\n".join(locs) + "\n")
    if with_masks:
        (root / "part_masks" / "001.Green_Wing").mkdir(parents=True)
        Image.fromarray(_regions()).save(root / "part_masks" / "001.Green_Wing" / "a.png")
    return root


def _checkpoint(tmp_path: Path, card: dict | None) -> Path:
    model = tiny_model(2, class_names=["Green_Wing", "Plain"])
    if card is not None:
        model.card.update(card)
    path = tmp_path / f"ck-{card is not None}.safetensors"
    mcloss.save_checkpoint(model, path)
    return path


def test_image_annotations_from_a_cub_layout(tmp_path):
    root = _cub(tmp_path / "cub")
    a = image_annotations(root / "images" / "001.Green_Wing" / "a.png")
    assert a.part_names == PARTS and a.keypoints.shape == (3, 3)
    np.testing.assert_array_equal(a.labels, _regions())
    b = image_annotations(root / "images" / "002.Plain" / "b.png")
    assert b.labels is None and b.keypoints[:, 2].tolist() == [1, 1, 1]
    Image.new("RGB", (8, 8)).save(tmp_path / "stray.png")
    assert image_annotations(tmp_path / "stray.png") is None


def test_export_json_carries_defining_parts_and_the_image_figure(tmp_path):
    root = _cub(tmp_path / "cub")
    stray = tmp_path / "stray.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(stray)
    card = {
        "defining_parts": {"Green_Wing": ["wing"], "Plain": []},
        "parts": {"defining": {"per_class": {"Green_Wing": {"mass_ratio_ccmp": 1.5, "mass_ratio_channels": 1.2}}}},
    }
    ckpt = _checkpoint(tmp_path, card)
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--input", str(root / "images"), str(stray), "--out", str(out),
            "--target", "top2", "--workers", "0", "--no-progress", "--tile-height", "32"]  # fmt: skip
    assert export_main(args) == 0
    model = mcloss.load_checkpoint(ckpt)
    rec = json.loads((out / "images" / "001.Green_Wing" / "a.png.json").read_text())
    by_name = {t["name"]: t for t in rec["targets"]}
    assert by_name["Plain"]["defining_parts"] == [] and "defining_mass_ratio" not in by_name["Plain"]
    green = by_name["Green_Wing"]
    assert green["defining_parts"] == ["wing"]
    # the image's own figure, from its part mask, as defining_summary computes it
    exp = mcloss.explain(model, root / "images" / "001.Green_Wing" / "a.png", [["top2"]])
    gm = next(g for g in exp.groups if g.name == "Green_Wing")
    want = D.defining_summary(model.card, gm, exp.geometry, PartAnnotations(PARTS, labels=_regions()))
    assert green["defining_mass_ratio"]["source"] == "image"
    assert green["defining_mass_ratio"]["ccmp"] == pytest.approx(want.ccmp, rel=1e-5)
    assert green["defining_mass_ratio"]["channels"] == pytest.approx(want.channels, rel=1e-5)
    # keypoints only (no mask for b.png) still give an image figure; outside a dataset: the card's
    rec_b = json.loads((out / "images" / "002.Plain" / "b.png.json").read_text())
    green_b = next(t for t in rec_b["targets"] if t["name"] == "Green_Wing")
    assert green_b["defining_mass_ratio"]["source"] == "image"
    rec_s = json.loads((out / "stray.png.json").read_text())
    green_s = next(t for t in rec_s["targets"] if t["name"] == "Green_Wing")
    assert green_s["defining_mass_ratio"] == {"ccmp": 1.5, "channels": 1.2, "source": "fresh-set card"}


def test_export_json_without_defining_parts_in_the_card(tmp_path):
    root = _cub(tmp_path / "cub")
    ckpt = _checkpoint(tmp_path, None)
    out = tmp_path / "out"
    assert export_main(["--checkpoint", str(ckpt), "--input", str(root / "images"), "--out", str(out),
                        "--target", "top2", "--workers", "0", "--no-progress", "--tile-height", "32"]) == 0
    rec = json.loads((out / "images" / "001.Green_Wing" / "a.png.json").read_text())
    for t in rec["targets"]:
        assert t["defining_parts"] == [] and "defining_mass_ratio" not in t
