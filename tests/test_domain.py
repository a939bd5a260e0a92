"""The domain check: its score by hand, its calibration, the checkpoint round trip, the same pass in explain,
the export and eval reports, the app's warning, and the shipped default against real photos and unseen birds."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

import mcloss
from mcloss.cli.domain import main as domain_main
from mcloss.cli.eval import main as eval_main
from mcloss.cli.export import main as export_main
from mcloss.core.checkpoint import CheckpointError, weights_digest
from mcloss.core.domain import DomainCheck, DomainVerdict, domain_features
from mcloss.data.synth import generate_dataset
from mcloss.evaluation.domain import auroc, domain_auroc, fit_domain, image_scores
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "default.safetensors"
sys.path.insert(0, str(ROOT / "scripts"))


def test_domain_features_and_score_by_hand():
    f = torch.zeros(2, 3, 2, 5)
    f[0, 0] = torch.arange(10.0).reshape(2, 5)  # top 20 % of 10 cells: the mean of 9 and 8
    f[0, 2] = 3.0
    f[1, 1] = -1.0  # below 0: pooled to 0
    z = domain_features(f, pool_share=0.2)
    expected = torch.tensor([np.log1p(8.5), 0.0, np.log1p(3.0)], dtype=torch.float32)
    torch.testing.assert_close(z[0], expected / expected.norm())
    assert float(z[1].norm()) == 0.0  # nothing positive: the zero vector (distance 1 to everything)
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [1.0, 0, 1.0]]), dim=1)
    check = DomainCheck(bank, threshold=0.1, k=2, pool_share=0.2)
    cos = (bank @ z[0]).sort(descending=True).values
    scores = check.scores(f)
    torch.testing.assert_close(scores[0], 1 - cos[1])  # the 2nd nearest
    torch.testing.assert_close(scores[1], torch.tensor(1.0))
    verdicts = check.verdicts(f)
    assert verdicts[1] == DomainVerdict(1.0, 0.1) and not verdicts[1].in_domain
    assert verdicts[0].in_domain == (float(scores[0]) <= 0.1)
    with pytest.raises(mcloss.ParameterError, match="k must be"):
        DomainCheck(bank, 0.1, k=4)


def test_auroc_counts_ties_half_and_the_bootstrap_resamples_groups():
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert auroc(np.array([0.0, 2.0]), np.array([1.0])) == 0.5
    result = domain_auroc(np.array([0.1, 0.2, 0.3]), np.array([0.25, 0.9, 0.95]), 0.22, groups=["a", "b", "b"])
    assert result["auroc"] == pytest.approx(8 / 9) and result["outside_groups"] == 2
    assert result["inside_pass"] == pytest.approx(2 / 3) and result["outside_flagged"] == 1.0
    lo, hi = result["auroc_ci"]
    assert lo <= result["auroc"] <= hi


def _images(n: int, seed: int, bright: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g) * bright


def test_fit_domain_calibrates_the_quantile_and_survives_a_checkpoint(tmp_path):
    model = tiny_model(3)
    train = TensorDataset(_images(40, 0, 1.0), torch.zeros(40, dtype=torch.long))
    held = TensorDataset(_images(40, 1, 1.0), torch.zeros(40, dtype=torch.long))
    record = fit_domain(model, train, held, k=5, quantile=0.9, bank_size=30, batch_size=16)
    assert record["bank_images"] == 30 and record["held_out_images"] == 40
    assert model.domain.bank.shape == (30, model.num_channels) and model.config["domain"]["k"] == 5
    scores = model.domain.scores(model.forward_features(held.tensors[0]).detach())
    assert float((scores <= model.domain.threshold).float().mean()) == pytest.approx(record["held_out_pass"])
    assert record["held_out_pass"] >= 0.9
    path = tmp_path / "m.safetensors"
    mcloss.save_checkpoint(model, path)
    back = mcloss.load_checkpoint(path)
    torch.testing.assert_close(back.domain.bank, model.domain.bank)
    assert back.domain.threshold == model.domain.threshold and back.domain.calibration == record
    # a model without one loads as before; a config that does not fit its bank is refused in one line
    plain = tmp_path / "plain.safetensors"
    mcloss.save_checkpoint(tiny_model(3), plain)
    assert mcloss.load_checkpoint(plain).domain is None
    model.config["domain"]["bank"] = [30, 5]
    mcloss.save_checkpoint(model, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: domain: bank of 5-channel vectors"):
        mcloss.load_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(mcloss.DatasetError, match="too few"):
        fit_domain(tiny_model(3), train, TensorDataset(*held[:5]))


def test_explain_and_the_export_report_the_domain_from_the_same_pass(tmp_path, monkeypatch):
    model = tiny_model(3, img_size=32)
    train = TensorDataset(_images(30, 0, 1.0)[:, :, :32, :32], torch.zeros(30, dtype=torch.long))
    fit_domain(model, train, train, k=3)
    calls = []
    forward = model.forward_features
    monkeypatch.setattr(model, "forward_features", lambda x: calls.append(1) or forward(x))
    img = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    dark = Image.new("RGB", (32, 32), (0, 0, 0))
    ex = mcloss.explain(model, [img, dark])
    assert len(calls) == 1
    assert ex[1].domain.score > ex[1].domain.threshold and not ex[1].domain.in_domain  # nothing like the bank
    rec = ex[1].record()
    assert rec["domain"] == {"available": True, "score": ex[1].domain.score, "threshold": model.domain.threshold,
                             "in_domain": False}  # fmt: skip
    assert mcloss.explain(tiny_model(3), img).record()["domain"] == {"available": False}
    # the export: json and index.csv
    ckpt = tmp_path / "m.safetensors"
    monkeypatch.undo()
    mcloss.save_checkpoint(model, ckpt)
    src = tmp_path / "in"
    src.mkdir()
    img.save(src / "noise.png")
    dark.save(src / "dark.png")
    out = tmp_path / "out"
    assert export_main(["--checkpoint", str(ckpt), "--input", str(src), "--out", str(out), "--device", "cpu",
                        "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    with (out / "index.csv").open() as f:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(f)}
    assert rows["dark.png"]["in_domain"] == "false" and float(rows["dark.png"]["domain_score"]) > model.domain.threshold
    assert json.loads((out / "in" / "dark.png.json").read_text())["domain"]["in_domain"] is False


@pytest.fixture(scope="module")
def tiny_birds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("domain") / "birds"
    generate_dataset(root, classes=3, per_class=30, size=48, seed=5, test_fraction=0.7, design="combo")
    return root


def test_domain_and_eval_commands(tmp_path, tiny_birds, capsys):
    meta = json.loads((tiny_birds / "synth.json").read_text())
    names = [c["name"] for c in meta["class_definitions"]]
    ckpt = tmp_path / "m.safetensors"
    mcloss.save_checkpoint(tiny_model(3, class_names=names, img_size=48), ckpt)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        Image.fromarray((np.random.default_rng(i).random((40, 60, 3)) * 255).astype(np.uint8)).save(photos / f"{i}.jpg")
    # without statistics, eval --ood says the check is unavailable
    assert eval_main(["--checkpoint", str(ckpt), "--data", str(tiny_birds), "--workers", "0", "--ood", str(photos)]) == 2
    assert "domain check unavailable" in capsys.readouterr().err
    out = tmp_path / "d.safetensors"
    argv = ["--checkpoint", str(ckpt), "--data", str(tiny_birds), "--out", str(out), "--workers", "0", "--k", "5"]
    assert domain_main([*argv, "--ood", str(photos)]) == 0
    printed = capsys.readouterr().out
    assert "95.2% of 63 held-out in-domain images pass" in printed and "AUROC of 4 out-of-domain images" in printed
    model = mcloss.load_checkpoint(out)
    assert model.card["domain"]["held_out_images"] == 63 and model.card["domain"]["ood"]["outside"] == 4
    assert weights_digest(out) != weights_digest(ckpt)  # the bank is saved with the weights
    report = tmp_path / "eval.json"
    assert eval_main(["--checkpoint", str(out), "--data", str(tiny_birds), "--workers", "0", "--ood", str(photos),
                      "--json", str(report)]) == 0  # fmt: skip
    assert 0 <= json.loads(report.read_text())["domain"]["auroc"] <= 1
    # an unreadable image is skipped with one line naming it; an --ood that gives no file at all is refused
    # before the evaluation, in one line, and no report is written
    (photos / "empty.jpg").write_bytes(b"")
    capsys.readouterr()
    evaluated = ["--checkpoint", str(out), "--data", str(tiny_birds), "--workers", "0"]
    assert eval_main([*evaluated, "--ood", str(photos)]) == 0
    assert capsys.readouterr().err.strip() == f"mcloss eval: skipped {photos / 'empty.jpg'}: empty file"
    missing, late = tmp_path / "missing", tmp_path / "late.json"
    assert eval_main([*evaluated, "--ood", str(missing), "--json", str(late)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"mcloss eval: error: --ood: no out-of-domain image ({missing}: file not found)"
    assert captured.out == "" and not late.exists()
    assert domain_main([*argv, "--ood", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"mcloss domain: error: --ood: no out-of-domain image ({missing}: file not found)"
    assert domain_main([*argv[:4], "--out", str(tmp_path / "x.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the shipped default


@pytest.fixture(scope="module")
def shipped():
    model = mcloss.load_checkpoint(SHIPPED)
    assert model.domain is not None, "the shipped default carries its domain statistics"
    return model


def test_the_shipped_default_flags_real_photos(shipped, tmp_path):
    from ood_photos import write_set

    photos = write_set(tmp_path / "photos", crops=1, seed=3)
    birds = tmp_path / "birds"
    generate_dataset(birds, classes=12, per_class=4, size=224, seed=21, test_fraction=1.0, object_scale=1.6, design="varied")
    inside, _ = image_scores(shipped, sorted((birds / "images").rglob("*.jpg")))
    outside, skipped = image_scores(shipped, photos)
    assert not skipped and len(outside) >= 60
    # 0.989 on this small draw (48 birds, 69 photo variants); the goal (>= 0.99) is measured on the full sets in
    # docs/domain.md: 0.996 of 300 fresh birds against 138 photo variants
    assert auroc(inside, outside) >= 0.98
    assert np.mean(outside > shipped.domain.threshold) >= 0.85


def test_the_shipped_default_flags_birds_of_an_unseen_combination(shipped, tmp_path):
    birds = tmp_path / "birds16"
    generate_dataset(birds, classes=16, per_class=6, size=224, seed=23, test_fraction=1.0, object_scale=1.6, design="varied")
    files = sorted((birds / "images").rglob("*.jpg"))
    known = [f for f in files if int(f.parent.name.split(".")[0]) <= 12]
    unseen = [f for f in files if int(f.parent.name.split(".")[0]) > 12]  # 4 two-part combinations never trained on
    inside, _ = image_scores(shipped, known)
    outside, _ = image_scores(shipped, unseen)
    assert len(unseen) == 24 and auroc(inside, outside) >= 0.9
