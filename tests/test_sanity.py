"""Sanity checks against planted truth: similarity measures, the cascade's order, the MC head's knockout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model

import mcloss
from mcloss.cli import main as cli_main
from mcloss.data.cub import CUBDataset
from mcloss.data.synth import generate_dataset
from mcloss.evaluation.sanity import (
    cascade_steps,
    cascading_randomization,
    class_maps,
    group_knockout,
    knockout_verdict,
    rank_correlation,
    run_sanity,
    ssim,
)


def test_similarity_measures_on_planted_maps():
    rng = np.random.default_rng(0)
    a = rng.random((8, 8))
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(a, 3 * a**2 + 1) == pytest.approx(1.0)  # ranks only
    assert rank_correlation(a, np.ones((8, 8))) == 0.0  # a map that lost all structure agrees with nothing
    assert np.isnan(rank_correlation(np.ones((8, 8)), np.zeros((8, 8))))
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 5 * a + 2) == pytest.approx(1.0)  # each map is rescaled to [0, 1] first
    assert abs(ssim(a, rng.random((8, 8)))) < 0.4 and ssim(a, 1 - a) < 0
    with pytest.raises(ValueError):
        ssim(a, a[:4])


def test_cascade_randomizes_from_the_head_down_and_leaves_the_model_alone():
    model = tiny_model(3, img_size=64, last_stage=2)  # 16 x 16 maps
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)), [0, 1, 2, 0]
    steps = cascade_steps(model)
    assert steps == ["head", "features.5", "features.4", "features.1", "features.0"]  # layer2, layer1, bn1, conv1
    rows = cascading_randomization(model, [(x, t)], seed=3)
    assert [r["randomized"] for r in rows] == ["none", *steps]
    assert rows[0]["ccmp"]["spearman"] == pytest.approx([1.0] * 4) and rows[0]["gradcam"]["ssim"] == pytest.approx([1.0] * 4)
    # the channel maps read F: re-initializing the head alone cannot change them, but it changes Grad-CAM
    assert rows[1]["channels"]["ssim"] == pytest.approx([1.0] * 4) and rows[1]["ccmp"]["spearman"] == pytest.approx([1.0] * 4)
    assert np.nanmean(rows[1]["gradcam"]["spearman"]) < 0.9
    assert np.nanmean(rows[-1]["channels"]["spearman"]) < 0.9
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = cascading_randomization(model, [(x, t)], seed=3)
    assert again[-1]["ccmp"]["spearman"] == rows[-1]["ccmp"]["spearman"]  # seeded


def test_knockout_of_the_own_group_zeroes_the_mc_logit_and_random_channels_leave_it():
    model = tiny_model(4, img_size=32)
    x, t = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2)), [0, 1, 2, 3, 1]
    drops = group_knockout(model, x, t, draws=3)
    with torch.no_grad():
        mc = model.mc_logits(model.forward_features(x))[torch.arange(5), torch.tensor(t)].double().numpy()
    # CCMP + GAP of a zeroed group is 0: the drop is the whole logit; other classes' channels do not enter it
    np.testing.assert_allclose(drops["mc_own"], mc, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(drops["mc_random"], np.zeros(5))
    assert drops["fc_own"].shape == drops["fc_random"].shape == (5,)
    maps = class_maps(model, x, t)
    assert len(maps["channels"]) == 5 and maps["channels"][0].shape[0] == 3 and maps["ccmp"].shape == maps["gradcam"].shape


def test_knockout_verdict():
    yes = knockout_verdict(np.array([5.0, 6.0, 5.5, 7.0]), np.array([0.0, 0.1, 0.0, 0.2]), "FC")
    assert yes.depends and yes.difference == pytest.approx(5.8) and "FC head depends" in yes.sentence()
    no = knockout_verdict(np.array([1.0, 0.0, 1.0, 0.0]), np.array([0.0, 1.0, 0.0, 1.0]), "FC")
    assert not no.depends and "does not measurably depend" in no.sentence()
    assert not knockout_verdict(np.array([3.0]), np.array([0.0]), "FC").depends  # one image: no spread known


def test_run_sanity_reports_one_verdict_per_check():
    model = tiny_model(3, img_size=32)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    summary = run_sanity(model, [(x[:3], [0, 1, 2]), (x[3:], [2, 1, 0])], draws=2)
    assert summary["images"] == 6 and len(summary["cascade"]) == len(cascade_steps(model)) + 1
    assert [c["check"] for c in summary["checks"]] == [
        "cascading randomization: channels", "cascading randomization: ccmp", "cascading randomization: gradcam",
        "group knockout: FC head", "group knockout: MC head", "random logit: ccmp",
    ]  # fmt: skip
    assert summary["checks"][4]["passed"]  # the MC head is its own group's by construction
    assert all(o != t for o, t in zip(summary["random_logit"]["other"], [0, 1, 2, 2, 1, 0], strict=True))
    json.dumps({k: v for k, v in summary.items() if k != "cascade_per_image"})  # JSON-friendly


def test_cli_writes_every_output(tmp_path, capsys):
    data = tmp_path / "birds"
    generate_dataset(data, 3, 4, 32, 0)
    ckpt = tmp_path / "m.safetensors"
    names = CUBDataset(data, "test").class_names
    mcloss.save_checkpoint(tiny_model(3, img_size=32, class_names=names), ckpt)
    out = tmp_path / "sanity"
    assert cli_main(["sanity", "--checkpoint", str(ckpt), "--data", str(data), "--limit", "5", "--draws", "2",
                     "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    for name in ("cascade.csv", "knockout.csv", "random_logit.csv", "sanity.json", "cascade.png", "knockout.png",
                 "summary.md", "config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    md = (out / "summary.md").read_text()
    assert md.count("- **passed**") + md.count("- **FAILED**") == 6
    assert "summary" not in capsys.readouterr().err
    assert cli_main(["sanity", "--checkpoint", str(ckpt), "--data", str(data), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    # an earlier run is kept unless --overwrite; data of other classes is refused, before any work
    again = ["sanity", "--checkpoint", str(ckpt), "--data", str(data), "--limit", "2", "--draws", "1", "--out", str(out)]
    before = (out / "sanity.json").read_bytes()
    assert cli_main(again) == 2
    assert capsys.readouterr().err.strip() == (
        f"mcloss sanity: error: --out {out}: already holds a sanity run; pass --overwrite or choose another --out"
    )
    assert (out / "sanity.json").read_bytes() == before
    assert cli_main([*again, "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["limit"] == 2
    capsys.readouterr()
    other = tmp_path / "other.safetensors"
    mcloss.save_checkpoint(tiny_model(3, img_size=32, class_names=[names[0], names[2], names[1]]), other)
    fresh = tmp_path / "fresh"
    assert cli_main(["sanity", "--checkpoint", str(other), "--data", str(data), "--out", str(fresh)]) == 2
    reason = f"class 1 is {names[1]!r} in the data but {names[2]!r} in the checkpoint"
    assert capsys.readouterr().err.strip() == f"mcloss sanity: error: {data}: its classes do not match the checkpoint's ({reason})"
    assert not fresh.exists()


def test_knockout_of_a_group_the_fc_head_never_reads_changes_nothing():
    model = tiny_model(3, img_size=32)
    gh, gw = model.config["head_grid"]
    used = model.group_slice(0)
    linear = model.head.classifier[1]
    with torch.no_grad():  # the FC head reads class 0's channels only
        keep = torch.zeros(linear.in_features, dtype=torch.bool)
        keep[used.start * gh * gw : used.stop * gh * gw] = True
        linear.weight[:, ~keep] = 0
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    dead = group_knockout(model, x, [1, 2, 1, 2], draws=2)
    np.testing.assert_array_equal(dead["fc_own"], np.zeros(4))  # groups 1 and 2: unused by the head
    only = group_knockout(model, x, [0, 0, 0, 0], draws=2)
    assert (np.abs(only["fc_own"]) > 1e-4).all()  # the only group the head reads: its logit moves
    verdict = knockout_verdict(np.abs(only["fc_own"]), np.abs(only["fc_random"]), "FC")
    assert verdict.depends


def test_groups_of_different_sizes_are_checked_too():
    torch.manual_seed(0)
    model = mcloss.build_model("resnet18", 3, xi=None, img_size=32).eval()  # the native split: 170, 171, 171
    assert len({model.group_slice(c).stop - model.group_slice(c).start for c in range(3)}) == 2
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    summary = run_sanity(model, [(x, [0, 1, 2])], draws=1)
    assert summary["images"] == 3 and len(summary["checks"]) == 6


def test_cli_spreads_the_images_over_a_split_smaller_than_the_limit(tmp_path, capsys):
    data = tmp_path / "birds"
    generate_dataset(data, 2, 10, 32, 0, test_fraction=0.5)
    names = CUBDataset(data, "test").class_names
    ckpt = tmp_path / "m.safetensors"
    mcloss.save_checkpoint(tiny_model(2, img_size=32, class_names=names), ckpt)
    out = tmp_path / "s"
    assert cli_main(["sanity", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--draws", "1"]) == 0
    assert json.loads((out / "sanity.json").read_text())["images"] == len(CUBDataset(data, "test").records)


def test_too_few_images_give_numbers_but_no_verdict(tmp_path):
    """Issue 26 item 10: ``--limit 1`` gave passed / FAILED from one image; below MIN_VERDICT_IMAGES the checks
    keep their numbers and say there are too few images for a verdict."""
    from mcloss.evaluation.sanity import MIN_VERDICT_IMAGES
    from mcloss.evaluation.sanity_report import summary_markdown

    model = tiny_model(3, img_size=32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    summary = run_sanity(model, [(x, [0, 1])], draws=2)
    assert MIN_VERDICT_IMAGES > 2 and all(c["passed"] is None for c in summary["checks"])
    assert all(c["line"].startswith(f"too few images for a verdict (2 of the {MIN_VERDICT_IMAGES} it needs); ")
               for c in summary["checks"])  # fmt: skip
    assert all(c["value"] is not None for c in summary["checks"][:3])
    md = summary_markdown(summary, "tiny")
    assert md.count("- **no verdict**") == 6 and "**passed**" not in md and "**FAILED**" not in md
