"""mcloss maps handed to Captum and Quantus: Captum's shapes and tools, Quantus's metrics with mcloss's numbers."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import quantus
import torch
from captum.attr import LayerAttribution, LayerGradCam, visualization
from conftest import hooks_left, tiny_model
from PIL import Image

from mcloss.core.checkpoint import default_checkpoint, load_checkpoint
from mcloss.core.errors import ParameterError
from mcloss.explainability.explanation import explain
from mcloss.interop.captum import ChannelGroupAttribution
from mcloss.interop.quantus import explain_func


def test_captum_shapes_and_values_match_mclosss_maps():
    model = tiny_model(4, xi=3, img_size=64)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    attribution = ChannelGroupAttribution(model)
    ccmp = attribution.attribute(x, target=[0, 1, 3], kind="ccmp")
    channels = attribution.attribute(x, target=[0, 1, 3], kind="channels")
    one = attribution.attribute(x, target=2, kind="channel", channel=1)
    with torch.no_grad():
        f = model.forward_features(x)
    hw = tuple(f.shape[2:])
    assert ccmp.shape == (3, 1, *hw) and channels.shape == (3, 3, *hw) and one.shape == (3, 1, *hw)
    assert torch.allclose(channels[1], f[1, 3:6], atol=1e-5)  # class 1 owns channels 3..5
    assert torch.allclose(ccmp[2, 0], f[2, 9:12].amax(0), atol=1e-5)
    assert torch.allclose(one[:, 0], f[:, 7], atol=1e-5)
    pred = attribution.attribute(x, kind="ccmp")
    assert torch.allclose(pred[0], attribution.attribute(x[:1], target=int(model(x[:1]).argmax()), kind="ccmp")[0], atol=1e-5)
    assert hooks_left(model) == 0


def test_captum_gradcam_kind_equals_captums_layer_gradcam_and_its_tools_work():
    model = tiny_model(4, xi=3, img_size=64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours = ChannelGroupAttribution(model).attribute(x, target=torch.tensor([1, 2]), kind="gradcam")
    theirs = LayerGradCam(model, model.feature_layer).attribute(x, target=[1, 2], relu_attributions=True)
    assert ours.shape == theirs.shape == (2, 1, *model.config["feature_hw"])
    assert torch.allclose(ours, theirs.detach(), rtol=1e-4, atol=1e-6)
    up = LayerAttribution.interpolate(ours, (64, 64), interpolate_mode="bilinear")
    assert up.shape == (2, 1, 64, 64)
    fig, _ = visualization.visualize_image_attr(
        up[0].permute(1, 2, 0).numpy(), x[0].permute(1, 2, 0).numpy(), method="blended_heat_map", use_pyplot=False
    )
    assert fig is not None
    guided = ChannelGroupAttribution(model).attribute(x, target=1, kind="guided")
    assert guided.shape == (2, 1, 64, 64)


def test_uneven_groups_are_padded_and_bad_arguments_refused():
    model = tiny_model(5, xi=None, img_size=64)  # 512 channels over 5 classes: 102 × 3 + 103 × 2
    x = torch.randn(2, 3, 64, 64)
    channels = ChannelGroupAttribution(model).attribute(x, target=[0, 4], kind="channels")
    assert channels.shape == (2, 103, *model.config["feature_hw"])
    assert torch.count_nonzero(channels[0, 102]) == 0  # class 0 has 102 channels: the 103rd is padding
    with pytest.raises(ParameterError, match="target: 3 classes for a batch of 2"):
        ChannelGroupAttribution(model).attribute(x, target=[0, 1, 2])
    with pytest.raises(ParameterError, match="kind must be one of"):
        ChannelGroupAttribution(model).attribute(x, kind="lime")
    with pytest.raises(ParameterError, match="needs channel"):
        ChannelGroupAttribution(model).attribute(x, kind="channel")
    with pytest.raises(ParameterError, match="Quantus takes one"):
        explain_func(model, x.numpy(), np.array([0, 1]), kind="channels")


def test_quantus_metrics_through_the_bridge_give_mcloss_parts_numbers():
    """PointingGame and RelevanceRankAccuracy of Quantus on the bridge's maps equal mcloss parts' pointing game and
    rank accuracy on the same fresh synthetic images and the same defining-part masks."""
    from mcloss.data.cub import CUBDataset
    from mcloss.data.synth import generate_dataset
    from mcloss.evaluation.parts import evaluate_parts

    model = load_checkpoint(default_checkpoint())
    d = model.card["dataset"]
    root = Path(tempfile.mkdtemp()) / "synth"
    generate_dataset(root, d["classes"], 4, d["size"], 11, object_scale=d["object_scale"], design=d["design"])
    block = evaluate_parts(model, root, faithfulness=False)["defining"]
    ds = CUBDataset(root, split="test")
    xs, ys, masks = [], [], []
    for rec in ds.records:
        parts = [ds.part_names.index(p) for p in model.card["defining_parts"].get(ds.class_names[rec.label], [])]
        regions = ds.part_labels(rec)
        defining = np.isin(regions, np.array(parts, int) + 1)
        others = (regions > 0) & (regions <= len(ds.part_names)) & ~defining
        if not parts or not defining.any() or not others.any():
            continue  # not scored by mcloss parts either
        xs.append(model.transform(Image.open(rec.path).convert("RGB")).numpy())
        ys.append(rec.label)
        masks.append(defining[None].astype(np.float32))
    x, y, s = np.stack(xs), np.array(ys), np.stack(masks)
    assert len(x) == block["images"] >= 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in ("ccmp", "gradcam"):
            run = {"model": model, "x_batch": x, "y_batch": y, "a_batch": None, "s_batch": s,
                   "explain_func": explain_func, "explain_func_kwargs": {"kind": kind}}  # fmt: skip
            pointing = np.mean(quantus.PointingGame(disable_warnings=True)(**run))
            rank = np.mean(quantus.RelevanceRankAccuracy(disable_warnings=True)(**run))
            ours = block["methods"][kind]
            assert pointing == pytest.approx(ours["pointing_game"], abs=1e-9), kind
            assert rank == pytest.approx(ours["rank_accuracy"], abs=1e-6), kind


def test_quantus_randomisation_and_faithfulness_metrics_run_on_channel_group_maps():
    model = tiny_model(4, xi=3, img_size=64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).numpy()
    y = np.array([0, 1])
    run = {"model": model, "x_batch": x, "y_batch": y, "a_batch": None, "explain_func": explain_func}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mprt = quantus.MPRT(disable_warnings=True, return_last_correlation=True)(**run, explain_func_kwargs={"kind": "ccmp"})
        emprt = quantus.EfficientMPRT(disable_warnings=True)(**run, explain_func_kwargs={"kind": "gradcam"})
        faith = quantus.FaithfulnessCorrelation(disable_warnings=True, nr_runs=10, subset_size=64)(
            **run, explain_func_kwargs={"kind": "channel", "channel": 0}
        )
    assert len(mprt) == 2 and all(np.isfinite(v) for v in mprt)
    assert len(emprt) == 2 and np.isfinite(faith).all()
    maps = explain_func(model, x, y)
    ccmp = explain(model, Image.new("RGB", (64, 64)), 0).groups[0].ccmp
    assert maps.shape == (2, 1, 64, 64) and ccmp.shape == tuple(model.config["feature_hw"])
