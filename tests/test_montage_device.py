"""Montages composed and encoded on a torch device (issue 27): run here on CPU tensors, the same code a CUDA
model's export runs on the GPU; checked against the CPU renderer's montage."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import mcloss
from mcloss.core.checkpoint import default_checkpoint
from mcloss.core.errors import ParameterError
from mcloss.data.io import DEFAULT_QUALITY, encode_image, encode_jpeg_tensor
from mcloss.data.synth import class_definitions, instance_rng, render_bird
from mcloss.explainability import kinds, outputs
from mcloss.explainability.outputs import OutputOptions, write_explanation
from mcloss.explainability.render import Style, explanation_montage
from mcloss.explainability.render.device import device_montage, device_montage_jpeg, drawn_on_device

SAMPLE = default_checkpoint().parent / "samples" / "images" / "0001_Common_Bird.jpg"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


@pytest.fixture(scope="module")
def model():
    return mcloss.load_checkpoint(default_checkpoint())


def _bird() -> np.ndarray:
    return render_bird(class_definitions(12, "varied")[1], 224, instance_rng(5, 0), 1.6).image


def _sample() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE).convert("RGB"))


@pytest.mark.parametrize("picture", [_bird, _sample], ids=["synthetic-bird", "sample"])
@pytest.mark.parametrize(
    "style",
    [Style(), Style(shared_scale=True, interpolation="nearest"), Style(colormap="jet", alpha=0.7, peaks=False)],
    ids=["default", "shared-nearest", "jet-no-peaks"],
)
def test_device_montage_matches_the_cpu_montage(model, picture, style):
    image = picture()
    exp = mcloss.explain(model, Image.fromarray(image), "top2")
    assert drawn_on_device(exp, 1, style)
    cpu = explanation_montage(image, exp, 1, style, title="m")
    dev = device_montage(image, exp, 1, style, device="cpu", title="m")
    assert dev.dtype == torch.uint8 and dev.device.type == "cpu"
    assert dev.shape == cpu.shape
    assert _psnr(dev.numpy(), cpu) >= 38.0  # measured ≈ 77 dB: rounding, and the peaks' antialiasing
    assert np.mean(dev.numpy() != cpu) < 0.01



@pytest.mark.parametrize("size_wh", [(224, 224), (400, 60), (60, 400)], ids=["square", "wide", "tall"])
def test_device_montage_matches_the_cpu_montage_for_every_kind(model, size_wh):
    """Every map kind (Guided Grad-CAM's signed input-resolution map, the per-channel Grad-CAM, Finer-CAM and the
    group contrast) and extreme aspect ratios, where the warp resamples hardest. Measured: 54-82 dB, the tiles
    within 4 levels; only the part composite flips a few pixels whose strongest channels nearly tie."""
    image = np.asarray(Image.fromarray(_sample()).resize(size_wh))
    exp = mcloss.explain(model, Image.fromarray(image), "top2", maps=kinds.names(), contrast="auto")
    for group in range(2):
        assert set(exp.groups[group].maps) == set(kinds.names()) - {"channels"}
        assert drawn_on_device(exp, group, Style())
        cpu = explanation_montage(image, exp, group, Style())
        dev = device_montage(image, exp, group, Style(), device="cpu").numpy()
        assert dev.shape == cpu.shape
        assert _psnr(dev, cpu) >= 45.0
        assert np.mean(np.abs(dev.astype(int) - cpu).max(axis=2) > 4) < 1e-3

def test_device_jpeg_decodes_within_38_db_of_the_png_montage(model):
    image = _bird()
    exp = mcloss.explain(model, Image.fromarray(image), "pred")
    png = explanation_montage(image, exp, 0, Style())
    data = device_montage_jpeg(image, exp, 0, Style(), device="cpu", quality=DEFAULT_QUALITY)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "JPEG" and decoded.layer[0][1:3] == (1, 1)  # 4:4:4
    assert _psnr(np.asarray(decoded.convert("RGB")), png) >= 38.0


def test_device_montage_falls_back_to_the_cpu_renderer_for_contours(model):
    image = _bird()
    exp = mcloss.explain(model, Image.fromarray(image), "pred")
    style = Style(contour=0.5)
    assert not drawn_on_device(exp, 0, style)
    assert np.array_equal(device_montage(image, exp, 0, style, device="cpu").numpy(), explanation_montage(image, exp, 0, style))


def test_encode_jpeg_tensor_on_the_cpu_is_the_cpu_encoder():
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert encode_jpeg_tensor(torch.from_numpy(img), 85) == encode_image(img, "jpg", quality=85, full_chroma=True)
    with pytest.raises(ParameterError, match="RGB uint8 tensor"):
        encode_jpeg_tensor(torch.zeros(3, 20, 30, dtype=torch.uint8))
    with pytest.raises(ParameterError, match="quality"):
        encode_jpeg_tensor(torch.from_numpy(img), 0)


def test_only_jpeg_montages_of_a_cuda_model_go_to_the_device():
    assert OutputOptions().montage_device is None
    assert OutputOptions(device="cpu", montage_format="jpg").montage_device is None
    assert OutputOptions(device="cuda:0", montage_format="png").montage_device is None
    assert OutputOptions(device="cuda:0", montage_format="webp").montage_device is None
    assert OutputOptions(device="cuda:0", montage_format="jpg").montage_device == "cuda:0"


def test_write_explanation_sends_jpeg_montages_of_a_cuda_model_to_the_device(model, tmp_path, monkeypatch):
    image = _bird()
    exp = mcloss.explain(model, Image.fromarray(image), "pred")
    calls = []

    def on_device(view, explanation, group, style, *, device, quality):
        calls.append((device, quality))
        return device_montage_jpeg(view, explanation, group, style, device="cpu", quality=quality)

    monkeypatch.setattr(outputs, "device_montage_jpeg", on_device)
    cuda = OutputOptions(montage_format="jpg", quality=90, device="cuda:0")
    write_explanation(exp, tmp_path / "a.jpg", view=image, output=cuda)
    assert calls == [("cuda:0", 90)]
    written = np.asarray(Image.open(tmp_path / "a.jpg.jpg").convert("RGB"))
    assert _psnr(written, explanation_montage(image, exp, 0, Style())) >= 38.0

    for output in (OutputOptions(device="cpu"), OutputOptions(device="cuda:0"), replace(cuda, device="cpu")):
        write_explanation(exp, tmp_path / "b.jpg", view=image, output=output)
    assert len(calls) == 1  # PNG on CUDA, and anything on the CPU, stay on the CPU path
    png = explanation_montage(image, exp, 0, Style())
    write_explanation(exp, tmp_path / "c.jpg", view=image, output=OutputOptions(device="cpu"))
    assert (tmp_path / "c.jpg.png").read_bytes() == encode_image(png)  # the CPU export's bytes are unchanged
