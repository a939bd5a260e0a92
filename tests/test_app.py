"""The Streamlit app, driven headlessly by streamlit's AppTest, plus its UI glue (app/view.py).

Uploads are injected the way the file uploader's callback stores them: ``session_state["upload"] =
{"name", "data"}`` with ``session_state["source"] = "Upload"``.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import re
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

import mcloss
from mcloss.core.transforms import Geometry
from mcloss.data.io import ImageLoadError
from mcloss.explainability import kinds, render
from mcloss.explainability.explanation import Explanation, GroupMaps
from mcloss.explainability.geometry import channel_peaks
from mcloss.explainability.outputs import Comparison
from mcloss.metrics import localization as metrics

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "app" / "streamlit_app.py")
sys.path.insert(0, str(REPO / "app"))

import view  # noqa: E402

CLASSES = ["Red_Crown", "Green_Wing", "Blue_Tail", "Plain"]
PARTS = ["crown", "wing", "tail"]


# ------------------------------------------------------------------------------------------ fixtures



def as_shown(markdown: str) -> str:
    """What a Markdown string of the app shows: :func:`view.text`'s escapes undone (backslashes, HTML entities)."""
    return html.unescape(re.sub(r"\\([\\`*_\[\]~$|:.@])", r"\1", markdown.replace("\u2060", "")))

def _picture(seed: int, size: tuple[int, int] = (96, 72)) -> tuple[np.ndarray, list[list[float]]]:
    """An RGB picture with three coloured squares ('parts'); the third keypoint is invisible."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = (200 + rng.integers(0, 40, (h, w, 3))).astype(np.uint8)
    parts = []
    for k, colour in enumerate([(200, 30, 30), (30, 160, 50), (30, 50, 200)]):
        x, y = int(rng.integers(8, w - 8)), int(rng.integers(8, h - 8))
        img[y - 5 : y + 5, x - 5 : x + 5] = colour
        parts.append([x + 0.5, y + 0.5, 0.0 if k == 2 else 1.0])
    return img, parts


def _encode(img: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _tiny_checkpoint(folder: Path, card: dict | None = None) -> Path:
    """A seeded tiny ResNet-18 of CLASSES saved in ``folder``, with ``card`` entries added to its card."""
    torch.manual_seed(0)
    model = mcloss.build_model("resnet18", len(CLASSES), xi=3, img_size=64, class_names=CLASSES)
    model.card.update(card or {})
    path = folder / "tiny.safetensors"
    mcloss.save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory) -> Path:
    return _write_gallery(tmp_path_factory.mktemp("samples"))


def _write_gallery(folder: Path, masks: bool = False) -> Path:
    """Two _picture samples and their index.json in ``folder``; with ``masks``, each with its part mask."""
    samples = []
    for i in range(2):
        img, parts = _picture(i)
        Image.fromarray(img).save(folder / f"bird_{i}.png")
        sample = {"file": f"bird_{i}.png", "label": i, "class_name": CLASSES[i], "parts": parts}
        if masks:
            (folder / "masks").mkdir(exist_ok=True)
            Image.fromarray(_part_mask(parts)).save(folder / "masks" / f"bird_{i}.png")
            sample["mask"] = f"masks/bird_{i}.png"
        samples.append(sample)
    (folder / "index.json").write_text(json.dumps({"part_names": PARTS, "samples": samples}))
    return folder


def _app_env(monkeypatch, checkpoint: Path, gallery: Path) -> Iterator[None]:
    """The app on ``checkpoint`` and ``gallery``, with clean Streamlit caches and torch's threads restored."""
    monkeypatch.setenv("MCLOSS_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("MCLOSS_SAMPLES", str(gallery))
    threads = torch.get_num_threads()  # the app sets its own (MCLOSS_APP_THREADS); restore for other tests
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()
    torch.set_num_threads(threads)


@pytest.fixture
def env(monkeypatch, checkpoint, gallery_dir):
    yield from _app_env(monkeypatch, checkpoint, gallery_dir)


@pytest.fixture
def explain_calls(monkeypatch) -> list:
    """Every call into the model (``mcloss.explain``, as app/view.py calls it), with its targets."""
    calls = []
    real = view.explain

    def counting(model, images, targets="pred", **kw):
        calls.append(targets)
        return real(model, images, targets, **kw)

    monkeypatch.setattr(view, "explain", counting)
    return calls


def run_app(**state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def captions(at: AppTest) -> list[str]:
    """The image captions as shown (Streamlit renders them as Markdown; the app escapes them with view.text)."""
    return [as_shown(c) for c in raw_captions(at)]


def raw_captions(at: AppTest) -> list[str]:
    return [c for img in at.get("image") for c in img.captions]


def image_urls(at: AppTest) -> list[str]:
    return [u for img in at.get("image") for u in img.value]


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def upload(name: str, data: bytes) -> dict:
    return {"source": "Upload", "upload": {"name": name, "data": data}}


# ------------------------------------------------------------------------------------------ app runs


def test_gallery_sample_renders_with_ground_truth(env, checkpoint, gallery_dir):
    at = run_app()
    assert_clean(at)
    assert not at.error
    model = mcloss.load_checkpoint(checkpoint)
    image = mcloss.load_image(gallery_dir / "bird_0.png")
    expl = mcloss.explain(model, image, [["top2"]])
    pred = expl.prediction
    group = expl.groups[0]
    assert group.target == pred

    caps = captions(at)
    # original | 3 channels | CCMP | parts | Grad-CAM
    assert len(caps) == 7, caps
    assert caps[0] == "bird_0.png · 96×72 px"
    assert caps[4].startswith("CCMP")
    assert caps[5].startswith("parts")
    assert caps[6] == f"Grad-CAM (FC head) · p {group.prob:.2f}"
    # per-channel peak values and nearest ground-truth part, as mcloss.metrics.localization defines them
    kps = np.array(json.loads((gallery_dir / "index.json").read_text())["samples"][0]["parts"])
    part, dist = metrics.nearest_keypoints(group.peaks_xy, kps)
    radius = metrics.hit_radius(96, 72, metrics.DEFAULT_HIT_RADIUS)
    for i in range(3):
        assert caps[1 + i].startswith(f"channel {i + 1}/3 · peak {group.peak_values[i]:.3g} · {PARTS[part[i]]} ")
        assert ("hit" if dist[i] <= radius else "miss") in caps[1 + i]
        assert f"({dist[i]:.0f} px)" in caps[1 + i]
    hits = int((dist <= radius).sum())
    assert any(c.value.startswith(f"{hits}/3 channel peaks on a ground-truth part") for c in at.caption)
    # the class selector defaults to the prediction; the agreement of both heads is stated
    target = at.selectbox(key=[s.key for s in at.selectbox if s.key.startswith("target_")][0])
    assert target.value == pred
    agree = expl.prediction == expl.prediction_mc
    box = at.success if agree else at.warning
    assert len(box) == 1 and CLASSES[pred] in box[0].value
    assert any(f"Ground truth: **{CLASSES[0]}**" in as_shown(m.value) for m in at.markdown)


def test_controls_rerender_without_running_the_model(env, explain_calls):
    at = run_app()
    assert_clean(at)
    n = len(explain_calls)
    assert n >= 1 and explain_calls[-1] == [["top2"]]
    urls = image_urls(at)

    at.selectbox(key="colormap").set_value("viridis").run()
    urls_viridis = image_urls(at)
    assert urls_viridis[1:] != urls[1:]  # the overlays were re-rendered...
    assert urls_viridis[0] == urls[0]  # ...the original was not
    at.slider(key="alpha").set_value(0.8).run()
    at.session_state["scale"] = "shared group"
    at.run()
    at.session_state["upsampling"] = "nearest"
    at.run()
    at.toggle(key="peaks").set_value(False).run()
    at.toggle(key="compare").set_value(True).run()  # the top-2 groups are already computed
    assert_clean(at)
    assert not at.error
    assert len(captions(at)) == 1 + 2 * 6
    assert len(explain_calls) == n, explain_calls[n:]
    assert len(set(image_urls(at)[1:]) & set(urls_viridis[1:])) == 0

    # a class outside the top 2 runs the model once for that class; coming back to it is cached
    at.toggle(key="compare").set_value(False).run()
    sel = at.selectbox(key=[s.key for s in at.selectbox if s.key.startswith("target_")][0])
    pred = sel.value
    cls = CLASSES.index(sel.options[-1].split("  ·")[0])  # the least probable class
    sel.set_value(cls).run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]  # its downloads too (they drew from the top-2 explanation)
    assert len(explain_calls) == n + 1 and explain_calls[-1] == [[cls]]
    assert as_shown(at.markdown[-1].value).startswith(f"#### {CLASSES[cls]} ") or any(
        as_shown(m.value).startswith(f"#### {CLASSES[cls]} ") for m in at.markdown
    )
    at.selectbox(key=sel.key).set_value(pred).run()
    at.selectbox(key=sel.key).set_value(cls).run()
    assert_clean(at)
    assert len(explain_calls) == n + 1


def test_extra_maps_per_channel_and_guided_gradcam(env, explain_calls):
    at = run_app()
    n = len(explain_calls)
    at.session_state["map_channel_gradcam"] = True
    at.session_state["map_guided"] = True
    at.run()
    assert_clean(at)
    assert not at.error
    assert len(explain_calls) == n + 1
    caps = captions(at)
    assert caps[7] == "Guided Grad-CAM (signed)"
    assert caps[8:11] == [f"Grad-CAM · channel {i}" for i in (1, 2, 3)]
    at.session_state["method"] = "captum"
    at.run()
    assert_clean(at)
    assert len(explain_calls) == n + 2 and len(captions(at)) == 11


def test_sidebar_colour_scale_follows_the_colormap_scale_and_signed_maps(env):
    at = run_app()
    assert_clean(at)

    def bars() -> list[tuple[list[tuple[int, ...]], str]]:
        """Each colour bar in the sidebar: its gradient's colours and its caption."""
        found = []
        for m in at.sidebar.markdown:
            for css, words in re.findall(r"background:linear-gradient\((.*?)\)'></div><div[^>]*>([^<]*)<", m.value):
                found.append(([tuple(map(int, c)) for c in re.findall(r"rgb\((\d+),(\d+),(\d+)\)", css)], html.unescape(words)))
        return found

    (colours, words), = bars()
    lut = render.colormap_lut("inferno")
    assert colours[0] == tuple(lut[0]) and colours[-1] == tuple(lut[255]) and len(colours) == 17
    assert words == "Colour scale: 0 (left) to each map's own maximum (right)"
    at.selectbox(key="colormap").set_value("viridis").run()
    at.session_state["scale"] = "shared group"
    at.session_state["map_guided"] = True
    at.run()
    assert_clean(at)
    (colours, words), (signed, signed_words) = bars()
    assert colours[-1] == tuple(render.colormap_lut("viridis")[255]) and "the channel group's maximum" in words
    diverging = render.colormap_lut(render.DIVERGING)
    assert signed[0] == tuple(diverging[0]) and signed[8] == tuple(diverging[128]) and signed[-1] == tuple(diverging[255])
    assert signed_words == "Guided Grad-CAM: \u2212s through 0 to +s, s the 99.5th percentile of |map|"


BROKEN = {
    "empty.png": (b"", "empty file"),
    "notes.png": (b"this is a text file, not a picture\n", "not a recognized image format"),
    "truncated.png": (None, "corrupt or truncated"),
    "garbled.jpg": (None, "corrupt or truncated"),
    "bomb.png": (None, "image too large"),
}


def _broken_bytes(name: str) -> bytes:
    data, _ = BROKEN[name]
    if data is not None:
        return data
    img, _ = _picture(3)
    if name == "truncated.png":
        return _encode(img, "PNG")[:150]
    if name == "garbled.jpg":
        raw = bytearray(_encode(img, "JPEG"))
        raw[200:] = bytes(len(raw) - 200)  # header intact, scan data destroyed
        return bytes(raw[: len(raw) // 2])
    # 9000×9000 (81 MP) declared, a few kB on disk: refused before decoding
    return _encode(Image.new("1", (9000, 9000)), "PNG")


def test_oversized_image_upload_is_refused_on_the_server(env):
    size = view.MAX_UPLOAD_MB * 2**20 + 1

    def read() -> bytes:
        raise AssertionError("the bytes of a refused upload must not be kept")

    record = view.upload_record("huge.png", size, read)
    assert record["data"] == b"" and f"limit {view.MAX_UPLOAD_MB} MB" in record["error"]
    assert view.upload_record("ok.png", 3, lambda: b"abc") == {"name": "ok.png", "data": b"abc", "error": None}
    at = run_app(source="Upload", upload=record)
    assert_clean(at)
    assert [as_shown(e.value) for e in at.error] == [f"Cannot read the image: huge.png: upload too large (50.0 MB, limit {view.MAX_UPLOAD_MB} MB)"]
    assert not at.get("image")


def test_server_upload_limit_is_the_page_limit_for_checkpoints():
    import tomllib

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == view.MAX_CHECKPOINT_MB >= view.MAX_UPLOAD_MB


def test_uploaded_checkpoint_leaves_no_file_behind(checkpoint, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    loaded = view.load_uploaded(checkpoint.read_bytes(), "mine.safetensors", "sha256:x", torch.device("cpu"))
    assert loaded.model.class_names == CLASSES and loaded.label == "mine.safetensors"
    with pytest.raises(mcloss.CheckpointError, match=r"^mine\.safetensors: "):
        view.load_uploaded(b"garbage!" * 8, "mine.safetensors", "sha256:y", torch.device("cpu"))
    assert not list(tmp_path.iterdir())


def test_an_uploaded_lightning_ckpt_is_imported_with_its_name(tmp_path):
    """A PyTorch Lightning ``.ckpt`` (a torchvision ResNet-18 under ``model.`` in its ``state_dict``) is imported
    on the fly; the card names the uploaded file and the prefix taken off."""
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    buffer = io.BytesIO()
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}, "epoch": 4}, buffer)
    loaded = view.load_uploaded(buffer.getvalue(), "run.ckpt", "sha256:z", torch.device("cpu"), ["a", "b", "c"])
    source = loaded.model.card["source"]
    assert (source["file"], source["key_prefix"], source["layout"]) == ("run.ckpt", "model.", "torchvision")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net(x), rtol=1e-5, atol=1e-4)
    # with an EMA copy beside the model: refused, naming both prefixes and the upload, until a prefix is given
    ema = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    state = {f"model.{k}": v for k, v in net.state_dict().items()} | {f"ema.{k}": v for k, v in ema.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"state_dict": state}, buffer)
    with pytest.raises(mcloss.CheckpointError, match=r"^run\.ckpt: .* under 'model\.' and 'ema\.' each fit one; choose the model's keys with the Key prefix field$"):
        view.load_uploaded(buffer.getvalue(), "run.ckpt", "sha256:e", torch.device("cpu"), ["a", "b", "c"])
    loaded = view.load_uploaded(buffer.getvalue(), "run.ckpt", "sha256:f", torch.device("cpu"), None, "ema.")
    assert loaded.model.card["source"]["left_out"] == ["model."]
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), ema(x), rtol=1e-5, atol=1e-4)


def test_app_bomb_message_cites_the_app_limit(tmp_path):
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # 200 MP, past Pillow's own guard
    with pytest.raises(ImageLoadError) as info:
        view.decode_image((tmp_path / "bomb.png").read_bytes(), "bomb.png")
    assert f"limit {view.MAX_PIXELS // 1_000_000} MP" in str(info.value)


def test_text_keeps_urls_from_linking_and_messages_as_they_read():
    message = "corrupt.jpg: corrupt or truncated image"
    assert "\u2060" not in view.text(message) and as_shown(view.text(message)) == message  # copied as it reads
    for url in ("http://127.0.0.1:9/x", "mailto:a", "a@b.com", "www.x.com"):  # a word joiner breaks each autolink
        assert "\u2060" in view.text(url) and as_shown(view.text(url)) == url


def test_file_and_class_names_in_image_captions_stay_text(env):
    """Streamlit renders image captions as Markdown: an upload's name (data from the user's disk) must not become
    a link, LaTeX or colour there, as it does not in headings."""
    img, _ = _picture(7)
    name = "[click me](https:example.com) $x^2$ :red[on].png"
    at = run_app(**upload(name, _encode(img, "PNG")))
    assert_clean(at)
    shown = raw_captions(at)[0]
    assert "[click me](" not in shown and "$x^2$" not in shown and ":red[" not in shown, shown
    assert captions(at)[0] == f"{name} · 96×72 px"


def test_an_upload_left_for_the_gallery_is_not_explained_on_return(env, gallery_dir):
    img, _ = _picture(7)
    at = run_app(**upload("kept.png", _encode(img, "PNG")))
    assert_clean(at)
    assert captions(at)[0] == "kept.png · 96×72 px"
    at.session_state["source"] = "Gallery"
    at.run()
    assert_clean(at)
    assert not captions(at)[0].startswith("kept.png")
    at.session_state["source"] = "Upload"  # the uploader comes back empty: so does the page
    at.run()
    assert_clean(at)
    assert not at.get("image") and any("Upload an image" in i.value for i in at.info)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_upload_shows_one_error_and_the_app_recovers(env, name):
    at = run_app(**upload(name, _broken_bytes(name)))
    assert_clean(at)
    assert len(at.error) == 1
    message = as_shown(at.error[0].value)
    assert message.startswith(f"Cannot read the image: {name}: ")
    assert BROKEN[name][1] in message
    assert "\n" not in message and "Traceback" not in message
    assert not at.get("image")

    img, _ = _picture(5)
    at.session_state["upload"] = {"name": "good.png", "data": _encode(img, "PNG")}
    at.run()
    assert_clean(at)
    assert not at.error
    assert captions(at)[0] == "good.png · 96×72 px"
    assert len(captions(at)) == 7


def test_unexpected_failure_is_one_sentence_and_next_input_works(env, monkeypatch):
    real = render.group_tiles

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nmore detail that must not show")

    monkeypatch.setattr(render, "group_tiles", broken)
    at = run_app()
    assert_clean(at)
    assert [as_shown(e.value) for e in at.error] == ["Could not explain bird_0.png: RuntimeError: boom"]
    monkeypatch.setattr(render, "group_tiles", real)
    at.run()
    assert not at.error and len(captions(at)) == 7


def test_exif_rotated_photo_is_shown_upright(env):
    img = np.zeros((40, 80, 3), np.uint8)
    img[:10, :10] = (255, 0, 0)  # red at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    at = run_app(**upload("phone.jpg", _encode(img, "JPEG", exif=exif, quality=95)))
    assert_clean(at)
    assert not at.error
    assert captions(at)[0] == "phone.jpg · 40×80 px"


def test_inference_threads_follow_the_environment(env, monkeypatch):
    # torch's thread count is per OS thread here: read it where the script runs, in the device caption
    monkeypatch.setenv("MCLOSS_APP_THREADS", "1")
    at = run_app()
    assert "Device: CPU · 1 thread" in [c.value for c in at.sidebar.caption]
    monkeypatch.setenv("MCLOSS_APP_THREADS", "2")
    at.run()
    assert "Device: CPU · 2 threads" in [c.value for c in at.sidebar.caption]


def test_bad_checkpoint_shows_error(env, monkeypatch, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    monkeypatch.setenv("MCLOSS_CHECKPOINT", str(bad))
    at = run_app()
    assert_clean(at)
    errors = [as_shown(e.value) for e in at.sidebar.error]
    assert len(errors) == 1
    assert errors[0].startswith("Checkpoint not usable: ") and "broken.safetensors" in errors[0]
    assert "safetensors" in errors[0].split("broken.safetensors", 1)[1]
    assert any("Choose a usable checkpoint" in i.value for i in at.info)
    assert not at.get("image")


def test_what_an_imported_checkpoint_assumed_is_a_sidebar_warning(env, monkeypatch, tmp_path):
    """A Kurumi233 ResNet imported without its setting.txt is read at 448 px on trust: the sidebar says so beside
    the import's caption, as ``mcloss import`` does."""
    import transcribed as T

    from mcloss.interop.sources import import_checkpoint

    T.randomize(T.Kurumi(4, pretrained="resnet18"), seed=3).save(tmp_path / "ckpt.pth")
    import_checkpoint(tmp_path / "ckpt.pth", tmp_path / "kurumi.safetensors")
    monkeypatch.setenv("MCLOSS_CHECKPOINT", str(tmp_path / "kurumi.safetensors"))
    at = run_app()
    assert_clean(at)
    warned = [as_shown(w.value) for w in at.sidebar.warning]
    assert [w for w in warned if w.startswith("Assumed: input 448 px: no setting.txt says inp_size")], warned
    assert any("imported from kurumi (ckpt.pth)" in as_shown(c.value) for c in at.sidebar.caption)
    # uploaded, the file has no setting.txt beside it: the way out is the command line
    loaded = view.load_uploaded((tmp_path / "ckpt.pth").read_bytes(), "ckpt.pth", "sha256:k", torch.device("cpu"))
    (said,) = loaded.model.card["source"]["assumed"]
    assert said.endswith("import it with mcloss import --img-size (or --setting) and upload the .safetensors if yours differs")


def test_missing_checkpoint_names_the_path(env, monkeypatch, tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    monkeypatch.setenv("MCLOSS_CHECKPOINT", str(missing))
    at = run_app()
    assert_clean(at)
    errors = [as_shown(e.value) for e in at.sidebar.error]
    assert len(errors) == 1 and str(missing) in errors[0] and "no such checkpoint" in errors[0]


# ------------------------------------------------------------------------------------------ decoding


def _cmyk() -> bytes:
    return _encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG", quality=95)


def _rgba() -> bytes:
    a = np.zeros((20, 30, 4), np.uint8)
    a[..., 0] = 255
    a[:, 15:, 3] = 255  # left half fully transparent
    return _encode(Image.fromarray(a, "RGBA"), "PNG")


def _gray16() -> bytes:
    a = np.zeros((20, 30), np.uint16)
    a[:, 15:] = 65535
    return _encode(Image.fromarray(a), "PNG")


def _palette() -> bytes:
    p = Image.new("P", (30, 20), 0)
    p.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    return _encode(p, "PNG")


def _gif() -> bytes:
    frames = [Image.new("RGB", (30, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _lossless(fmt: str, **kw) -> bytes:
    return _encode(Image.new("RGB", (30, 20), (10, 200, 30)), fmt, **kw)


GOOD = {
    "cmyk.jpg": (_cmyk, lambda a: np.abs(a.astype(int) - (255, 0, 0)).max() <= 3),
    "rgba.png": (_rgba, lambda a: (a[:, :15] == 255).all() and (a[:, 15:] == (255, 0, 0)).all()),
    "gray16.png": (_gray16, lambda a: (a[:, :15] == 0).all() and (a[:, 15:] == 255).all()),
    "palette.png": (_palette, lambda a: (a == (0, 0, 255)).all()),
    "anim.gif": (_gif, lambda a: (a == (255, 0, 0)).all()),
    "pic.tiff": (lambda: _lossless("TIFF"), lambda a: (a == (10, 200, 30)).all()),
    "pic.webp": (lambda: _lossless("WEBP", lossless=True), lambda a: (a == (10, 200, 30)).all()),
    "pic.bmp": (lambda: _lossless("BMP"), lambda a: (a == (10, 200, 30)).all()),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_decode_modes_and_formats_to_rgb(name):
    make, check = GOOD[name]
    img = view.decode_image(make(), name)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert check(np.asarray(img))


def test_decode_exif_rotation():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:10, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = np.asarray(view.decode_image(_encode(img, "JPEG", exif=exif, quality=95), "phone.jpg"))
    assert out.shape == (80, 40, 3)
    # 90° clockwise: the stored top-left corner is now the top-right one
    assert out[:8, -8:, 0].mean() > 200 and out[:8, :8, 0].mean() < 50


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_decode_broken_raises_one_line(name):
    with pytest.raises(ImageLoadError) as info:
        view.decode_image(_broken_bytes(name), name)
    text = str(info.value)
    assert text.startswith(f"{name}: ") and BROKEN[name][1] in text and "\n" not in text


def test_small_images_are_drawn_on_the_page_on_whole_pixel_blocks():
    """A tiny upload's maps and rings need room on the page: the page copy repeats each pixel n × n; a large
    enough image is drawn as it is."""
    one = np.array([[[10, 200, 30]]], dtype=np.uint8)
    page = view.page_image(one)
    assert page.shape == (view.PAGE_MIN_SIDE, view.PAGE_MIN_SIDE, 3) and (page == one).all()
    small = np.random.default_rng(0).integers(0, 256, (48, 60, 3), dtype=np.uint8)
    page = view.page_image(small)
    assert page.shape == (192, 240, 3)
    np.testing.assert_array_equal(page[::4, ::4], small)
    strip = np.zeros((10, 400, 3), dtype=np.uint8)  # the long side stays within the display's
    assert view.page_image(strip).shape == (20, 800, 3)
    big = np.zeros((200, 300, 3), dtype=np.uint8)
    assert view.page_image(big) is big


def test_display_image_downscales_huge_inputs():
    big = Image.new("RGB", (3000, 1000), (1, 2, 3))
    arr = view.display_image(big)
    assert arr.shape == (341, 1024, 3) and (arr == (1, 2, 3)).all()
    small = Image.new("RGB", (300, 100))
    assert view.display_image(small).shape == (100, 300, 3)


# ------------------------------------------------------------------------------------------ view glue


def _explanation(geo: Geometry, channels: np.ndarray) -> Explanation:
    peaks, values = channel_peaks(channels)
    fh, fw = channels.shape[1:]
    gm = GroupMaps(
        target=0, name="a", channels=channels, ccmp=channels.max(0), peaks_feature=peaks,
        peaks_xy=geo.feature_to_original(peaks, (fh, fw)), peak_values=values,
    )
    return Explanation(geo.original, geo, (fh, fw), np.array([1.0]), np.array([1.0]), [gm])


def test_channel_parts_follow_metrics():
    geo = Geometry(original=(100, 100), resized=(100, 100), crop=(0, 0, 100, 100))
    ch = np.zeros((3, 10, 10), np.float32)
    ch[0, 1, 1] = 1  # peak cell centre (15, 15)
    ch[1, 8, 8] = 1  # (85, 85)
    ch[2, 1, 8] = 1  # (85, 15)
    group = _explanation(geo, ch).groups[0]
    kps = np.array([[20.0, 15.0, 1], [85.0, 60.0, 1], [85.0, 15.0, 0]])
    rows, radius_px = view.channel_parts(group, kps, ["head", "tail", "wing"], (100, 100), radius=0.12)
    assert radius_px == pytest.approx(12.0)
    assert [(r.part, r.hit) for r in rows] == [("head", True), ("tail", False), ("tail", False)]
    assert [r.distance for r in rows] == pytest.approx([5.0, 25.0, 45.0])


def _expl_with_probs(fc, mc) -> Explanation:
    geo = Geometry(original=(8, 8), resized=(8, 8), crop=(0, 0, 8, 8))
    e = _explanation(geo, np.ones((3, 2, 2), np.float32))
    e.probs_fc, e.probs_mc = np.array(fc), np.array(mc)
    return e


def test_topk_rows_and_agreement():
    names = ["a", "b", "c", "d"]
    e = _expl_with_probs([0.1, 0.6, 0.25, 0.05], [0.5, 0.3, 0.1, 0.1])
    rows = view.topk_rows(e, names, k=2)
    assert [(r["class"], r["head"]) for r in rows] == [
        ("b", "FC head"), ("b", "MC head"), ("c", "FC head"), ("c", "MC head"), ("a", "FC head"), ("a", "MC head"),
    ]
    assert rows[1]["probability"] == pytest.approx(0.3)
    agree, text = view.agreement(e, names)
    assert not agree and "FC → **b** (0.60)" in text and "MC → **a** (0.50)" in text
    agree, text = view.agreement(_expl_with_probs([0.1, 0.9], [0.2, 0.8]), ["x", "y"])
    assert agree and "**y**" in text


def test_gallery_index_errors(tmp_path):
    with pytest.raises(view.GalleryError, match="no gallery index"):
        view.load_gallery(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(view.GalleryError, match="malformed gallery index"):
        view.load_gallery(tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    entry = {"file": "a.png", "label": 0, "class_name": "x", "parts": [[1, 1, 1]]}
    (tmp_path / "index.json").write_text(json.dumps({"part_names": ["p", "q"], "samples": [entry]}))
    with pytest.raises(view.GalleryError, match="1 keypoints for 2 part names"):
        view.load_gallery(tmp_path)
    entry = {"file": "gone.png", "label": 0, "class_name": "x", "parts": [[1, 1, 1]]}
    (tmp_path / "index.json").write_text(json.dumps({"part_names": ["p"], "samples": [entry]}))
    with pytest.raises(view.GalleryError, match="'gone.png' is missing"):
        view.load_gallery(tmp_path)


def test_export_zip_holds_overlays_and_export_outputs(checkpoint):
    model = mcloss.load_checkpoint(checkpoint)
    img, _ = _picture(1)
    image = Image.fromarray(img)
    expl = mcloss.explain(model, image, [["top2"]])
    groups = expl.groups[1:2]  # the runner-up, as when the user picked it
    style = view.style_for("viridis", 0.5, False, True, False)
    tiles = {groups[0].name: render.group_tiles(img, expl, groups[0], style)}
    data = view.export_zip("x.png", img, expl, groups, style, tiles, label=2)
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = set(zf.namelist())
    assert {"export/x.png.png", "export/x.png.npz", "export/x.png.json"} <= names
    slug = groups[0].name
    assert {f"overlays/{slug}_ch{i}.png" for i in (1, 2, 3)} | {f"overlays/{slug}_gradcam.png"} <= names
    record = json.loads(zf.read("export/x.png.json"))
    assert record["file"] == "x.png" and record["target"]["index"] == groups[0].target
    montage = np.asarray(Image.open(io.BytesIO(zf.read("export/x.png.png"))))
    np.testing.assert_array_equal(montage, expl.with_groups(groups, label=2).montage(0, style, image=img))
    assert record["label"] == {"index": 2, "name": CLASSES[2]}
    arrays = np.load(io.BytesIO(zf.read("export/x.png.npz")))
    np.testing.assert_array_equal(arrays["channels"], groups[0].channels)
    np.testing.assert_array_equal(arrays["gradcam"], groups[0].gradcam)
    overlay = np.asarray(Image.open(io.BytesIO(zf.read(f"overlays/{slug}_ch1.png"))))
    np.testing.assert_array_equal(overlay, tiles[slug][0].image)
    assert "options" not in record and "compare" not in record
    # with the app's record of what made it and a second model: as mcloss export --compare writes them
    torch.manual_seed(5)
    twin = mcloss.build_model("resnet18", len(CLASSES), xi=3, img_size=64, class_names=CLASSES).eval()
    other = mcloss.explain(twin, image, groups[0].target)
    compare = Comparison(other, ("tiny.safetensors", "twin.safetensors"), "ab" * 32)
    loaded = view.LoadedModel(model, threading.Lock(), torch.device("cpu"), "k", "tiny.safetensors", 0.0, "cd" * 32)
    options = view.download_record(loaded, style, maps=("channels", "gradcam"), method="fused", topk=5, compare=compare)
    made_from = {"name": "x.png", "size": 123, "sha256": "ef" * 32}
    data = view.export_zip("x.png", img, expl, groups, style, tiles, label=2, options=options, input=made_from, compare=compare)
    zf = zipfile.ZipFile(io.BytesIO(data))
    record = json.loads(zf.read("export/x.png.json"))
    assert record["options"]["checkpoint_sha256"] == "cd" * 32 and record["options"]["compare_sha256"] == "ab" * 32
    assert record["options"]["made_by"] == "mcloss app" and record["options"]["colormap"] == "viridis"
    assert record["input"] == made_from and record["compare"]["checkpoint"] == "twin.safetensors"
    montage = np.asarray(Image.open(io.BytesIO(zf.read("export/x.png.png"))))
    shown = expl.with_groups(groups, label=2, source="x.png")
    np.testing.assert_array_equal(montage, render.compare_montage(img, shown, other, 0, style, compare.titles))
    # the Montage button's picture is the ZIP's, header and label included
    np.testing.assert_array_equal(montage, view.download_montage("x.png", img, expl, groups, style, label=2, compare=compare))
    alone = np.asarray(Image.open(io.BytesIO(zipfile.ZipFile(io.BytesIO(
        view.export_zip("x.png", img, expl, groups, style, tiles, label=2))).read("export/x.png.png"))))
    np.testing.assert_array_equal(alone, view.download_montage("x.png", img, expl, groups, style, label=2))


def test_why_downloads_draw_b_without_contrasts_the_page_never_names(checkpoint):
    """Explained with ``contrast=B``, B's own Finer-CAM and group contrast are against other classes (A and the
    nearest): the why view's downloads draw B's row without them, and leave the explanation as it was."""
    model = mcloss.load_checkpoint(checkpoint)
    img, _ = _picture(2)
    ex = mcloss.explain(model, Image.fromarray(img), [0, 1], maps=view.WHY_MAPS, contrast=1)
    ga, gb = ex.groups
    assert gb.finer is not None and gb.versus is not None
    plain = view.without_contrast(gb)
    assert plain.finer is None and plain.contrast is None and plain.versus is None and "finer" not in plain.map_peaks
    assert plain.gradcam is not None and np.array_equal(plain.channels, gb.channels)
    assert gb.finer is not None and ga.finer is not None  # nothing shared was changed
    style = view.style_for("viridis", 0.5, False, True, False)
    with_all, without = (ex.with_groups([g]).montage(0, style, image=img) for g in (gb, plain))
    assert without.shape[1] < with_all.shape[1]  # two tiles fewer


def test_concurrent_explanations_are_serialized(checkpoint):
    """Without the lock, interleaved calls leave parameters frozen (or fail in BatchNorm): checked here."""
    model = mcloss.load_checkpoint(checkpoint)
    loaded = view.LoadedModel(model, threading.Lock(), torch.device("cpu"), "k", "tiny", 0.0)
    images = [Image.fromarray(_picture(i)[0]) for i in range(4)]
    expected = [view.explain_locked(loaded, im, ["top2"])[0] for im in images]
    results: list = [None] * len(images)

    def work(i: int) -> None:
        for _ in range(2):
            results[i] = view.explain_locked(loaded, images[i], ["top2"])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got.probs_fc, want.probs_fc, rtol=1e-5, atol=1e-7)
        for g, w in zip(got.groups, want.groups, strict=True):
            assert g.target == w.target
            np.testing.assert_allclose(g.gradcam, w.gradcam, rtol=1e-4, atol=1e-7)
    # the shared model is left as loaded: eval mode, parameters still trainable
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())


def test_checkpoint_choices_list_default_first(tmp_path):
    for name in ("b.safetensors", "a.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    default = tmp_path / "default.safetensors"  # missing: still offered, so the UI can say so
    assert view.list_checkpoints(default, tmp_path) == [default, tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    assert view.list_checkpoints(tmp_path / "b.safetensors", tmp_path) == [
        tmp_path / "b.safetensors", tmp_path / "a.safetensors",
    ]


def test_keypoint_dots_sit_on_the_pixel_containing_the_point():
    img = np.zeros((10, 12, 3), np.uint8)
    for factor, min_side in ((1, 10), (4, 40)):
        # the dot's dark core (radius r, colour (20, 20, 20)) is centred on pixel floor(x·factor)
        out = render.draw_keypoints(img, np.array([[3.2, 5.9]]), np.array([True]), [""], min_side=min_side)
        assert out.shape == (10 * factor, 12 * factor, 3)
        ys, xs = np.nonzero((out == 20).all(-1))
        assert (round(xs.mean()), round(ys.mean())) == (int(3.2 * factor), int(5.9 * factor))


def test_keypoint_names_stay_whole_inside_the_image():
    """A name beside a dot at the image's edge moves to the dot's other side instead of being cut."""
    img = np.full((200, 200, 3), 235, np.uint8)

    def ink(x: float, y: float) -> int:
        """Dark pixels of the name beside a dot at (x, y): everything dark outside the dot."""
        out = render.draw_keypoints(img, np.array([[x, y]]), np.array([True]), ["legs"], min_side=200)
        dark = (out < 128).all(-1)
        yy, xx = np.mgrid[:200, :200]
        return int((dark & (np.hypot(xx - int(x), yy - int(y)) > 7)).sum())  # the dot: radius 4, ring 2

    whole = ink(60.5, 100.5)
    assert whole > 50
    for x, y in ((196.5, 100.5), (100.5, 2.5), (195.5, 197.5)):  # right edge, top edge, bottom-right corner
        assert ink(x, y) == whole, (x, y)


@pytest.fixture
def shown(monkeypatch) -> list[np.ndarray]:
    """Every image the app passes to ``st.image``, as an array, in order."""
    images: list[np.ndarray] = []
    real_image = st.delta_generator.DeltaGenerator.image

    def spy(self, image, *args, **kwargs):
        images.append(np.asarray(image))
        return real_image(self, image, *args, **kwargs)

    monkeypatch.setattr(st.delta_generator.DeltaGenerator, "image", spy)
    return images


def test_thin_upload_is_letterboxed_and_its_montage_bounded(env, checkpoint, shown):
    thin = np.random.default_rng(0).integers(0, 256, (8, 3000, 3), dtype=np.uint8)
    at = run_app(**upload("thin.png", _encode(thin, "PNG")))
    assert_clean(at)
    assert not at.error and len(shown) >= 6
    for img in shown:  # the original and every tile: at most 4:1, as in the montage
        h, w = img.shape[:2]
        assert w <= render.MAX_TILE_ASPECT * h + 1 and h <= render.MAX_TILE_ASPECT * w + 1, img.shape
    image = view.decode_image(_encode(thin, "PNG"), "thin.png")
    expl = mcloss.explain(mcloss.load_checkpoint(checkpoint), image, "top2")
    style = view.style_for("inferno", 0.5, False, True, True)
    picture = expl.montage(0, style, image=view.display_image(image))  # what "Montage (PNG)" encodes
    assert picture.shape[0] * picture.shape[1] <= render.MONTAGE_MAX_PIXELS
    assert picture.shape[0] >= view.TILE_HEIGHT  # tiles are letterboxed to the tile height, not 1 px strips


def test_group_heading_states_the_knockout_of_the_shown_class(env, checkpoint, gallery_dir):
    at = run_app()
    assert_clean(at)
    model = mcloss.load_checkpoint(checkpoint)
    image = mcloss.load_image(gallery_dir / "bird_0.png")
    expl = mcloss.explain(model, image, "top2")
    from mcloss.evaluation.sanity import group_knockout
    from mcloss.explainability.explanation import prepare

    x = prepare(model, image, view=None).x[None]
    drops = group_knockout(model, x, [expl.prediction], draws=view.KNOCKOUT_DRAWS, generator=torch.Generator().manual_seed(0))
    want = view.knockout_note({k: float(v[0]) for k, v in drops.items()}, 3)
    assert want.startswith("knockout: zeroing these 3 channels drops the FC logit by ")
    assert any(want in m.value for m in at.markdown), [m.value for m in at.markdown][:6]


@pytest.fixture
def twin_env(monkeypatch, tmp_path, gallery_dir):
    """The app on a tiny default with a CE-twin-named second checkpoint (same classes) beside it."""
    first = _tiny_checkpoint(tmp_path)
    torch.manual_seed(5)
    twin = mcloss.build_model("resnet18", len(CLASSES), xi=3, img_size=64, class_names=CLASSES)
    mcloss.save_checkpoint(twin, tmp_path / view.COMPARE_DEFAULT)
    yield from _app_env(monkeypatch, first, gallery_dir)


def test_compare_view_draws_the_second_model_on_one_scale(twin_env, tmp_path, gallery_dir, shown):
    at = run_app(compare_model_on=True, scale="shared group")
    assert_clean(at)
    assert not at.error
    assert at.selectbox(key="compare_checkpoint").value == str(tmp_path / view.COMPARE_DEFAULT)
    first, twin = mcloss.load_checkpoint(tmp_path / "tiny.safetensors"), mcloss.load_checkpoint(tmp_path / view.COMPARE_DEFAULT)
    image = mcloss.load_image(gallery_dir / "bird_0.png")
    ea = mcloss.explain(first, image, "top2")
    eb = mcloss.explain(twin, image, ea.prediction)
    base = view.page_image(view.display_image(image))
    style = render.common_style(view.style_for("inferno", 0.5, True, True, False), ea.groups[0], eb.groups[0])
    assert style.group_max == max(float(ea.groups[0].channels.max()), float(eb.groups[0].channels.max()))
    want = [t.image for t in render.group_tiles(base, ea, ea.groups[0], style)]
    want += [t.image for t in render.group_tiles(base, eb, eb.groups[0], style)]
    got = shown[1 : 1 + len(want)]  # after the prediction panel's original
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):  # float sums of another batch may move a pixel by one level
        assert g.shape == w.shape and np.abs(g.astype(int) - w).max() <= 1
    heading = view.compare_heading(view.COMPARE_DEFAULT, eb, eb.groups[0])
    assert any(heading in m.value for m in at.markdown) and "its top-3: " in heading


def test_atlas_toggle_shows_the_class_channels_across_the_gallery(env, checkpoint, gallery_dir):
    at = run_app()
    assert_clean(at)
    toggle = next(t for t in at.toggle if t.key.startswith("atlas_"))
    assert not toggle.value and not any(c.startswith("Across the") for c in captions(at))  # off: nothing computed
    at.toggle(key=toggle.key).set_value(True).run()
    assert_clean(at)
    assert not at.error
    model = mcloss.load_checkpoint(checkpoint)
    loaded = view.LoadedModel(model, threading.Lock(), torch.device("cpu"), "k", "tiny", 0.0)
    target = int(toggle.key.rsplit("_", 1)[1])
    sheet, line = view.gallery_atlas(loaded, view.load_gallery(gallery_dir), target)
    assert line.startswith("Across the 2 gallery images: ch 1: ") and sheet.ndim == 3
    assert line in captions(at)


def test_an_uploaded_model_can_be_compared_with_every_project_checkpoint():
    choices = view.compare_choices(None)  # an upload is no file: nothing is excluded
    names = [p.name for p in choices]
    assert "default.safetensors" in names and names[0] == view.COMPARE_DEFAULT


def test_app_shows_exactly_the_tiles_render_draws(env, checkpoint, gallery_dir, shown):
    """The app draws nothing of its own: its tiles are render.group_tiles' for the sidebar's Style."""
    at = run_app(colormap="viridis", alpha=0.3, scale="shared group", upsampling="nearest")
    assert_clean(at)
    assert not at.error
    model = mcloss.load_checkpoint(checkpoint)
    image = mcloss.load_image(gallery_dir / "bird_0.png")
    expl = mcloss.explain(model, image, [["top2"]])
    style = view.style_for("viridis", 0.3, True, True, True)
    want = render.group_tiles(view.page_image(view.display_image(image)), expl, expl.groups[0], style)
    got = shown[-len(want):]  # after the prediction panel's original
    assert len(shown) == len(want) + 1
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w.image)
    # and the montage is built from the same tiles: at tile height, each tile sits in it unchanged
    thumb, _ = render.thumbnail(view.display_image(image), style.tile_height)
    tiles = render.montage_tiles(thumb, expl, 0, style)
    np.testing.assert_array_equal(tiles[1].image, render.group_tiles(thumb, expl, expl.groups[0], style)[0].image)
    picture = expl.montage(0, style, image=thumb)
    top = (22 + 6) + 22  # the header strip, then each tile's title strip
    x = 4
    for tile in tiles:
        h, w = tile.image.shape[:2]
        np.testing.assert_array_equal(picture[top : top + h, x : x + w], tile.image)
        x += w + 4


# ------------------------------------------------------------------------------------------ defining parts

DEFINING = {"Red_Crown": ["crown"], "Green_Wing": ["wing"], "Blue_Tail": ["tail"], "Plain": []}
FRESH = {name: {"mass_ratio_ccmp": 1.25 + i, "mass_ratio_channels": 1.1 + i} for i, name in enumerate(CLASSES[:3])}


def _part_mask(parts: list[list[float]], size: tuple[int, int] = (96, 72)) -> np.ndarray:
    """The label map of a _picture: each visible part's 10×10 square (1-based), 0 elsewhere."""
    labels = np.zeros((size[1], size[0]), np.uint8)
    for k, (x, y, vis) in enumerate(parts):
        if vis:
            labels[int(y) - 5 : int(y) + 5, int(x) - 5 : int(x) + 5] = k + 1
    return labels


@pytest.fixture(scope="module")
def defining_checkpoint(tmp_path_factory) -> Path:
    card = {"defining_parts": DEFINING, "parts": {"defining": {"per_class": FRESH}}}
    return _tiny_checkpoint(tmp_path_factory.mktemp("ckpt-defining"), card)


@pytest.fixture(scope="module")
def masked_gallery(tmp_path_factory) -> Path:
    return _write_gallery(tmp_path_factory.mktemp("samples-masks"), masks=True)


@pytest.fixture
def defining_env(monkeypatch, defining_checkpoint, masked_gallery):
    yield from _app_env(monkeypatch, defining_checkpoint, masked_gallery)


def test_gallery_sample_marks_the_defining_parts_and_states_the_ratio(defining_env, defining_checkpoint, masked_gallery):
    from mcloss.data.annotations import PartAnnotations
    from mcloss.explainability.defining import defining_summary

    at = run_app(compare=True)  # the top-2 groups: at least one is not the base bird
    assert_clean(at)
    assert not at.error
    model = mcloss.load_checkpoint(defining_checkpoint)
    image = mcloss.load_image(masked_gallery / "bird_0.png")
    expl = mcloss.explain(model, image, [["top2"]])
    _, parts = _picture(0)
    annotations = PartAnnotations(tuple(PARTS), np.array(parts), _part_mask(parts))
    notes = [as_shown(m.value) for m in at.markdown]
    caps = captions(at)
    shown = 0
    for g in expl.groups:
        summary = defining_summary(model.card, g, expl.geometry, annotations, radius=metrics.DEFAULT_HIT_RADIUS)
        if g.name == "Plain":
            assert summary is None and not any(f"**{g.name}**:" in n for n in notes)
            continue
        shown += 1
        assert as_shown(view.defining_note(summary)) in notes
        assert summary.sentence in as_shown(view.defining_note(summary))
        assert f"defining parts of {g.name}: {DEFINING[g.name][0]} · regions from the part masks" in caps
        if summary.source == "image":
            assert summary.sentence.startswith(f"On this image, the CCMP map of {g.name} puts ")
        assert "as on the other parts (1× = no preference)" in summary.sentence
    assert shown >= 1


def test_upload_names_the_defining_parts_and_shows_the_fresh_set_figure(defining_env, defining_checkpoint):
    img, _ = _picture(4)
    at = run_app(compare=True, **upload("photo.png", _encode(img, "PNG")))
    assert_clean(at)
    assert not at.error
    model = mcloss.load_checkpoint(defining_checkpoint)
    expl = mcloss.explain(model, Image.fromarray(img), [["top2"]])
    notes = [as_shown(m.value) for m in at.markdown]
    names = [g.name for g in expl.groups if g.name != "Plain"]
    assert names
    for name in names:
        fresh = FRESH[name]
        note = next(n for n in notes if n.startswith(f"Defining parts of **{name}**"))
        assert "Where they are in this image is unknown (no part annotations), so they are not marked." in note
        ratio = f"{fresh['mass_ratio_ccmp']:.1f}×"
        assert (
            f"On the fresh-seed set, the CCMP map of {name} puts {ratio} as much mass per area on "
            f"{DEFINING[name][0]} as on the other parts (1× = no preference)"
        ) in note
    assert not any(c.startswith("defining parts of") for c in captions(at))  # nothing to mark


def test_draw_defining_parts_keeps_them_in_colour_and_outlines_them():
    img = np.full((40, 40, 3), (30, 160, 200), np.uint8)
    regions = np.zeros((40, 40), np.int32)
    regions[5:15, 5:15] = 1  # crown: defining
    regions[25:35, 25:35] = 2  # wing: other
    out = render.draw_defining_parts(img, regions, [0], PARTS, min_side=80)
    assert out.shape[1] == 80 and out.shape[0] > 80  # enlarged ×2, a legend strip below
    assert (out[20, 20] == img[0, 0]).all()  # inside the defining part: the image's own colour
    assert not (out[60, 60] == img[0, 0]).all()  # the other part is faded
    assert ((out[:80] == render.DEFINING_RGB).all(-1)).any()  # the outline
    legend = out[80:]
    assert ((legend == render.DEFINING_RGB).all(-1)).any() and (legend == 255).any()


def test_draw_part_sets_outlines_each_set_in_its_colour():
    img = np.full((40, 40, 3), (30, 160, 200), np.uint8)
    regions = np.zeros((40, 40), np.int32)
    regions[5:15, 5:15] = 1  # crown: tells apart
    regions[25:35, 25:35] = 2  # wing: shared
    sets = [("tell apart", [0], render.DEFINING_RGB), ("shared", [1, 0], render.SHARED_RGB)]
    out = render.draw_part_sets(img, regions, sets, PARTS, min_side=80)
    picture, legend = out[:80], out[80:]
    assert (picture[20, 20] == img[0, 0]).all() and (picture[60, 60] == img[0, 0]).all()  # both kept in colour
    crown = picture[:40, :40].reshape(-1, 3).tolist()
    wing = picture[40:, 40:].reshape(-1, 3).tolist()
    assert list(render.DEFINING_RGB) in crown and list(render.SHARED_RGB) not in crown  # the crown is the first set's
    assert list(render.SHARED_RGB) in wing and list(render.DEFINING_RGB) not in wing
    for rgb in (render.DEFINING_RGB, render.SHARED_RGB):
        assert ((legend == rgb).all(-1)).any()


def test_sample_annotations_fall_back_to_keypoints_on_a_bad_mask(tmp_path):
    img, parts = _picture(0)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "m.png")
    sample = view.Sample(tmp_path / "a.png", 0, CLASSES[0], np.array(parts), tmp_path / "m.png")
    annotations, note = view.sample_annotations(sample, PARTS, (96, 72))
    assert annotations.labels is None and "regions from the keypoints" in note
    assert annotations.keypoints.shape == (3, 3)
    entry = {"file": "a.png", "label": 0, "class_name": "x", "parts": parts, "mask": "gone.png"}
    (tmp_path / "index.json").write_text(json.dumps({"part_names": PARTS, "samples": [entry]}))
    with pytest.raises(view.GalleryError, match="mask 'gone.png' is missing"):
        view.load_gallery(tmp_path)


# ------------------------------------------------------------------------------------ a new map kind


def _mean_channel(p, rank, targets):
    return p.features.detach().mean(dim=1)  # [B, h, w]: the mean over every channel of F


@pytest.fixture
def toy_kind() -> Iterator:
    """A map kind registered for one test (the mean of F), with its peak kept; removed afterwards."""
    kind = kinds.register(
        kinds.MapKind(
            "mean_f", "Mean of F", _mean_channel, "mean F {name}", "mean of F · p {prob:.2f}", "mean of F for {name}",
            "mean_f", peak=True,
        )
    )
    yield kind
    kinds.unregister(kind.name)


def test_a_registered_map_kind_reaches_explain_montage_npz_json_and_app(toy_kind, env, checkpoint, gallery_dir, tmp_path):
    """One register() call, no other edit: the kind is computed in the pass, drawn in the montage, saved in the
    npz and the json, and offered and shown by the app."""
    model = mcloss.load_checkpoint(checkpoint)
    image = mcloss.load_image(gallery_dir / "bird_0.png")
    plain = mcloss.explain(model, image)
    expl = mcloss.explain(model, image, maps=("gradcam", "mean_f"))
    group = expl.groups[0]
    want = model.forward_features(model.transform(image)[None]).detach().mean(dim=1)[0].numpy()
    np.testing.assert_allclose(group.mean_f, want, rtol=1e-5, atol=1e-6)
    assert group.maps["mean_f"] is group.mean_f and plain.groups[0].mean_f is None
    assert "mean_f" in kinds.parse_maps("channels,mean_f")
    # the montage: one more tile, titled by the kind, drawn after Grad-CAM
    titles = [t.title for t in render.montage_tiles(expl.view, expl, 0, render.Style())]
    assert titles[-2].startswith("Grad-CAM") and titles[-1] == f"mean F {group.name}"
    assert expl.montage().shape[1] > plain.montage().shape[1]
    assert expl.overlay("mean_f").shape == expl.view.shape
    # the npz and the json
    record = expl.save(tmp_path / "bird")
    with np.load(tmp_path / "bird.npz") as npz:
        np.testing.assert_array_equal(npz["mean_f"], group.mean_f)
    assert record["targets"][0]["mean_f"]["peak_xy"] == [float(v) for v in group.map_peaks["mean_f"]]
    assert json.loads((tmp_path / "bird.json").read_text())["mean_f"] == record["mean_f"]
    # the app: a toggle with the kind's label, and its tile with the kind's caption
    assert toy_kind in view.optional_kinds() and view.kind_label(toy_kind) == "Mean of F"
    at = run_app(map_mean_f=True)
    assert_clean(at)
    assert any(c.startswith("mean of F · p ") for c in captions(at))
    assert [t.label for t in at.toggle if t.key == "map_mean_f"] == ["Mean of F"]
    # and a name that already means something in the outputs is refused
    for taken in ("prob", "gradcam", "compare_x", "mean_f_peak_xy"):
        with pytest.raises(mcloss.ParameterError, match=repr(taken)):
            mcloss.register_map_kind(dataclasses.replace(toy_kind, name=taken))


# ------------------------------------------------------------------------------------ why A, not B

SHIPPED = REPO / "checkpoints" / "default.safetensors"
SHIPPED_SAMPLES = REPO / "checkpoints" / "samples"


@pytest.fixture
def shipped_env(monkeypatch):
    """The app on the shipped default checkpoint and its gallery (synthetic birds with part masks)."""
    yield from _app_env(monkeypatch, SHIPPED, SHIPPED_SAMPLES)


def _why_keys(at: AppTest) -> tuple[str, str]:
    a = next(s.key for s in at.selectbox if s.key.startswith("why_a_"))
    b = next(s.key for s in at.selectbox if s.key.startswith("why_b_"))
    return a, b


def test_why_a_not_b_view_on_the_shipped_default(shipped_env, explain_calls, shown):
    """The view's defaults (A: the prediction, B: what contrast="auto" picks), its maps from one explain call
    per pair, their "A vs B" captions, and the parts the two classes share and those that tell them apart."""
    from mcloss.explainability.contrast import nearest_classes

    gallery = view.load_gallery(SHIPPED_SAMPLES)
    index = next(i for i, s in enumerate(gallery.samples) if s.class_name == "Orange_Head_Pink_Belly")
    at = run_app(sample=index, view_mode="Why A, not B?")
    assert_clean(at)
    assert not at.error
    model = mcloss.load_checkpoint(SHIPPED)
    names = list(model.class_names)
    image = mcloss.load_image(gallery.samples[index].path)
    pred = mcloss.explain(model, image).prediction
    auto = mcloss.explain(model, image, [pred], contrast="auto").groups[0].versus.other
    logits = model(model.transform(image)[None]).detach()[0].numpy()
    assert auto == nearest_classes(logits, pred, 1)[0]
    a_key, b_key = _why_keys(at)
    assert at.selectbox(key=a_key).value == pred and names[pred] == "Orange_Head_Pink_Belly"
    assert at.selectbox(key=b_key).value == auto
    assert len(at.selectbox(key=b_key).options) == len(names)  # every class, A itself last
    assert explain_calls[-1] == [[pred, auto]]
    A, B = names[pred], names[auto]
    caps = captions(at)
    assert f"Finer-CAM · {A} vs {B}" in caps and f"group contrast · {A} vs {B}" in caps
    texts = [as_shown(m.value) for m in at.markdown]
    assert f"### Why {A}, not {B}?" in texts
    parts = model.card["defining_parts"]
    shared = [p for p in parts[A] if p in parts[B]]
    apart = ", ".join(
        f"{' and '.join(ps)} ({c})"
        for ps, c in (([p for p in parts[A] if p not in shared], A), ([p for p in parts[B] if p not in shared], B))
        if ps
    )
    assert any(t.startswith(f"Shared: {' and '.join(shared) or 'none'} · Tell apart: {apart}") for t in texts), texts
    notes = [c.value for c in at.caption]
    assert view.FINER_NOTE in notes and view.CONTRAST_NOTE in notes

    # the maps are the kinds' own tiles of that one explanation (one rendering path)
    ex = mcloss.explain(model, image, [pred, auto], contrast=auto, maps=view.WHY_MAPS)
    style = view.style_for("inferno", 0.5, False, True, False)
    base = view.page_image(view.display_image(image))
    want = [kinds.get(k).tiles(base, ex, ex.groups[0], style)[0].image for k in ("gradcam", "finer", "contrast")]
    for got, w in zip(shown[1:4], want, strict=True):
        assert got.shape == w.shape and np.abs(got.astype(int) - w).max() <= 1

    # B as the example: the orange head is shared; belly and tail tell the two apart
    n = len(explain_calls)
    other = names.index("Orange_Head_Forked_Tail")
    at.selectbox(key=b_key).set_value(other).run()
    assert_clean(at)
    assert not at.error
    assert len(explain_calls) == n + 1 and explain_calls[-1] == [[pred, other]]  # only the new pair runs
    caps = captions(at)
    assert f"Finer-CAM · {A} vs Orange_Head_Forked_Tail" in caps
    assert f"group contrast · {A} vs Orange_Head_Forked_Tail" in caps
    texts = [as_shown(m.value) for m in at.markdown]
    assert f"### Why {A}, not Orange_Head_Forked_Tail?" in texts
    line = "Shared: head · Tell apart: belly (Orange_Head_Pink_Belly), tail (Orange_Head_Forked_Tail)"
    assert any(t.startswith(line) for t in texts), texts
    # the gallery sample's part masks: both kinds of part marked, and each map's preference stated
    assert (
        "tell apart (orange): belly (Orange_Head_Pink_Belly), tail (Orange_Head_Forked_Tail) · shared (blue): head · "
        "regions from the part masks"
    ) in caps
    ratio = next(p for t in texts for p in t.split("\n\n") if "mass per area on the parts that tell them apart" in p)
    assert ratio.startswith("On this image, mass per area on the parts that tell them apart ÷ on the shared parts: group contrast ")
    assert "Finer-CAM " in ratio and "Grad-CAM of A " in ratio
    headings = [t for t in texts if t.startswith("#### ")]
    assert headings[0].startswith(f"#### {A} ") and "A, the class to explain · the prediction" in headings[0]
    assert headings[1].startswith("#### Orange_Head_Forked_Tail ") and "B, the class to tell it from" in headings[1]

    # back to the closest class: cached; the same class twice: a message, no maps
    at.selectbox(key=b_key).set_value(auto).run()
    assert len(explain_calls) == n + 1
    at.selectbox(key=b_key).set_value(pred).run()
    assert_clean(at)
    assert len(explain_calls) == n + 1
    assert [as_shown(w.value) for w in at.warning if "same class" in w.value] == [
        f"A and B are the same class ({A}): pick another class B to see what tells them apart."
    ]
    assert not any(c.startswith(("Finer-CAM", "group contrast")) for c in captions(at))


def test_why_view_texts_are_escaped_and_need_the_card(env, checkpoint, gallery_dir):
    """Class names in the view's Markdown are text; a card without defining parts says so; B defaults to the
    class whose FC logit is nearest A's (read from the probabilities)."""
    from mcloss.explainability.contrast import nearest_classes

    logits = np.array([2.0, -1.0, 1.5, 3.0])
    probs = np.exp(logits) / np.exp(logits).sum()
    assert view.closest_classes(probs, 0) == [*nearest_classes(logits, 0, 3), 0] == [2, 3, 1, 0]
    card = {"defining_parts": {"<b>A</b>": ["head", "belly"], "[B](http://x)": ["head", "tail"]}}
    pc = view.parts_contrast(card, "<b>A</b>", "[B](http://x)")
    note = view.parts_contrast_note(pc)
    assert "<b>" not in note and "[B](" not in note and "\\[B\\]" in note
    assert as_shown(note) == "Shared: head · Tell apart: belly (<b>A</b>), tail ([B](http://x))"
    assert view.parts_caption(pc, "part masks") == (
        "tell apart (orange): belly (<b>A</b>), tail ([B](http://x)) · shared (blue): head · regions from the part masks"
    )
    assert view.parts_contrast({}, "a", "b") is None and view.parts_contrast(card, "<b>A</b>", "C") is None
    at = run_app(view_mode="Why A, not B?")  # the tiny checkpoint's card lists no defining parts
    assert_clean(at)
    assert not at.error
    assert any("does not record its classes' defining parts" in as_shown(m.value) for m in at.markdown)
    assert sum(c.startswith(("Finer-CAM · ", "group contrast · ")) for c in captions(at)) == 2


# ------------------------------------------------------------------------------------------ domain check


def test_a_photo_gets_a_warning_not_a_tick_and_a_bird_passes(shipped_env):
    """The shipped default knows synthetic birds only: a real photo is flagged in place of the agreement's tick."""
    import skimage.data

    at = run_app(**upload("astronaut.png", _encode(skimage.data.astronaut(), "PNG")))
    assert_clean(at)
    assert not at.success  # no green tick
    warning = next(w for w in at.warning if "looks unlike anything the model was trained on" in w.value)
    assert "domain score" in warning.value
    assert "Both heads predict" in warning.value or "The heads disagree" in warning.value
    at = run_app(sample=0)
    assert_clean(at)
    assert not any("looks unlike anything" in w.value for w in at.warning)
    assert any(c.value.startswith("In the domain the model was trained on (domain score") for c in at.caption)


def test_a_checkpoint_without_statistics_says_the_check_is_unavailable(env):
    at = run_app()
    assert_clean(at)
    assert any(as_shown(c.value).startswith("Domain check unavailable") for c in at.caption)


# ------------------------------------------------------------------------------------------ memory


def test_distinct_uploads_keep_no_earlier_explanation_alive(env, checkpoint, monkeypatch):
    """Issue 26: the app's memory grew with every distinct upload. Each image had its own class-selector keys,
    and Streamlit keeps every keyed widget's metadata for the session, with the ``format_func`` closure that holds
    the image's explanation. One key per selector: after many uploads in one session (both views), no explanation
    of an earlier upload is alive, and each new image's selectors still start at its own prediction and B. The app
    also fixes glibc's mmap threshold, so freed image buffers leave the script threads' heaps."""
    import gc
    import platform

    monkeypatch.delenv("MCLOSS_APP_MMAP_KB", raising=False)
    view.limit_heap_growth.cache_clear()
    model = mcloss.load_checkpoint(checkpoint)
    sizes = [(101 + i, 77) for i in range(6)]  # an explanation's image size tells which upload it explains
    at = AppTest.from_file(APP, default_timeout=60)
    for i, size in enumerate(sizes):
        img, _ = _picture(100 + i, size)
        order = [int(c) for c in np.argsort(-mcloss.explain(model, Image.fromarray(img)).probs_fc, kind="stable")]
        at.session_state["source"] = "Upload"
        at.session_state["upload"] = {"name": f"up_{i}.png", "data": _encode(img, "PNG")}
        at.session_state["view_mode"] = "Channel groups"
        at.run()
        assert_clean(at)
        target = next(s.key for s in at.selectbox if s.key.startswith("target_"))
        assert at.selectbox(key=target).value == order[0]  # the new image's prediction, not the last choice
        at.selectbox(key=target).set_value(order[-1]).run()  # the user looks at another class
        assert_clean(at)
        assert not at.error, [e.value for e in at.error]
        at.session_state["view_mode"] = "Why A, not B?"
        at.run()
        assert_clean(at)
        a_key, b_key = _why_keys(at)
        assert at.selectbox(key=a_key).value == order[0]
        b = at.selectbox(key=b_key).value
        assert b != order[0]
        at.selectbox(key=a_key).set_value(b).run()  # A changes: B starts at A's closest class again
        assert_clean(at)
        assert at.selectbox(key=_why_keys(at)[1]).value not in (b, None)
    gc.collect()
    alive = sorted({sizes.index(o.image_size) for o in gc.get_objects() if type(o) is Explanation and o.image_size in sizes})
    assert alive in ([], [len(sizes) - 1]), f"explanations of earlier uploads are still alive: uploads {alive}"
    # the server's threads' heaps: image-sized buffers are returned when freed (a fixed mmap threshold, glibc)
    assert view.limit_heap_growth.cache_info().misses == 1
    assert view.limit_heap_growth() is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
