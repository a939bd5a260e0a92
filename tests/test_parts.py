"""`mcloss parts`: maps planted on known keypoints give known scores; the CLI writes every output."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import mcloss
from mcloss.cli.parts import main as parts_main
from mcloss.core.errors import ParameterError
from mcloss.core.loss import ccmp
from mcloss.core.model import MCModel
from mcloss.core.transforms import EvalTransform
from mcloss.data.cub import CUBDataset
from mcloss.evaluation import parts as P
from mcloss.explainability.explanation import explain
from mcloss.metrics import localization as M

# Original images are 64×48 (W×H), resized to a 32×32 input; F is 8×8, so feature cell (i, j) covers
# original pixels x ∈ [8i, 8i+8), y ∈ [6j, 6j+6) and its centre is (8i + 4, 6j + 3).
W0, H0, CELL_W, CELL_H = 64, 48, 8, 6
PART_NAMES = ["red", "green", "blue"]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
# one-hot colours are picked by ReLU(2·x_c − Σx); white by ReLU(Σx − 2) (the input is in [0, 1])
FILTERS = {
    "red": ([2.0, -1.0, -1.0], 0.0),
    "green": ([-1.0, 2.0, -1.0], 0.0),
    "blue": ([-1.0, -1.0, 2.0], 0.0),
    "white": ([1.0, 1.0, 1.0], -2.0),
}
DECOY_CELL = (0, 0)  # the white square: far from every part cell below


class CCMPHead(nn.Module):
    """Logits = scale × CCMP-GAP: the class whose colours cover most area wins."""

    def __init__(self, groups: list[int], scale: float = 50.0) -> None:
        super().__init__()
        self.groups = groups
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * ccmp(features, self.groups).mean(dim=(2, 3))


def planted_model(assign: list[list[str]]) -> MCModel:
    """An MCModel whose channel (c, j) fires exactly on the colour ``assign[c][j]`` (a part or the decoy)."""
    groups = [len(a) for a in assign]
    conv = nn.Conv2d(3, sum(groups), 1)
    with torch.no_grad():
        for k, colour in enumerate(c for a in assign for c in a):
            conv.weight[k, :, 0, 0] = torch.tensor(FILTERS[colour][0])
            conv.bias[k] = FILTERS[colour][1]
    features = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(4))
    transform = EvalTransform((32, 32), None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    names = [f"class_{i}" for i in range(len(assign))]
    return MCModel(features, CCMPHead(groups), groups, names, transform, {"backbone": "planted"}).eval()


def cell_centre(cell: tuple[int, int]) -> tuple[float, float]:
    return (cell[0] * CELL_W + CELL_W / 2, cell[1] * CELL_H + CELL_H / 2)


def paint(cells: dict[str, tuple[int, int]]) -> Image.Image:
    """A black 64×48 image with each colour filling its feature cell, plus the white decoy."""
    img = np.zeros((H0, W0, 3), np.uint8)
    for colour, (i, j) in {**cells, "white": DECOY_CELL}.items():
        img[j * CELL_H : (j + 1) * CELL_H, i * CELL_W : (i + 1) * CELL_W] = COLOURS[colour]
    return Image.fromarray(img)


def part_layouts(n: int, seed: int = 0) -> list[dict[str, tuple[int, int]]]:
    """n random placements of the three parts on distinct cells, ≥ 3 cells apart and away from the decoy."""
    rng = np.random.default_rng(seed)
    layouts = []
    while len(layouts) < n:
        cells = [tuple(int(v) for v in rng.integers(1, 7, size=2)) for _ in PART_NAMES]
        pts = cells + [DECOY_CELL]
        if all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 3 for i, a in enumerate(pts) for b in pts[i + 1 :]):
            layouts.append(dict(zip(PART_NAMES, cells, strict=True)))
    return layouts


def write_cub(root: Path, layouts, labels, class_names, invisible: dict[int, list[int]] | None = None) -> Path:
    """A tiny CUB_200_2011-layout directory (all images in the test split) with part keypoints."""
    invisible = invisible or {}
    (root / "parts").mkdir(parents=True)
    images, cls_lines, split, locs, boxes = [], [], [], [], []
    for n, (cells, label) in enumerate(zip(layouts, labels, strict=True), start=1):
        rel = f"{label + 1:03d}.{class_names[label]}/img_{n:04d}.png"
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        paint(cells).save(root / "images" / rel)
        images.append(f"{n} {rel}")
        cls_lines.append(f"{n} {label + 1}")
        split.append(f"{n} 0")
        boxes.append(f"{n} 0.0 0.0 {W0}.0 {H0}.0")
        for p, name in enumerate(PART_NAMES):
            x, y = cell_centre(cells[name])
            vis = 0 if p in invisible.get(n - 1, []) else 1
            locs.append(f"{n} {p + 1} {x} {y} {vis}")  # invisible parts keep their true place
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(cls_lines) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    (root / "classes.txt").write_text("".join(f"{i + 1} {i + 1:03d}.{c}\n" for i, c in enumerate(class_names)))
    (root / "parts" / "parts.txt").write_text("".join(f"{i + 1} {p}\n" for i, p in enumerate(PART_NAMES)))
    (root / "parts" / "part_locs.txt").write_text("\n".join(locs) + "\n")
    return root


def dataset(tmp_path: Path, assign, n: int = 6, labels=None, invisible=None, seed: int = 0):
    labels = labels or [0] * n
    root = write_cub(tmp_path / "cub", part_layouts(n, seed), labels, [f"class_{i}" for i in range(len(assign))], invisible)
    return CUBDataset(root, "test", with_parts=True)


# ----------------------------------------------------------------------------------------- localization


def test_planted_peaks_land_exactly_on_keypoints(tmp_path):
    ds = dataset(tmp_path, [["red", "green", "blue"], ["white"] * 3], n=2)
    model = planted_model([["red", "green", "blue"], ["white"] * 3])
    rec = ds.records[0]
    img = Image.open(rec.path).convert("RGB")
    ex = explain(model, [img], [0], maps=("channels", "gradcam"))[0]
    np.testing.assert_allclose(ex.groups[0].peaks_xy, rec.parts[:, :2])


def test_channels_on_distinct_parts_hit_every_part(tmp_path):
    assign = [["red", "green", "blue"], ["white", "white", "white"]]
    ds = dataset(tmp_path, assign, n=6)
    result = P.evaluate_parts(planted_model(assign), ds, faithfulness=False)
    s = result.summary
    assert s == P.evaluate_parts(planted_model(assign), ds, faithfulness=False).summary
    ch = s["methods"]["channels"]
    assert ch["hit_rate"] == 1.0 and ch["peaks"] == 18
    row = result.per_image[0]
    assert row["channel_parts"] == "red;green;blue" and row["channel_distances"] == "0;0;0"
    assert row["channel_hits"] == 3 and row["channel_distinct"] == 3 and row["radius_px"] == pytest.approx(0.12 * 64)
    assert ch["distinct_parts"] == 3.0
    assert row["channel_separated"] == 3 and ch["separated_parts"] == 3.0  # parts ≥ 24 px apart, 2 r = 15.4 px
    assert ch["overlap"] == 0.0  # the three channels' top-10 % masks are disjoint
    assert s["channel_part_matrix"] == [[6, 0, 0], [0, 6, 0], [0, 0, 6]]
    assert s["channel_part_hits"] == [[6, 0, 0], [0, 6, 0], [0, 0, 6]]
    assert s["channel_part_matrix_normalized"] == [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]
    assert ch["part_histogram"] == [6, 6, 6]
    assert s["methods"]["gradcam"]["hit_rate"] == 1.0  # its peak is on one of the three parts
    assert s["images"] == s["scored_images"] == 6
    assert s["top1_fc"] == 1.0 and s["top1_mc"] == 1.0
    assert s["methods"]["random"]["hit_rate"] < 1.0


def test_separated_parts_merge_nearby_parts_at_a_large_radius(tmp_path):
    # at radius 0.3 × 64 = 19.2 px (2 r = 38.4 px) some of the three parts (≥ 24 px apart) are one location
    assign = [["red", "green", "blue"], ["white", "white", "white"]]
    ds = dataset(tmp_path, assign, n=6)
    result = P.evaluate_parts(planted_model(assign), ds, radius=0.3, faithfulness=False)
    expected = []
    for rec in ds.records:
        xy = rec.parts[:, :2]
        near = [[np.hypot(*(xy[i] - xy[j])) < 2 * 0.3 * 64 for j in range(3)] for i in range(3)]
        groups = {frozenset(j for j in range(3) if near[i][j] or any(near[i][k] and near[k][j] for k in range(3))) for i in range(3)}
        expected.append(len(groups))
    assert [row["channel_separated"] for row in result.per_image] == expected
    assert [row["channel_distinct"] for row in result.per_image] == [3] * 6
    assert min(expected) < 3  # the layouts do bring some parts within 2 r
    assert result.summary["methods"]["channels"]["separated_parts"] == pytest.approx(np.mean(expected))


def test_channels_on_one_part_hit_one_distinct_part(tmp_path):
    assign = [["green", "green", "green"], ["white", "white", "white"]]
    s = P.evaluate_parts(planted_model(assign), dataset(tmp_path, assign, n=4), faithfulness=False).summary
    ch = s["methods"]["channels"]
    assert ch["hit_rate"] == 1.0
    assert ch["distinct_parts"] == 1.0
    assert ch["overlap"] == 1.0  # identical channels, identical masks
    assert s["channel_part_matrix"] == [[0, 4, 0]] * 3


def test_peaks_far_from_parts_never_hit(tmp_path):
    assign = [["white", "white", "white"], ["red", "green", "blue"]]
    s = P.evaluate_parts(planted_model(assign), dataset(tmp_path, assign, n=4), faithfulness=False).summary
    ch = s["methods"]["channels"]
    assert ch["hit_rate"] == 0.0 and ch["distinct_parts"] == 0.0
    assert s["channel_part_hits"] == [[0, 0, 0]] * 3
    assert np.asarray(s["channel_part_matrix"]).sum() == 12  # nearest parts are still counted
    assert s["methods"]["gradcam"]["hit_rate"] == 0.0


def test_the_true_class_group_is_scored(tmp_path):
    # class 0 watches the decoy, class 1 the parts: images of class 1 must score 1.0, of class 0 zero
    assign = [["white", "white", "white"], ["red", "green", "blue"]]
    model = planted_model(assign)
    s1 = P.evaluate_parts(model, dataset(tmp_path / "a", assign, n=3, labels=[1, 1, 1]), faithfulness=False).summary
    s0 = P.evaluate_parts(model, dataset(tmp_path / "b", assign, n=3, labels=[0, 0, 0]), faithfulness=False).summary
    assert s1["methods"]["channels"]["hit_rate"] == 1.0 and s1["methods"]["channels"]["distinct_parts"] == 3.0
    assert s0["methods"]["channels"]["hit_rate"] == 0.0


def test_invisible_parts_are_ignored(tmp_path):
    # the blue part is marked invisible in every image: the blue channel's peak sits on it but is a miss
    assign = [["red", "green", "blue"], ["white"] * 3]
    ds = dataset(tmp_path, assign, n=4, invisible={i: [2] for i in range(4)})
    s = P.evaluate_parts(planted_model(assign), ds, faithfulness=False).summary
    ch = s["methods"]["channels"]
    assert ch["hit_rate"] == pytest.approx(2 / 3)
    assert ch["distinct_parts"] == 2.0
    assert [row[2] for row in s["channel_part_matrix"]] == [0, 0, 0]  # nothing is ever nearest to blue
    assert s["channel_part_hits"] == [[4, 0, 0], [0, 4, 0], [0, 0, 0]]


def test_images_without_visible_parts_count_for_accuracy_only(tmp_path):
    assign = [["red", "green", "blue"], ["white"] * 3]
    ds = dataset(tmp_path, assign, n=3, invisible={0: [0, 1, 2]})
    result = P.evaluate_parts(planted_model(assign), ds, faithfulness=False)
    assert result.summary["images"] == 3 and result.summary["scored_images"] == 2
    assert result.summary["methods"]["channels"]["peaks"] == 6
    assert result.per_image[0]["visible_parts"] == 0 and "channel_hits" not in result.per_image[0]


def test_progress_counts_every_image_skipped_ones_too(tmp_path):
    assign = [["red", "green", "blue"], ["white"] * 3]
    ds = dataset(tmp_path, assign, n=5)
    ds.records[1].path.write_bytes(b"not an image")
    seen: list[tuple[int, int]] = []
    result = P.evaluate_parts(planted_model(assign), ds, faithfulness=False, batch_size=2,
                              progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert seen == [(i, 5) for i in range(6)] and len(result.summary["skipped_images"]) == 1


def test_dead_channel_has_no_peak(tmp_path):
    # a "yellow" channel sees nothing in these images: zero everywhere, so it is a miss, not a corner hit
    assign = [["red", "green", "blue"], ["white"] * 3]
    model = planted_model(assign)
    with torch.no_grad():
        model.features[0].weight[2] = 0.0
        model.features[0].bias[2] = 0.0
    s = P.evaluate_parts(model, dataset(tmp_path, assign, n=3), faithfulness=False).summary
    assert s["methods"]["channels"]["hit_rate"] == pytest.approx(2 / 3)
    assert s["channel_part_matrix"][2] == [0, 0, 0]


def test_random_baseline_is_seeded_and_near_chance(tmp_path):
    assign = [["red", "green", "blue"], ["white"] * 3]
    ds = dataset(tmp_path, assign, n=40)
    model = planted_model(assign)
    a = P.evaluate_parts(model, ds, faithfulness=False, seed=3)
    b = P.evaluate_parts(model, ds, faithfulness=False, seed=3)
    c = P.evaluate_parts(model, ds, faithfulness=False, seed=4)
    col = [(r["random_hits"], r["random_distinct"]) for r in a.per_image]
    assert col == [(r["random_hits"], r["random_distinct"]) for r in b.per_image]
    assert col != [(r["random_hits"], r["random_distinct"]) for r in c.per_image]
    # chance: three discs of radius 0.12 × 64 px (disjoint, inside the 64×48 image) cover 3π·7.68²/3072
    chance = 3 * math.pi * (0.12 * 64) ** 2 / (W0 * H0)
    assert a.summary["methods"]["random"]["hit_rate"] == pytest.approx(chance, abs=0.1)


def test_radius_and_size_reference(tmp_path):
    # peaks are exact, so any radius hits; the rule is reported and the pixel radius follows it
    assign = [["red", "green", "blue"], ["white"] * 3]
    ds = dataset(tmp_path, assign, n=2)
    r = P.evaluate_parts(planted_model(assign), ds, faithfulness=False, radius=0.1, size_reference="diagonal")
    assert r.per_image[0]["radius_px"] == pytest.approx(0.1 * math.hypot(W0, H0))
    assert "diagonal" in r.summary["hit_radius"]
    with pytest.raises(ParameterError, match="^size_reference must be one of") as info:  # named as in Python
        P.evaluate_parts(planted_model(assign), ds, size_reference="min")
    assert info.value.parameter == "size_reference"


# ----------------------------------------------------------------------------------------- faithfulness


def test_curve_endpoints_are_the_image_and_the_baseline(tmp_path):
    assign = [["red", "green", "blue"], ["white"] * 3]
    ds = dataset(tmp_path, assign, n=1)
    model = planted_model(assign)
    img = Image.open(ds.records[0].path).convert("RGB")
    ex = explain(model, [img], [0])[0]
    x = model.transform(img)
    maps = [ex.groups[0].ccmp, np.zeros((8, 8))]
    for baseline in P.BASELINES:
        deletion, insertion = P.perturbation_curves(model, x, 0, maps, steps=8, baseline=baseline, rng=np.random.default_rng(0))
        assert deletion.shape == insertion.shape == (2, 9)
        np.testing.assert_allclose(deletion[:, 0], ex.probs_fc[0], rtol=1e-5)
        np.testing.assert_allclose(insertion[:, -1], ex.probs_fc[0], rtol=1e-5)
        with torch.no_grad():
            p_base = torch.softmax(model(P.baseline_input(x, baseline)[None]), 1)[0, 0].item()
        np.testing.assert_allclose(deletion[:, -1], p_base, rtol=1e-5)
        np.testing.assert_allclose(insertion[:, 0], p_base, rtol=1e-5)


def test_baselines():
    x = torch.full((3, 20, 30), 0.7)
    assert torch.equal(P.baseline_input(x, "mean"), torch.zeros_like(x))
    torch.testing.assert_close(P.baseline_input(x, "blur"), x)  # blurring a constant changes nothing
    y = torch.zeros(3, 20, 30)
    y[:, 10, 15] = 1.0
    blurred = P.baseline_input(y, "blur")
    assert blurred[0, 10, 15] < 0.5 and blurred.sum().item() == pytest.approx(3.0, rel=1e-4)
    with pytest.raises(ValueError, match="baseline"):
        P.baseline_input(x, "noise")


def test_ccmp_map_is_more_faithful_than_random(tmp_path):
    # the head reads only the coloured cells, which the CCMP map ranks first
    assign = [["red", "green", "blue"], ["white"] * 3]
    r = P.evaluate_parts(planted_model(assign), dataset(tmp_path, assign, n=4), steps=8, baseline="mean")
    m = r.summary["methods"]
    assert m["channels"]["deletion_auc"] < m["random"]["deletion_auc"] - 0.1
    assert m["channels"]["insertion_auc"] > m["random"]["insertion_auc"] + 0.1
    deletion, insertion = r.curves["channels"]
    assert deletion.shape == insertion.shape == (4, 9)
    row = r.per_image[0]
    assert row["deletion_auc_channels"] == pytest.approx(M.trapezoid_auc(deletion[0]))
    assert r.summary["curves"]["fractions"] == M.step_fractions(8).tolist()


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint(2, ["class_0", "class_1"])


def test_cli_writes_every_output(tmp_path, checkpoint, capsys):
    root = write_cub(tmp_path / "cub", part_layouts(3), [0, 1, 0], ["class_0", "class_1"])
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--data", str(root), "--out", str(out), "--steps", "4",
            "--device", "cpu", "--seed", "5"]  # fmt: skip
    assert parts_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| channels (CCMP) |" in printed and "| random |" in printed and "top-1 FC head" in printed
    for name in P.OUTPUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp*"))
    with (out / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["image_id"]) for r in rows] == [1, 2, 3]
    assert all(0.0 <= float(r["deletion_auc_channels"]) <= 1.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3 and summary["part_names"] == PART_NAMES
    assert np.asarray(summary["channel_part_matrix"]).shape == (3, 3)
    with (out / "summary.csv").open() as f:
        assert [r["method"] for r in csv.DictReader(f)] == list(P.METHODS)
    table = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 5 and table[1] == "|---|---|---|---|---|---|---|---|"
    assert [line.split("|")[1].strip() for line in table[2:]] == ["channels (CCMP)", "Grad-CAM", "random"]
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 5 and config["steps"] == 4 and config["radius"] == 0.12
    assert Image.open(out / "channel_part_matrix.png").size[0] > 100
    # a second run into the same directory is refused unless asked, and leaves the first intact
    before = (out / "summary.json").read_bytes()
    assert parts_main(argv) == 2
    assert "already holds a parts run" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before


def test_cli_bad_inputs_fail_with_one_line(tmp_path, checkpoint, capsys):
    root = write_cub(tmp_path / "cub", part_layouts(1), [0], ["class_0", "class_1"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    assert parts_main(["--checkpoint", str(bad), "--data", str(root), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and len(err.splitlines()) == 1
    assert parts_main(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and len(err.splitlines()) == 1
    assert parts_main(["--checkpoint", str(checkpoint), "--data", str(root), "--radius", "0", "--out", str(tmp_path / "o4")]) == 2
    assert capsys.readouterr().err.strip() == "mcloss parts: error: --radius must be > 0, got 0.0"
    # the library names parameters (steps, perturbation_batch); the command names them as its flags
    assert parts_main(["--checkpoint", str(checkpoint), "--data", str(root), "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "mcloss parts: error: --steps must be >= 1, got 0"
    assert parts_main(["--checkpoint", str(checkpoint), "--data", str(root), "--perturbation-batch", "0"]) == 2
    assert capsys.readouterr().err.strip() == "mcloss parts: error: --perturbation-batch must be >= 1, got 0"
    other = write_cub(tmp_path / "other", part_layouts(1), [0], ["sparrow", "finch"])
    assert parts_main(["--checkpoint", str(checkpoint), "--data", str(other), "--out", str(tmp_path / "o3")]) == 2
    assert "do not match" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3" / "summary.json").exists()


def test_cli_skips_a_corrupt_image(tmp_path, checkpoint, capsys):
    root = write_cub(tmp_path / "cub", part_layouts(2), [0, 1], ["class_0", "class_1"])
    victim = sorted((root / "images").rglob("*.png"))[0]
    victim.write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    assert parts_main(["--checkpoint", str(checkpoint), "--data", str(root), "--out", str(out), "--no-faithfulness"]) == 0
    assert victim.name in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 1 and summary["skipped_images"][0]["path"].endswith(victim.name)
    assert summary["methods"]["channels"]["deletion_auc"] is None


# ----------------------------------------------------------------------------------- shared encoders


def test_csv_text_writes_empty_cells_for_missing_and_nan():
    from mcloss.core.files import csv_text

    rows = [{"a": 1, "b": 0.123456789, "c": float("nan")}, {"a": None, "c": "x,y"}]
    assert csv_text(("a", "b", "c"), rows) == 'a,b,c\n1,0.123457,\n,,"x,y"\n'
    assert csv_text(["t", "v"], [(1, float("nan")), (2, 0.5)], float_format=".8g", nan="nan") == "t,v\n1,nan\n2,0.5\n"


def test_json_safe_gives_strict_json():
    from mcloss.core.files import json_safe

    value = json_safe({"x": np.float32(1.5), "n": float("nan"), "t": (np.int64(2), [np.nan]), "a": np.arange(2), "p": Path("q")})
    assert value == {"x": 1.5, "n": None, "t": [2, [None]], "a": [0, 1], "p": "q"}
    assert json.loads(json.dumps(value, allow_nan=False)) == value


# --------------------------------------------------------------------------------------- defining parts


def write_masks(root: Path, layouts) -> None:
    """part_masks/ label maps for :func:`write_cub`: each part's feature cell gets its 1-based part id."""
    for n, cells in enumerate(layouts, start=1):
        rel = (root / "images.txt").read_text().splitlines()[n - 1].split(maxsplit=1)[1]
        labels = np.zeros((H0, W0), np.uint8)
        for p, name in enumerate(PART_NAMES):
            i, j = cells[name]
            labels[j * CELL_H : (j + 1) * CELL_H, i * CELL_W : (i + 1) * CELL_W] = p + 1
        path = (root / "part_masks" / rel).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels).save(path)


def uniform_model(groups: int = 3) -> MCModel:
    """One class whose channels are the same constant everywhere."""
    model = planted_model([["red"] * groups])
    conv = model.features[0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(1.0)
    return model


def defining_summary(tmp_path: Path, model: MCModel, *, masks: bool) -> dict:
    layouts = part_layouts(4)
    root = write_cub(tmp_path / "cub", layouts, [0] * 4, ["class_0"])
    if masks:
        write_masks(root, layouts)
    result = P.evaluate_parts(model, root, faithfulness=False, defining={"class_0": ["red"]})
    return result.summary["defining"]


@pytest.mark.parametrize("masks", [True, False])
def test_channels_exactly_on_the_defining_part(tmp_path, masks):
    block = defining_summary(tmp_path, planted_model([["red", "red", "red"]]), masks=masks)
    assert block["images"] == 4 and block["source"] == "argument"
    assert block["regions"] == ("part masks" if masks else "keypoints within the hit radius")
    for kind in ("channels", "ccmp"):
        m = block["methods"][kind]
        assert m["peak_share"] == 1.0
        assert m["peak_chance"] == pytest.approx(1 / 3)  # three parts of equal area
        assert m["mass_ratio"] == pytest.approx(1000.0)  # all mass on the defining part: the clip
        if masks:  # bilinear upsampling blurs the cell's edge into the background, never onto another part
            assert 0.9 < m["rank_accuracy"] < 1.0 and m["rank_chance"] == pytest.approx(CELL_W * CELL_H / (W0 * H0))
            assert 0.4 < m["energy_defining"] < 1.0 and m["energy_object"] == pytest.approx(m["energy_defining"])
    assert 0.2 < block["methods"]["random"]["mass_ratio"] < 5.0  # noise: one 8 × 8 cell per part, 4 images
    assert block["per_class"]["class_0"]["mass_ratio_ccmp"] == pytest.approx(1000.0)
    assert block["methods"]["ccmp"]["mass_ratio_ci"] == pytest.approx([1000.0, 1000.0])  # every image the same
    lo, hi = block["methods"]["random"]["mass_ratio_ci"]
    assert lo < block["methods"]["random"]["mass_ratio"] < hi  # noise differs between the images


def test_uniform_channels_show_no_preference(tmp_path):
    block = defining_summary(tmp_path, uniform_model(), masks=True)
    for kind in ("channels", "ccmp"):
        m = block["methods"][kind]
        assert m["mass_ratio"] == pytest.approx(1.0)
        assert m["rank_accuracy"] == pytest.approx(m["rank_chance"])  # every pixel ties
        assert m["energy_object"] == pytest.approx(3 * CELL_W * CELL_H / (W0 * H0))
        assert m["mass_ratio_ci"] == pytest.approx([1.0, 1.0])
        # Grad-CAM of constant features is constant too: the group's maps and it tie on every image
        assert block["versus_gradcam"][kind] == {"quotient": pytest.approx(1.0), "ci": pytest.approx([1.0, 1.0])}


def test_channels_on_the_background_put_no_mass_on_parts(tmp_path):
    block = defining_summary(tmp_path, planted_model([["white", "white", "white"]]), masks=True)
    m = block["methods"]["channels"]
    assert m["peaks_on_parts"] == 0 and m["peak_share"] is None  # JSON-safe: NaN is None
    assert m["mass_ratios"] == 0 and m["mass_ratio"] is None  # no mass on any part
    assert m["energy_object"] == pytest.approx(0.0, abs=1e-6)
    assert m["rank_accuracy"] == pytest.approx(0.0)


def test_defining_parts_come_from_the_card_without_dataset_ones(tmp_path):
    layouts = part_layouts(2)
    root = write_cub(tmp_path / "cub", layouts, [0, 0], ["class_0"])
    model = planted_model([["green", "green", "green"]])
    assert P.evaluate_parts(model, root, faithfulness=False).summary["defining"]["methods"] == {}
    model.card = {"defining_parts": {"class_0": ["green"]}}
    block = P.evaluate_parts(model, root, faithfulness=False).summary["defining"]
    assert block["source"] == "checkpoint card"
    assert block["methods"]["ccmp"]["peak_share"] == 1.0


def test_cli_baseline_checkpoint_joins_the_defining_table(tmp_path, tiny_checkpoint, capsys):
    layouts = part_layouts(3)
    root = write_cub(tmp_path / "cub", layouts, [0, 1, 0], ["class_0", "class_1"])
    write_masks(root, layouts)
    main_ckpt = tiny_checkpoint(2, ["class_0", "class_1"])
    twin = tmp_path / "twin.safetensors"
    for path in (main_ckpt, twin):  # the checkpoints' cards say which parts define each class
        model = mcloss.load_checkpoint(main_ckpt)
        model.card["defining_parts"] = {"class_0": ["red"], "class_1": ["green", "blue"]}
        mcloss.save_checkpoint(model, path)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(main_ckpt), "--data", str(root), "--out", str(out), "--no-faithfulness",
            "--baseline", str(twin), "--device", "cpu"]  # fmt: skip
    assert parts_main(argv) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith(("| this |", "| baseline |"))]
    assert [r.split("|")[1].strip() for r in rows] == ["this"] * 4 + ["baseline"] * 4
    assert printed.index("| this | CCMP |") < printed.index("| channels (CCMP) |")  # the defining table leads
    summary = json.loads((out / "summary.json").read_text())
    assert summary["defining"]["source"] == "checkpoint card" and summary["defining"]["images"] == 3
    assert summary["baseline"]["checkpoint"] == str(twin) and "ccmp" in summary["baseline"]["defining"]["methods"]
    assert (out / "baseline" / "summary.json").is_file()
    with (out / "per_image.csv").open() as f:
        assert all(float(r["mass_ratio_ccmp"]) > 0 for r in csv.DictReader(f))
    # over it without the baseline: its files, whose numbers are not this run's, go
    assert parts_main([*argv[:-4], "--device", "cpu", "--overwrite"]) == 0
    assert not (out / "baseline").exists() and "baseline" not in json.loads((out / "summary.json").read_text())


def test_cli_old_baseline_values_point_to_the_new_flag(tmp_path, checkpoint, capsys):
    root = write_cub(tmp_path / "cub", part_layouts(1), [0], ["class_0", "class_1"])
    assert parts_main(["--checkpoint", str(checkpoint), "--data", str(root), "--baseline", "mean"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--deletion-fill mean" in err and len(err.splitlines()) == 1
