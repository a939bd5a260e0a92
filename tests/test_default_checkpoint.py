"""The shipped default checkpoint, its model card and its sample gallery."""

import copy
import json
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image

import mcloss
from mcloss.core.checkpoint import rewrite_card, weights_digest
from mcloss.data.synth import class_definitions
from mcloss.explainability.explanation import explain

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "default.safetensors"
SAMPLES = ROOT / "checkpoints" / "samples"
sys.path.insert(0, str(ROOT / "scripts"))

import default_checkpoint as generator  # noqa: E402


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


def test_the_shipped_card_says_what_was_measured(model):
    card = model.card
    readme = (ROOT / "checkpoints" / "README.md").read_text()
    # the words are those its stored scores give today (else: make rewrite-card), in the checkpoint and beside it
    assert generator.render_card(card) == card, "the card's words are stale: run make rewrite-card"
    assert card["text"] == readme
    # CCMP ÷ Grad-CAM's paired interval holds 1 (0.99–1.19): a tie, not "met"
    assert generator.verdict(card["parts"]["defining"]["versus_gradcam"]["ccmp"]["ci"]) == "tie"
    assert card["goals"]["above Grad-CAM"] == "tie"
    line = next(line for line in readme.splitlines() if line.startswith("- Above Grad-CAM"))
    assert "— tie: met only when both paired intervals lie above 1." in line and "— met" not in line
    assert [g for g, said in card["goals"].items() if said != "met"] == ["above Grad-CAM"]
    # scores the card predates are left out or shown as not measured, never as absent knowledge
    assert "No defining parts known" not in readme and "300 images; top-1 FC head 0.943" in readme


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


# ------------------------------------------------------------------------------------- the card's words


def _defining(ccmp: tuple, channels: tuple, gradcam: float = 5.5, versus: tuple | None = ((1.01, 1.2), (1.1, 1.4))) -> dict:
    """A defining-part block: (ratio, interval) of CCMP and of each channel, Grad-CAM's ratio, the paired
    intervals of CCMP ÷ Grad-CAM and each channel ÷ Grad-CAM (None: a scoring before them)."""
    methods = {
        "ccmp": {"mass_ratio": ccmp[0], "mass_ratio_ci": list(ccmp[1])},
        "channels": {"mass_ratio": channels[0], "mass_ratio_ci": list(channels[1]), "peak_share": 0.8, "peak_chance": 0.3},
        "gradcam": {"mass_ratio": gradcam, "mass_ratio_ci": [gradcam - 0.5, gradcam + 0.5]},
    }
    block = {"methods": methods}
    if versus is not None:
        block["versus_gradcam"] = {k: {"quotient": 1.0, "ci": list(ci)} for k, ci in zip(("ccmp", "channels"), versus, strict=True)}
    return block


TWIN = _defining((2.4, (2.1, 2.6)), (0.83, (0.7, 1.0)))


@pytest.mark.parametrize(
    ("versus", "said"),
    [
        (((1.01, 1.2), (1.2, 1.45)), "met"),  # both paired intervals above 1
        (((0.99, 1.19), (1.2, 1.45)), "tie"),  # the shipped default's: CCMP ÷ Grad-CAM holds 1
        (((0.8, 0.95), (1.2, 1.45)), "not met"),  # one below 1
        (((0.9, 1.1), (0.95, 1.05)), "tie"),
    ],
)
def test_above_gradcam_is_met_only_when_both_paired_intervals_lie_above_1(versus, said):
    goals = generator.goal_verdicts(_defining((6.0, (5.6, 6.3)), (7.3, (6.8, 7.7)), versus=versus), 0.94, TWIN)
    assert goals["above Grad-CAM"] == said
    # without the paired intervals (a scoring from before them) the ratios alone decide
    old = generator.goal_verdicts(_defining((6.0, (5.6, 6.3)), (7.3, (6.8, 7.7)), versus=None), 0.94, TWIN)
    assert old["above Grad-CAM"] == "met"


def test_goals_with_an_interval_holding_their_bound_are_ties():
    goals = generator.goal_verdicts(_defining((2.1, (1.9, 2.3)), (1.6, (1.4, 1.8))), 0.94, TWIN)
    assert goals["CCMP ≥ 2.0"] == goals["channels ≥ 1.5"] == "tie"
    goals = generator.goal_verdicts(_defining((1.9, (1.7, 1.95)), (1.6, (1.51, 1.8))), 0.94, TWIN)
    assert (goals["CCMP ≥ 2.0"], goals["channels ≥ 1.5"]) == ("not met", "met")
    # the CE twin's channels: met when the two intervals lie apart, a tie when they overlap
    assert goals["above the CE twin's channels"] == "met"
    assert generator.goal_verdicts(_defining((6.0, (5.6, 6.3)), (0.9, (0.8, 1.1))), 0.94, TWIN)["above the CE twin's channels"] == "tie"
    # no interval is stored for the peak share and the top-1: their values decide, as before
    assert generator.goal_verdicts(_defining((6.0, (5.6, 6.3)), (7.3, (6.8, 7.7))), 0.899, TWIN)["top-1 ≥ 0.90"] == "not met"


def _old_card(ci: list[float]) -> dict:
    """The shipped card's scores with CCMP ÷ Grad-CAM's paired interval ``ci``, and the words a card carried
    before it said ties ("met")."""
    card = copy.deepcopy({k: v for k, v in mcloss.read_metadata(CHECKPOINT)["card"].items() if k not in ("goals", "text")})
    card["parts"]["defining"]["versus_gradcam"]["ccmp"]["ci"] = ci
    return card | {"goals": {"above Grad-CAM": "met"}, "text": "- Above Grad-CAM of the same model: — met."}


@pytest.mark.parametrize(("ci", "said"), [([0.9943, 1.1856], "tie"), ([1.02, 1.19], "met"), ([0.85, 0.97], "not met")])
def test_rewrite_card_says_tie_when_the_interval_holds_1_and_changes_no_tensor_byte(tmp_path, capsys, ci, said):
    path = tmp_path / "default.safetensors"
    model = tiny_model(2)
    model.card = _old_card(ci)
    mcloss.save_checkpoint(model, path)
    before = weights_digest(path)
    assert generator.main(["--rewrite-card", str(path)]) == 0
    card = mcloss.read_metadata(path)["card"]
    assert card["goals"]["above Grad-CAM"] == said
    line = next(line for line in card["text"].splitlines() if line.startswith("- Above Grad-CAM"))
    ending = "— tie: met only when both paired intervals lie above 1." if said == "tie" else f"— {said}."
    assert ending in line and line.count("— ") == 1
    assert (tmp_path / "README.md").read_text() == card["text"]  # the model card beside it is the same text
    # only the card changed: the scores it stores are as they were, and so is every tensor byte
    assert {k: v for k, v in card.items() if k not in ("goals", "text")} == {k: v for k, v in _old_card(ci).items() if k not in ("goals", "text")}
    assert weights_digest(path) == before
    loaded = mcloss.load_checkpoint(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert f"weights sha256 {before} before and after" in capsys.readouterr().out
    # again: nothing to change
    mtime = path.stat().st_mtime_ns
    assert generator.main(["--rewrite-card", str(path)]) == 0
    assert path.stat().st_mtime_ns == mtime and "already up to date" in capsys.readouterr().out


def test_rewrite_card_refuses_a_card_without_the_defaults_scores(tmp_path, capsys):
    path = tmp_path / "twin.safetensors"
    model = tiny_model(2)
    model.card = {"twin_of": "default.safetensors", "parts": {"defining": {}}}
    mcloss.save_checkpoint(model, path)
    data = path.read_bytes()
    assert generator.main(["--rewrite-card", str(path)]) == 2
    assert "its card is a CE twin's: no default model card to render; nothing rewritten" in capsys.readouterr().err
    assert path.read_bytes() == data and not (tmp_path / "README.md").exists()
    assert generator.main(["--rewrite-card", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err


def test_the_generator_and_the_rewrite_are_one_code_path(tmp_path, monkeypatch, capsys):
    """make default-checkpoint, its slow steps replaced by the shipped scores, then --rewrite-card on its output."""
    shipped = mcloss.read_metadata(CHECKPOINT)["card"]
    parts = shipped["parts"]
    summary = {k: parts[k] for k in ("defining", "images", "hit_radius", "channel_part_matrix_normalized", "part_names")}
    summary |= {"methods": {k: parts[k] for k in ("channels", "gradcam", "random")}, "scored_images": 300, "channels_per_group": [3]}
    twin_summary = {"defining": parts["ce_twin_defining"]}
    run_card = {k: shipped[k] for k in ("run_id", "seed", "command", "epoch", "epochs", "loss", "alpha", "beta", "dis_topk")}
    models = {"default-train": tiny_model(12, class_names=list(shipped["defining_parts"]), last_stage=2),
              "default-train-ce": tiny_model(12, class_names=list(shipped["defining_parts"]), last_stage=2, seed=1)}  # fmt: skip
    for name, m in models.items():
        m.card = run_card | {"metrics": shipped["metrics"]["train_epoch"], "loss": "ce" if name.endswith("ce") else "mc"}
    monkeypatch.setattr(generator, "ensure_dataset", lambda spec, out: None)
    monkeypatch.setattr(generator, "run_training", lambda args, run, epochs: 60.0)
    monkeypatch.setattr(generator, "load_checkpoint", lambda path: models[Path(path).parent.name])
    monkeypatch.setattr(generator, "top1", lambda m, root: dict(
        shipped["ce_twin"]["fresh"] if m is models["default-train-ce"] else shipped["metrics"]["fresh" if root.name.endswith("fresh") else "test"]
    ))  # fmt: skip
    monkeypatch.setattr(generator, "score_parts", lambda m, *a, **k: twin_summary if m is models["default-train-ce"] else summary)
    monkeypatch.setattr(generator, "make_gallery", lambda *a: [])
    out = tmp_path / "checkpoints"
    assert generator.main(["--work", str(tmp_path / "runs"), "--out", str(out)]) == 0
    target = out / "default.safetensors"
    card = mcloss.read_metadata(target)["card"]
    readme = (out / "README.md").read_text()
    assert card["text"] == readme and card["goals"]["above Grad-CAM"] == "tie"
    goals = [line for line in readme.splitlines() if line.startswith("- ")]
    assert goals == [line for line in (ROOT / "checkpoints" / "README.md").read_text().splitlines() if line.startswith("- ")]
    # the rewrite of what the generator wrote finds nothing to change: the same words from the same scores
    data = target.read_bytes()
    capsys.readouterr()
    assert generator.main(["--rewrite-card", str(target)]) == 0
    assert "already up to date" in capsys.readouterr().out
    assert target.read_bytes() == data and (out / "README.md").read_text() == readme
    # and from the scores alone (its words removed) it writes the generator's words again
    rewrite_card(target, {k: v for k, v in card.items() if k not in ("goals", "text")})
    assert generator.main(["--rewrite-card", str(target)]) == 0
    assert mcloss.read_metadata(target)["card"] == card and (out / "README.md").read_text() == readme
