"""The "distinct parts" claim, counted: each channel's part, coverage of the defining parts, duplicates and
their chance, on hand-made peaks with known answers, then through ``mcloss parts`` and the atlas."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from test_parts import part_layouts, planted_model, write_cub, write_masks

import mcloss
from mcloss.cli import main as cli_main
from mcloss.cli.atlas import summary_markdown
from mcloss.core.errors import ParameterError
from mcloss.data.cub import CUBDataset
from mcloss.data.defining import synth_defining_parts
from mcloss.data.synth import generate_dataset
from mcloss.evaluation import parts as P
from mcloss.evaluation.parts_report import coverage_markdown, coverage_table, summary_table
from mcloss.explainability.atlas import AtlasInputs, build_atlas
from mcloss.metrics import coverage as C

N = C.NO_PART

# ------------------------------------------------------------------------------------------ one channel


@pytest.mark.parametrize(
    ("peaks", "want"),
    [
        ([2, 2, 2, 2], (2, 1.0, "part")),
        ([2, 2, 5, N], (2, 0.5, "part")),  # a plurality is enough
        ([N, N, N], (N, 1.0, "none")),  # all on the background (or the body)
        ([3, N, N], (N, 2 / 3, "none")),  # "no part" most frequent: no part
        ([0, 0, 1, 1], (N, 0.5, "tie")),  # a tie between parts is not broken by part order
        ([0, 0, N, N], (N, 0.5, "tie")),  # nor between a part and "no part"
        ([0, 0, 1, 1, 1], (1, 0.6, "part")),
    ],
)
def test_channel_part_is_the_plurality_with_ties_and_no_part_as_none(peaks, want):
    part, share, status = C.channel_part(peaks)
    assert (part, status) == (want[0], want[2]) and share == pytest.approx(want[1])


def test_a_channel_without_peaks():
    part, share, status = C.channel_part([])
    assert part == N and np.isnan(share) and status == "no peaks"


# ---------------------------------------------------------------------------------------------- a group


def test_full_coverage_with_one_duplicate():
    # channel 1 on the head (0), channels 2 and 3 on the belly (5); defining: head and belly
    peaks = [[0, 5, 5], [0, 5, 5], [0, 5, N], [0, 4, 5]]
    g = C.group_coverage(peaks, [[0], [5]])
    assert g["channel_parts"] == [0, 5, 5] and g["channel_status"] == ["part"] * 3
    assert g["channel_shares"] == pytest.approx([1.0, 0.75, 0.75])
    assert g["full"] and g["covered"] == [0, 1] and g["missed"] == [] and g["covered_count"] == 2
    assert g["distinct_parts"] == 2 and g["duplicates"] == 1
    assert g["shared"] == {5: [1, 2]} and g["channels_on_shared_part"] == 2
    assert g["channels_with_part"] == 3 and g["images"] == 4 and g["chance"] is None


def test_a_missed_defining_part():
    g = C.group_coverage([[0, 1, 2]] * 3, [[0], [3]])
    assert not g["full"] and g["covered"] == [0] and g["missed"] == [1] and g["covered_count"] == 1
    assert g["distinct_parts"] == 3 and g["duplicates"] == 0
    assert g["shared"] == {} and g["channels_on_shared_part"] == 0


def test_all_background_channels_cover_nothing_and_share_nothing():
    g = C.group_coverage([[N, N, 2], [N, N, 2]], [[2], [4]])
    assert g["channel_parts"] == [N, N, 2] and g["channel_status"] == ["none", "none", "part"]
    assert g["covered"] == [0] and g["channels_with_part"] == 1 and g["distinct_parts"] == 1
    # two channels with no part share nothing
    assert g["duplicates"] == 0 and g["channels_on_shared_part"] == 0


def test_tied_channels_count_as_no_part():
    g = C.group_coverage([[0, 1], [1, 1], [0, N], [1, 1]], [[0], [1]])
    assert g["channel_parts"] == [N, 1] and g["channel_status"] == ["tie", "part"]
    assert g["covered_count"] == 1 and g["missed"] == [0]


def test_three_channels_on_one_part():
    g = C.group_coverage([[4, 4, 4]], [[4], [0]])
    assert g["distinct_parts"] == 1 and g["duplicates"] == 2 and g["channels_on_shared_part"] == 3
    assert g["shared"] == {4: [0, 1, 2]}


def test_a_region_is_covered_by_a_channel_on_any_of_its_parts():
    # a CUB region such as the head covers several parts: here parts 0 and 1
    g = C.group_coverage([[1, 6]], [[0, 1], [2]])
    assert g["covered"] == [0] and g["missed"] == [1]


def test_peaks_must_be_images_by_channels():
    with pytest.raises(ParameterError, match="peaks"):
        C.group_coverage([0, 1, 2], [[0]])


# ------------------------------------------------------------------------------------------------- chance


def test_chance_in_closed_form():
    # 4 parts of equal area, 2 channels with a part, defining parts 0 and 1
    c = C.chance_coverage([1, 1, 1, 1], [[0], [1]], 2)
    assert c["covered"] == pytest.approx(2 * (1 - 0.75**2))  # 0.875
    assert c["full"] == pytest.approx(2 * 0.25 * 0.25)  # one on each: 2 orders
    assert c["distinct"] == pytest.approx(4 * (1 - 0.75**2))  # 1.75
    assert c["duplicates"] == pytest.approx(0.25)  # both on one part: 1/4
    assert c["shared"] == pytest.approx(0.5)  # then both channels share it
    # one channel cannot cover two parts; a region of half the area
    assert C.chance_coverage([1, 1, 1, 1], [[0], [1]], 1)["full"] == pytest.approx(0.0)
    assert C.chance_coverage([1, 1, 1, 1], [[0, 1]], 3)["full"] == pytest.approx(1 - 0.5**3)


def test_chance_agrees_with_simulation():
    rng = np.random.default_rng(0)
    q = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    defining, m, n = [[1], [3, 4]], 3, 200_000
    draws = rng.choice(len(q), size=(n, m), p=q)
    covered = np.stack([np.isin(draws, g).any(axis=1) for g in defining], axis=1)
    distinct = np.array([len(set(row)) for row in draws[:20_000]])
    c = C.chance_coverage(q, defining, m)
    assert c["covered"] == pytest.approx(covered.sum(axis=1).mean(), abs=0.01)
    assert c["full"] == pytest.approx(covered.all(axis=1).mean(), abs=0.01)
    assert c["distinct"] == pytest.approx(distinct.mean(), abs=0.02)


def test_no_part_area_gives_no_chance():
    assert all(np.isnan(v) for v in C.chance_coverage([0, 0], [[0]], 2).values())


# ----------------------------------------------------------------------------------------- named classes


def test_class_coverage_names_parts_and_sums_over_classes():
    names = ["head", "beak", "crest", "wing"]
    peaks = {"A": [[0, 3, 3]] * 2, "B": [[N, 1, N]] * 2, "Base": [[0, 1, 2]] * 2}
    defining = {"A": {"head": [0], "wing": [3]}, "B": {"beak": [1], "crest": [2]}, "Base": {}}
    shares = {"A": [0.25] * 4, "B": [0.25] * 4}
    block = C.class_coverage(peaks, defining, names, shares)
    assert set(block["per_class"]) == {"A", "B"}  # no defining parts: not counted
    a, b = block["per_class"]["A"], block["per_class"]["B"]
    assert a["channel_parts"] == ["head", "wing", "wing"] and a["shared"] == {"wing": [2, 3]}
    assert a["covered"] == ["head", "wing"] and a["full"]
    assert b["channel_parts"] == [None, "beak", None] and b["missed"] == ["crest"]
    s = block["summary"]
    assert (s["classes"], s["fully_covered"], s["defining_parts"], s["defining_covered"]) == (2, 1, 4, 3)
    assert s["defining_covered_share"] == pytest.approx(0.75)
    assert s["distinct_parts_mean"] == pytest.approx(1.5)
    assert (s["duplicates"], s["channels_on_shared_part"]) == (1, 2)
    assert (s["channels_with_part"], s["channels"]) == (4, 6)
    # chance: A has 3 channels with a part, B one; four parts of equal area
    a3, b1 = C.chance_coverage([1] * 4, [[0], [3]], 3), C.chance_coverage([1] * 4, [[1], [2]], 1)
    assert s["chance"]["fully_covered"] == pytest.approx(a3["full"] + b1["full"])
    assert s["chance"]["defining_covered_share"] == pytest.approx((a3["covered"] + b1["covered"]) / 4)
    # without every class's shares there is no chance row
    assert C.class_coverage(peaks, defining, names, {"A": [0.25] * 4})["summary"]["chance"] is None
    text = coverage_markdown([("m", block)])
    assert "| m | 1 of 2 (chance" in text
    assert "| A | head, wing | 1: head (1.00); 2: wing (1.00); 3: wing (1.00) | 2 of 2 |" in text
    assert "| B | beak, crest | 1: no part; 2: beak (1.00); 3: no part | 1 of 2 (missed crest) |" in text


def test_unknown_defining_parts_are_said_not_zeroed():
    assert C.class_coverage({"A": [[0]]}, {}, ["head"])["summary"] is None
    assert "No defining parts known" in coverage_markdown([("m", None)])
    assert "No defining parts known" in coverage_table({"defining": {"source": None, "methods": {}}})
    # a block that knows its defining parts but was scored before they were counted (an older checkpoint card):
    # no coverage section rather than "No defining parts known"
    assert coverage_table({"defining": {"source": "dataset", "methods": {}}}) == ""


# ------------------------------------------------------------------------------------------ mcloss parts

# class_0: channels on red, green, red (defining: red and green); class_1: two channels on the white decoy
# (background) and one on blue (defining: green and blue)
ASSIGN = [["red", "green", "red"], ["white", "white", "blue"]]
DEFINING = {"class_0": ["red", "green"], "class_1": ["green", "blue"]}


@pytest.mark.parametrize("masks", [True, False])
def test_parts_counts_planted_channels(tmp_path, masks):
    layouts = part_layouts(6)
    root = write_cub(tmp_path / "cub", layouts, [0, 1, 0, 1, 0, 1], ["class_0", "class_1"])
    if masks:
        write_masks(root, layouts)
    summary = P.evaluate_parts(planted_model(ASSIGN), root, faithfulness=False, defining=DEFINING).summary
    block = summary["defining"]["coverage"]
    c0, c1 = block["per_class"]["class_0"], block["per_class"]["class_1"]
    assert c0["images"] == c1["images"] == 3
    assert c0["channel_parts"] == ["red", "green", "red"] and c0["full"] and c0["shared"] == {"red": [1, 3]}
    assert c1["channel_parts"] == [None, None, "blue"] and c1["channel_status"][:2] == ["none", "none"]
    assert c1["covered"] == ["blue"] and c1["missed"] == ["green"] and c1["duplicates"] == 0
    s = block["summary"]
    assert (s["fully_covered"], s["classes"], s["defining_covered"], s["defining_parts"]) == (1, 2, 3, 4)
    assert s["distinct_parts_mean"] == pytest.approx(1.5) and s["channels_on_shared_part"] == 2
    assert s["duplicates"] == 1 and s["channels_with_part"] == 4
    if masks:  # three parts of one feature cell each: a third of the part area each
        assert c0["chance"]["full"] == pytest.approx(1 - 2 * (2 / 3) ** 3 + (1 / 3) ** 3)
        assert c1["chance"]["full"] == pytest.approx(0.0)  # one channel with a part cannot cover two
        assert s["chance"]["defining_covered"] == pytest.approx(2 * (1 - (2 / 3) ** 3) + 2 / 3)
    text = summary_table(summary)
    assert "**Distinct parts, counted.**" in text
    assert "| this model | 1 of 2 (chance" in text and "3 of 4 = 0.750" in text
    row = "| class_1 | green, blue | 1: no part; 2: no part; 3: blue (1.00) | 1 of 2 (missed green) |"
    assert row in text


def test_parts_without_defining_parts_says_so(tmp_path):
    root = write_cub(tmp_path / "cub", part_layouts(2), [0, 0], ["class_0"])
    summary = P.evaluate_parts(planted_model([["red", "green", "blue"]]), root, faithfulness=False).summary
    assert "coverage" not in summary["defining"]
    assert "No defining parts known: coverage not counted." in summary_table(summary)


# ------------------------------------------------------------------------------------------------- atlas


def _planted_atlas(model, cells: list[tuple[int, int]]):
    """forward_features → channel k of class 0 peaks at ``cells[k]``; the rest is faint noise."""
    fh, fw = model.forward_features(torch.zeros(1, 3, 64, 64)).shape[2:]

    def fake(x):
        f = 0.01 * torch.rand(x.shape[0], model.num_channels, fh, fw)
        for k, (i, j) in enumerate(cells):
            f[:, k, j, i] = 10.0
        return f

    model.forward_features = fake
    return fh, fw


def test_atlas_counts_planted_channels(tmp_path):
    model = tiny_model(2, img_size=64, last_stage=2, class_names=["a", "b"])
    cells = [(2, 2), (12, 12), (2, 2)]  # channels 1 and 3 on the beak, channel 2 on the tail
    fh, fw = _planted_atlas(model, cells)
    paths, labels, kps = [], [], []
    for n in range(6):
        w, h = 80 + 8 * n, 64
        path = tmp_path / f"i{n}.png"
        Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)
        geo = model.transform.geometry(w, h)
        beak, tail = geo.feature_to_original(np.array([cells[0], cells[1]]), (fh, fw))
        paths.append(str(path))
        labels.append(n % 2)
        kps.append(np.array([[*beak, 1.0], [*tail, 1.0], [0, 0, 0]]))
    names = ["beak", "tail", "wing"]
    inputs = AtlasInputs(paths, labels, kps, names, {"a": ["beak", "tail"], "b": []})
    summary = build_atlas(model, inputs, top=2, batch_size=4, noise=None)
    block = summary["coverage"]
    assert block["source"] == "dataset" and set(block["per_class"]) == {"a"}  # b has no defining parts
    a = block["per_class"]["a"]
    assert a["images"] == 3 and a["channel_parts"] == ["beak", "tail", "beak"] and a["full"]
    assert a["shared"] == {"beak": [1, 3]} and a["duplicates"] == 1
    assert a["chance"]["full"] is not None and 0 < a["chance"]["full"] < 1
    assert block["summary"]["fully_covered"] == 1
    text = summary_markdown(summary, "planted")
    assert "| planted | 1 of 1 (chance" in text and "1: beak (1.00); 2: tail (1.00); 3: beak (1.00)" in text
    # without the dataset's defining parts, the card's; without either, said so
    model.card = {"defining_parts": {"a": ["wing"]}}
    bare = AtlasInputs(paths, labels, kps, names)
    assert build_atlas(model, bare, top=2, noise=None)["coverage"]["per_class"]["a"]["missed"] == ["wing"]
    model.card = {}
    unknown = build_atlas(model, bare, top=2, noise=None)
    assert unknown["coverage"]["summary"] is None and unknown["coverage"]["note"] == "no defining parts known"
    assert "No defining parts known" in summary_markdown(unknown, "planted")


def test_atlas_cli_reads_the_synth_defining_parts(tmp_path):
    data = tmp_path / "birds"
    generate_dataset(data, 3, 4, 48, 0, test_fraction=1.0)
    names = CUBDataset(data, "test").class_names
    ckpt = tmp_path / "m.safetensors"
    mcloss.save_checkpoint(tiny_model(3, img_size=48, last_stage=2, class_names=names), ckpt)
    out = tmp_path / "atlas"
    argv = ["atlas", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--top", "2", "--workers", "0",
            "--no-progress", "--device", "cpu", "--no-stability"]  # fmt: skip
    assert cli_main(argv) == 0
    block = json.loads((out / "atlas.json").read_text())["coverage"]
    changed = {k: v for k, v in synth_defining_parts(data).items() if v}
    assert block["source"] == "dataset" and set(block["per_class"]) == set(changed)
    for name, row in block["per_class"].items():
        assert row["defining"] == changed[name] and len(row["channel_parts"]) == 3
        assert row["covered_count"] + len(row["missed"]) == row["defining_count"] == len(changed[name])
    assert block["summary"]["classes"] == len(changed)
    assert "**Distinct parts, counted.**" in (out / "summary.md").read_text()
