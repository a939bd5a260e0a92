"""The shipped default checkpoint, its model card and its sample gallery."""

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mcloss
from mcloss.data.synth import class_definitions
from mcloss.explainability.explanation import explain

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "default.safetensors"
SAMPLES = ROOT / "checkpoints" / "samples"


@pytest.fixture(scope="module")
def model():
    return mcloss.load_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def gallery():
    return json.loads((SAMPLES / "index.json").read_text())


def test_loads_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_checkpoint tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = mcloss.load_checkpoint(CHECKPOINT)
    assert not model.training
    assert CHECKPOINT.stat().st_size <= 25 * 1024 * 1024


def test_classes_are_the_synthetic_dataset_classes(model):
    ds = model.card["dataset"]
    assert set(ds) >= {"classes", "per_class", "size", "seed"}
    assert model.num_classes == ds["classes"] and model.groups == [3] * ds["classes"]
    classes = class_definitions(ds["classes"], ds.get("design", "single"))
    assert model.class_names == [c.name for c in classes]
    assert model.card["defining_parts"] == {c.name: list(c.changed) for c in classes}


def test_predicts_the_gallery(model, gallery):
    samples = gallery["samples"]
    assert len(samples) >= 20
    assert gallery["class_names"] == model.class_names
    images = [mcloss.load_image(SAMPLES / s["file"]) for s in samples]
    exps = explain(model, images, targets="pred", maps=("channels",))
    predicted = [e.prediction for e in exps]
    assert predicted == [s["label"] for s in samples]
    for s in samples:
        assert len(s["parts"]) == len(gallery["part_names"])
        labels = np.asarray(Image.open(SAMPLES / s["mask"]))  # the part masks travel with the gallery
        assert labels.shape == np.asarray(Image.open(SAMPLES / s["file"])).shape[:2]
        assert labels.max() <= len(gallery["part_names"]) + 1


def test_card_matches_metadata_and_readme(model):
    card = model.card
    meta = mcloss.read_metadata(CHECKPOINT)
    assert meta["card"] == card
    readme = (ROOT / "checkpoints" / "README.md").read_text()
    for key in ("dataset_command", "fresh_command", "train_command"):
        assert f"`{card[key]}`" in readme
    for split in ("test", "fresh"):
        m = card["metrics"][split]
        row = next(line for line in readme.splitlines() if line.startswith(f"| {'test split' if split == 'test' else 'fresh instances'}"))
        assert f"| {m['fc_top1']:.3f} | {m['mc_top1']:.3f} |" in row
    hit = card["parts"]["channels"]["hit_rate"]
    assert re.search(rf"\| channels \(CCMP\) \|[^\n]*{hit:.3f}", readme)
    # the card and the README lead with the defining-part numbers, beside the CE-only twin's
    defining = card["parts"]["defining"]["methods"]
    twin = card["parts"]["ce_twin_defining"]["methods"]
    assert readme.index("| this | CCMP |") < readme.index("| channels (CCMP) |")
    assert f"| this | CCMP | {defining['ccmp']['peak_share']:.3f} |" in readme
    assert f"| baseline | each channel | {twin['channels']['peak_share']:.3f} |" in readme
    assert f"**{defining['ccmp']['mass_ratio']:.2f}×**" in readme
    # the "above Grad-CAM" goal comes with its paired interval, which the card's scores carry
    versus = card["parts"]["defining"]["versus_gradcam"]["ccmp"]
    assert f"CCMP ÷ Grad-CAM {versus['quotient']:.2f}× ({versus['ci'][0]:.2f}–{versus['ci'][1]:.2f}" in readme
    assert f"{card['train_seconds'] / 60:.1f} min" in readme


def test_channel_maps_of_a_gallery_image(model, gallery):
    sample = gallery["samples"][0]
    image = mcloss.load_image(SAMPLES / sample["file"])
    exp = explain(model, [image], targets=sample["label"])[0]
    group = exp.groups[0]
    x = model.transform(image)[None]
    with torch.no_grad():
        feats = model.forward_features(x)[0, model.group_slice(sample["label"])].numpy()
    np.testing.assert_allclose(group.channels, feats, rtol=1e-5, atol=1e-6)
    assert group.peaks_xy.shape == (3, 2)
    w, h = exp.image_size
    assert (group.peaks_xy >= 0).all() and (group.peaks_xy[:, 0] < w).all() and (group.peaks_xy[:, 1] < h).all()


def test_ce_twin_is_shipped_beside_the_default(model):
    path = CHECKPOINT.with_name("ce-baseline.safetensors")
    assert path.stat().st_size <= 25 * 1024 * 1024
    twin = mcloss.load_checkpoint(path)
    card = twin.card
    assert twin.class_names == model.class_names and twin.groups == model.groups
    assert twin.config["feature_hw"] == model.config["feature_hw"] and twin.config["last_stage"] == model.config["last_stage"]
    assert card["loss"] == "ce" and card["twin_of"] == "default.safetensors" and "CE-only twin" in card["what"]
    assert card["train_command"] == model.card["ce_twin"]["train_command"] and "--loss ce" in card["train_command"]
    assert card["metrics"]["fresh"] == model.card["ce_twin"]["fresh"]
    assert card["parts"]["defining"] == model.card["parts"]["ce_twin_defining"]
