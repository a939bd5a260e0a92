"""Contrastive maps: Finer-CAM against its peer and by hand, the group contrast by hand, the contrast in every
output, and the pair ground truth of ``mcloss parts --contrast``."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import mcloss
from mcloss.cli.export import main as export_main
from mcloss.cli.parts import main as parts_main
from mcloss.core.errors import ParameterError, UnknownClassError
from mcloss.data.synth import generate_dataset
from mcloss.evaluation.contrast import CONTRAST_MAPS, contrast_pairs, evaluate_contrast
from mcloss.explainability import kinds
from mcloss.explainability.contrast import (
    Contrast,
    ccmp_difference,
    channel_shares,
    finer_weights,
    group_contrast,
    nearest_classes,
    resolve_contrasts,
)
from mcloss.explainability.explanation import explain, prepare
from mcloss.explainability.gradcam import fused_gradcam, gradcam_from_weights
from mcloss.metrics import mass as W
from tests.conftest import hooks_left, tiny_model

DEFAULT = Path(__file__).resolve().parents[1] / "checkpoints" / "default.safetensors"


# ------------------------------------------------------------------------------------- picking B


def test_nearest_classes_are_the_nearest_logits_without_the_target():
    logits = np.array([2.0, 5.0, 4.5, -1.0, 5.2])
    assert nearest_classes(logits, 1, 3) == [4, 2, 0]
    assert nearest_classes(logits, 3, 2) == [0, 2]
    # ties go to the lower index
    assert nearest_classes(np.array([1.0, 0.0, 2.0]), 0, 2) == [1, 2]


def test_resolve_contrasts_auto_named_and_the_target_itself():
    model = tiny_model(5, class_names=list("abcde"))
    logits = np.array([[2.0, 5.0, 4.5, -1.0, 5.2], [0.0, 1.0, 2.0, 3.0, 4.0]])
    auto = resolve_contrasts(model, "auto", logits, [[1], [4, 0]])
    assert auto[0][0] == Contrast((4, 2, 0), ("e", "c", "a"), True)
    assert auto[0][0].other == 4 and auto[0][0].label() == "e +2"
    assert auto[1][1].references == (1, 2, 3)
    named = resolve_contrasts(model, "c", logits, [[1], [2, 0]])
    assert named[0][0] == Contrast((2,), ("c",), False) and named[0][0].label() == "c"
    # a target that is the named class is contrasted as under "auto"
    assert named[1][0].auto and named[1][0].other != 2 and named[1][1].other == 2
    # two classes: one reference
    two = tiny_model(2, class_names=["x", "y"])
    assert resolve_contrasts(two, "AUTO", np.array([[0.0, 1.0]]), [[0]])[0][0].references == (1,)
    with pytest.raises(UnknownClassError):
        resolve_contrasts(model, "nope", logits, [[1], [2]])
    with pytest.raises(ParameterError, match="one class"):
        resolve_contrasts(tiny_model(1), 0, np.zeros((1, 1)), [[0]])


# ------------------------------------------------------------------------------------------- Finer-CAM


def test_finer_with_one_named_class_is_gradcam_of_the_logit_difference():
    """With one reference B the score is y_A − y_B (p_B / p_B = 1), so by linearity its Grad-CAM weights are A's
    minus B's: checked against the fused Grad-CAM weights of each logit."""
    model = tiny_model(4, seed=3)
    x = torch.randn(3, 3, 64, 64)
    feats = model.forward_features(x).detach().requires_grad_(True)
    logits = model.head_logits(feats)
    a, b = [0, 2, 1], [1, 1, 0]
    w = finer_weights(feats, logits, a, [[t] for t in b])
    w_a = fused_gradcam(feats, logits, a, retain_graph=True)
    w_b = fused_gradcam(feats, logits, b, retain_graph=True)
    torch.testing.assert_close(w, w_a - w_b, rtol=1e-4, atol=1e-7)
    # and explain gives that map, B first in its record
    prepared = [prepare(model, img) for img in _images(3)]
    ex = explain(model, prepared, a, contrast=1, maps="finer")
    assert ex[1].groups[0].versus == Contrast((1,), (model.class_names[1],), False)
    feats = model.forward_features(torch.stack([p.x for p in prepared])).detach().requires_grad_(True)
    logits = model.head_logits(feats)
    w = fused_gradcam(feats, logits, a, retain_graph=True) - fused_gradcam(feats, logits, [1, 1, 1])
    by_hand = gradcam_from_weights(feats.detach(), w).numpy()
    for i in (0, 1):  # image 2's target is class 1 itself: contrasted as under "auto"
        np.testing.assert_allclose(ex[i].groups[0].finer, by_hand[i], rtol=1e-4, atol=1e-6)


def test_finer_weights_follow_the_papers_probability_weighting():
    """Σ_r p_r (y_t − y_r) / Σ_r p_r by hand on a linear head: logits = V·mean(F), so d/dF is exact."""
    torch.manual_seed(0)
    feats = torch.rand(1, 4, 2, 2, requires_grad=True)
    v = torch.randn(3, 4)
    logits = feats.mean(dim=(2, 3)) @ v.T
    w = finer_weights(feats, logits, [0], [[1, 2]])
    z = logits.detach()[0]
    p = torch.softmax(z, 0)
    s = p[1] + p[2]
    score_grad_z = torch.zeros(3)  # d score / d logits, the weights differentiated too
    margin = torch.stack([z[0] - z[1], z[0] - z[2]])
    q = torch.stack([p[1], p[2]])
    for j in range(3):
        dq = torch.stack([p[r] * (float(r == j) - p[j]) for r in (1, 2)])
        dmargin = torch.tensor([float(j == 0) - float(j == 1), float(j == 0) - float(j == 2)])
        num, dnum = (q * margin).sum(), (dq * margin + q * dmargin).sum()
        score_grad_z[j] = (dnum * s - num * dq.sum()) / s**2
    expected = (score_grad_z @ v) / 4  # d logits / dF = V / (h·w); Grad-CAM averages over the 4 cells
    torch.testing.assert_close(w[0], expected, rtol=1e-4, atol=1e-6)


def test_finer_matches_pytorch_grad_cam(tmp_path):
    """The peer check: pytorch-grad-cam's FinerCAM on the same model, layer, target and references."""
    from pytorch_grad_cam import FinerCAM

    model = mcloss.load_checkpoint(DEFAULT, "cpu")
    root = tmp_path / "fresh"
    generate_dataset(root, classes=12, per_class=1, size=224, seed=7, test_fraction=1.0, object_scale=1.6, design="varied")
    paths = sorted((root / "images").rglob("*.jpg"))
    correlations = []
    for e, path in zip(explain(model, paths, "top2", contrast="auto", maps="finer"), paths, strict=True):
        x = prepare(model, path).x[None]
        for g in e.groups:
            with FinerCAM(model, [model.feature_layer]) as cam:
                theirs = cam(x, target_idx=g.target)[0]
            assert hooks_left(model) == 0
            ours = cv2.resize(g.finer, theirs.shape[::-1], interpolation=cv2.INTER_LINEAR)
            if ours.max() > 0 and theirs.max() > 0:
                correlations.append(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
    assert len(correlations) >= 20
    assert min(correlations) >= 0.99


# ------------------------------------------------------------------------------------- group contrast


def test_group_contrast_by_hand():
    """A's channel 0 sits where B's group is (dropped whole), channel 1 where B is absent (kept, minus B)."""
    a = torch.zeros(2, 3, 3)
    a[0, 0, 0], a[0, 0, 1] = 4.0, 2.0  # on the shared part
    a[1, 2, 2], a[1, 2, 1] = 2.0, 1.0  # on A's own part
    b = torch.zeros(2, 3, 3)
    b[0, 0, 0], b[0, 0, 1] = 3.0, 3.0
    b[1, 2, 1] = 0.6  # a little of B where A's own part is
    # shares: channel 0 over its max (1, .5): covered by B/max (1, 1) → min sum 1.5 of 1.5; channel 1 (1, .5):
    # B/max there (0, .2) → 0.2 of 1.5
    torch.testing.assert_close(channel_shares(a, b), torch.tensor([1.0, 0.2 / 1.5]))
    out = group_contrast(a, b)
    keep = 1 - 0.2 / 1.5
    expected = torch.zeros(3, 3)
    expected[2, 2] = 2.0 / 4.0 * keep  # on A's group scale (max 4)
    expected[2, 1] = 1.0 / 4.0 * keep - 0.2
    torch.testing.assert_close(out, expected)
    # the baseline: A's CCMP / 4 minus B's CCMP / 3, clipped
    base = torch.zeros(3, 3)
    base[2, 2], base[2, 1] = 0.5, 0.25 - 0.2
    torch.testing.assert_close(ccmp_difference(a, b), base)
    # no B at all: A's group on its own scale; nothing of A: zero
    torch.testing.assert_close(group_contrast(a, torch.zeros(2, 3, 3)), a.amax(0) / 4.0)
    assert float(group_contrast(torch.zeros(2, 3, 3), b).abs().sum()) == 0.0


# ----------------------------------------------------------------------------------------- explain


def _images(n: int) -> list:
    rng = np.random.default_rng(n)
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def test_contrast_adds_both_maps_from_one_forward_pass(monkeypatch):
    model = tiny_model(4)
    calls = []
    forward = model.forward_features
    monkeypatch.setattr(model, "forward_features", lambda x: calls.append(1) or forward(x))
    ex = explain(model, _images(2), "top2", contrast="auto")
    assert len(calls) == 1  # one pass for two images, two targets and four kinds
    for e in ex:
        for g in e.groups:
            assert set(g.maps) == {"gradcam", "finer", "contrast"} and g.finer.shape == g.contrast.shape == e.feature_hw
            assert g.versus.auto and g.versus.other != g.target and len(g.versus.references) == 3
            assert g.finer_peak_xy is not None and g.contrast_peak_xy is not None
    assert hooks_left(model) == 0
    # naming a contrastive kind means "auto"; without one, no contrast
    only = explain(model, _images(1)[0], maps="channels,contrast")
    assert set(only.groups[0].maps) == {"contrast"} and only.groups[0].versus.auto
    assert explain(model, _images(1)[0]).groups[0].versus is None
    assert kinds.contrast_maps(("channels",), None) == (("channels",), None)
    with pytest.raises(UnknownClassError):
        explain(model, _images(1)[0], contrast="no such class")


def test_contrast_under_captum_gradcam_still_fuses_finer():
    model = tiny_model(3)
    fused = explain(model, _images(1)[0], contrast=2, maps="gradcam,finer", method="fused")
    captum = explain(model, _images(1)[0], contrast=2, maps="gradcam,finer", method="captum")
    np.testing.assert_allclose(captum.groups[0].finer, fused.groups[0].finer, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(captum.groups[0].gradcam, fused.groups[0].gradcam, rtol=1e-4, atol=1e-6)
    assert hooks_left(model) == 0


def test_saved_contrast_titles_npz_and_json(tmp_path):
    model = tiny_model(3, class_names=["Alpha", "Beta", "Gamma"])
    e = explain(model, _images(1)[0], 0, contrast="Gamma")
    titles = [t.title for t in e.tiles()]
    assert "Finer vs Gamma" in titles and "groups vs Gamma" in titles  # A (Alpha) leads the montage's header
    record = e.save(tmp_path / "a.png")
    entry = record["targets"][0]
    assert entry["versus"] == {
        "index": 2, "name": "Gamma", "auto": False, "references": [{"index": 2, "name": "Gamma", "prob": pytest.approx(float(e.probs_fc[2]))}],
    }  # fmt: skip
    assert set(record["finer"]) == {"peak_xy"} and set(record["contrast"]) == {"peak_xy"}
    with np.load(tmp_path / "a.png.npz") as z:
        np.testing.assert_array_equal(z["versus"], [2])
        np.testing.assert_array_equal(z["contrast"], e.groups[0].contrast)
        np.testing.assert_array_equal(z["finer"], e.groups[0].finer)
    # without a contrast the json says so
    plain = explain(model, _images(1)[0], 0).record()
    assert plain["targets"][0]["versus"] is None and plain["finer"] is None


def test_export_contrast_records_it_and_a_rerun_with_another_redoes(tmp_path, tiny_checkpoint, capsys):
    ckpt = tiny_checkpoint(3, ["Alpha", "Beta", "Gamma"], img_size=32)
    src = tmp_path / "in"
    src.mkdir()
    for i, img in enumerate(_images(2)):
        img.save(src / f"{i}.png")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--input", str(src), "--out", str(out), "--device", "cpu", "--workers", "0"]
    assert export_main([*argv, "--contrast", "auto", "--no-progress"]) == 0
    rec = json.loads((out / "in" / "0.png.json").read_text())
    assert rec["options"]["contrast"] == "auto" and rec["options"]["maps"] == ["channels", "gradcam", "finer", "contrast"]
    assert rec["targets"][0]["versus"]["auto"] is True
    with np.load(out / "in" / "0.png.npz") as z:
        assert {"finer", "contrast", "versus"} <= set(z.files)
    capsys.readouterr()
    assert export_main([*argv, "--contrast", "Beta", "--no-progress"]) == 0
    assert "2 exported" in capsys.readouterr().err
    for i in range(2):
        rec = json.loads((out / "in" / f"{i}.png.json").read_text())
        assert rec["options"]["contrast"] == "Beta"
        versus = rec["targets"][0]["versus"]
        # a target that is Beta itself is contrasted with its nearest class
        assert versus["auto"] if rec["target"]["name"] == "Beta" else versus["name"] == "Beta" and not versus["auto"]
    assert export_main([*argv, "--contrast", "Delta"]) == 2
    assert "Delta" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ ground truth


def test_mass_ratio_against_named_parts_by_hand():
    regions = np.array([[1, 1, 2, 2], [3, 3, 0, 4]])
    values = np.array([[4.0, 2.0, 1.0, 1.0], [0.0, 6.0, 9.0, 0.5]])
    # parts 0 (mass 6 over 2 px) vs part 1 (2 over 2 px): 3; part 3 (index 3, region 4) is ignored
    assert W.mass_ratio(values, regions, [0], 4, others=[1]) == pytest.approx(3.0)
    # against parts 1 and 2: (2 + 6) / 4 px = 2 → 1.5; the default (every other part) adds part 3: 8.5 / 5 px
    assert W.mass_ratio(values, regions, [0], 4, others=[1, 2]) == pytest.approx(1.5)
    assert W.mass_ratio(values, regions, [0], 4) == pytest.approx(3.0 / (8.5 / 5))
    assert np.isnan(W.mass_ratio(np.zeros((2, 4)), regions, [0], 4, others=[1]))


def test_contrast_pairs_share_one_part_and_differ_in_another():
    pairs = contrast_pairs({0: [], 1: [0, 1], 2: [1, 2], 3: [3], 4: [0, 1]})
    assert pairs == [(1, 2, [1], [0, 2]), (2, 1, [1], [0, 2]), (2, 4, [1], [0, 2]), (4, 2, [1], [0, 2])]


@pytest.fixture(scope="module")
def combo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("contrast") / "synth"
    generate_dataset(root, classes=6, per_class=2, size=48, seed=2, test_fraction=1.0, design="varied")
    return root


def test_evaluate_contrast_scores_every_pair_on_every_image(combo_root):
    meta = json.loads((combo_root / "synth.json").read_text())
    names = [c["name"] for c in meta["class_definitions"]]
    model = tiny_model(len(names), class_names=names, img_size=48)
    block = evaluate_contrast(model, combo_root, seed=3)
    pairs = {(p["a"], p["b"]) for p in block["pairs"]}
    changed = {c["name"]: set(c["changed"]) for c in meta["class_definitions"]}
    expected = {(a, b) for a in names for b in names if a != b and changed[a] & changed[b] and changed[a] ^ changed[b]}
    assert pairs == expected and pairs
    assert set(block["methods"]) == set(CONTRAST_MAPS)
    assert block["image_pairs"] == sum(p["image_pairs"] for p in block["pairs"]) > 0
    for m in block["methods"].values():
        lo, hi = m["mass_ratio_ci"]
        assert lo <= m["mass_ratio"] <= hi and 0 <= m["mass_on_differing"] <= 1
    assert [g["goal"] for g in block["goals"]][:2] == ["contrast ≥ 8", "contrast ≥ 10× Grad-CAM of A (paired)"]
    # the same seed gives the same random row
    again = evaluate_contrast(model, combo_root, seed=3)
    assert again["methods"]["random"] == block["methods"]["random"]


def test_the_default_contrasts_tell_apart_what_grad_cam_does_not(tmp_path):
    """On fresh birds of one class, against the classes it shares a part with, the group contrast and Finer-CAM
    prefer the parts that tell the classes apart; Grad-CAM of A does not (measured, not assumed)."""
    model = mcloss.load_checkpoint(DEFAULT, "cpu")
    root = tmp_path / "fresh"
    generate_dataset(root, classes=12, per_class=4, size=224, seed=11, test_fraction=1.0, object_scale=1.6, design="varied")
    block = evaluate_contrast(model, root, limit=8)  # Common_Bird (no pairs) and Orange_Head_Pink_Belly
    m = block["methods"]
    assert block["image_pairs"] >= 20
    assert m["contrast"]["mass_ratio"] > 8 and m["contrast"]["quotient_ci"][0] > 10
    assert m["finer"]["mass_ratio"] > 2 and m["finer"]["quotient_ci"][0] > 1
    assert m["contrast"]["mass_ratio"] > m["difference"]["mass_ratio"]
    assert m["gradcam"]["mass_ratio"] < 2


def test_parts_cli_contrast_writes_its_tables(tmp_path, combo_root, capsys):
    meta = json.loads((combo_root / "synth.json").read_text())
    names = [c["name"] for c in meta["class_definitions"]]
    ckpt = tmp_path / "m.safetensors"
    mcloss.save_checkpoint(tiny_model(len(names), class_names=names, img_size=48), ckpt)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--data", str(combo_root), "--out", str(out), "--no-faithfulness", "--contrast"]
    assert parts_main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "## Contrastive maps: m.safetensors" in printed and "| group contrast, A vs B |" in printed
    block = json.loads((out / "contrast.json").read_text())[str(ckpt)]
    assert set(block["methods"]) == set(CONTRAST_MAPS)
    assert (out / "contrast.md").read_text().startswith("## Contrastive maps: m.safetensors")
    assert parts_main([*argv[:-1], "--device", "cpu", "--overwrite"]) == 0  # without --contrast: the old tables go
    assert not (out / "contrast.json").exists() and not (out / "contrast.md").exists()


def test_a_contrasts_short_label_and_its_description():
    from mcloss.explainability.contrast import Contrast

    named = Contrast((2,), ("Gamma",), auto=False)
    assert named.label() == named.described() == "Gamma"
    nearest = Contrast((2, 0, 3), ("Gamma", "Alpha", "Delta"), auto=True)
    assert nearest.label() == "Gamma +2"  # the montage's tile title
    assert nearest.described() == "Gamma and 2 more near classes"  # the app's caption and alternative text
    assert Contrast((2, 0), ("Gamma", "Alpha"), auto=True).described() == "Gamma and 1 more near class"
