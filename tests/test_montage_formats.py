"""Montages as PNG, JPEG or WebP: quality against the PNG, the recorded options, re-runs in another format."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

import mcloss
from mcloss.cli.export import main as export_main
from mcloss.core.checkpoint import default_checkpoint
from mcloss.core.errors import ParameterError
from mcloss.data.io import DEFAULT_QUALITY, encode_image
from mcloss.data.synth import class_definitions, instance_rng, render_bird
from mcloss.explainability.render import Style


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def _photo(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """A photograph-like image by the usual model of natural images: a luminance field with a 1/f amplitude
    spectrum (detail down to single pixels), colour in smooth opponent fields (chroma varies slowly in photos),
    and a sky-to-ground gradient; real photos, not the flat colours of synthetic birds, are where JPEG loses."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.maximum(np.hypot(fx, fy), 1.0 / max(width, height))

    def field(amplitude: np.ndarray) -> np.ndarray:
        phase = np.exp(2j * np.pi * rng.random((height, width // 2 + 1)))
        values = np.fft.irfft2(amplitude * phase, s=(height, width))
        return (values - values.mean()) / values.std()

    luminance = field(1.0 / f) * 40 + np.linspace(170, 90, height)[:, None]
    red_green, blue_yellow = (field(np.exp(-((f / 0.02) ** 2)) / f) * 18 for _ in range(2))
    rgb = np.stack([luminance + red_green, luminance - red_green + blue_yellow / 2, luminance - blue_yellow], axis=2)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _bird() -> np.ndarray:
    return render_bird(class_definitions(12, "varied")[1], 224, instance_rng(5, 0), 1.6).image


@pytest.mark.parametrize("picture", [_bird, _photo], ids=["synthetic-bird", "photo"])
def test_jpeg_montage_at_the_default_quality_stays_within_38_db_of_the_png(picture):
    model = mcloss.load_checkpoint(default_checkpoint())
    image = picture()
    exp = mcloss.explain(model, Image.fromarray(image), "pred")
    montage = exp.montage(0, Style(), image=image)
    png = cv2.cvtColor(cv2.imdecode(np.frombuffer(encode_image(montage), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(png, montage)  # the reference is the lossless montage itself
    jpeg = encode_image(montage, "jpg", quality=DEFAULT_QUALITY, full_chroma=True)
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert _psnr(decoded, png) >= 38.0
    assert len(jpeg) < len(encode_image(montage)) / 2
    webp = encode_image(montage, "webp")
    assert Image.open(io.BytesIO(webp)).size == (montage.shape[1], montage.shape[0])


def test_encoder_refuses_unknown_formats_and_qualities():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ParameterError, match="image format must be one of png, jpg, webp"):
        encode_image(img, "gif")
    with pytest.raises(ParameterError, match="quality must be an integer in 1..100"):
        encode_image(img, "jpg", quality=0)
    assert encode_image(img, "jpeg")[:2] == b"\xff\xd8"


def test_export_records_the_format_and_a_rerun_in_another_format_replaces_the_montages(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_bird()).save(src / f"b{i}.jpg")
    out = tmp_path / "out"
    args = ["--input", str(src), "--out", str(out), "--no-progress", "--target", "top2"]
    assert export_main(args) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.rglob("b0*")) == ["b0.jpg.json", "b0.jpg.npz", "b0.jpg.png", "b0.jpg.r2.png"]
    record = json.loads(next(out.rglob("b0.jpg.json")).read_text())
    assert "montage_format" not in record["options"] and record["targets"][1]["png"] == "b0.jpg.r2.png"

    assert export_main([*args, "--montage-format", "jpg", "--quality", "85"]) == 0
    assert "3 re-done: made with other options" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("b0*")) == ["b0.jpg.jpg", "b0.jpg.json", "b0.jpg.npz", "b0.jpg.r2.jpg"]
    record = json.loads(next(out.rglob("b0.jpg.json")).read_text())
    assert record["options"]["montage_format"] == "jpg" and record["options"]["quality"] == 85
    assert record["targets"][0]["montage"] == "b0.jpg.jpg" and record["targets"][0]["png"] is None
    assert record["outputs"][:2] == ["b0.jpg.jpg", "b0.jpg.r2.jpg"]
    assert next(out.rglob("b0.jpg.jpg")).read_bytes()[:2] == b"\xff\xd8"

    assert export_main([*args, "--montage-format", "jpg", "--quality", "85"]) == 0
    assert "0 exported, 3 already done" in capsys.readouterr().err
    assert export_main([*args[:-2], "--montage-format", "webp"]) == 0  # one target now: r2 goes too
    assert sorted(p.name for p in out.rglob("b0*")) == ["b0.jpg.json", "b0.jpg.npz", "b0.jpg.webp"]
    assert export_main([*args, "--quality", "101", "--montage-format", "jpg"]) == 2
    assert "--quality must be an integer in 1..100" in capsys.readouterr().err
