"""Safe image decoding and atomic writes."""

import io
import re
import warnings
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from mcloss.core.files import atomic_path, atomic_write_json
from mcloss.data.io import ImageLoadError, encode_image, encode_png, load_image


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_modes_are_converted_to_rgb(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    cases = {
        "rgba.png": rgb.convert("RGBA"),
        "pal.png": rgb.convert("P"),
        "gray.png": rgb.convert("L"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "sixteen.png": Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100),
        "bw.bmp": rgb.convert("1"),
        "w.webp": rgb,
    }
    for name, img in cases.items():
        out = load_image(_save(img, tmp_path / name))
        assert out.mode == "RGB" and out.size == (30, 20), name
    sixteen = np.asarray(load_image(tmp_path / "sixteen.png"))
    assert sixteen[0, 0, 0] == 0 and sixteen[-1, -1, 0] == round(59900 / 65535 * 255)


def test_transparent_pixels_composite_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(_save(img, tmp_path / "t.png")).getpixel((0, 0)) == (255, 255, 255)


def test_multiframe_takes_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "a.tiff", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "a.gif").getpixel((0, 0))[0] > 200
    assert load_image(tmp_path / "a.tiff").getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    arr = np.asarray(out).sum(-1)
    assert arr[0, -1] > arr[-1, 0]  # the white corner moved to the top right


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty file"), (b"hello, not an image", "not a recognized image"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "not a recognized|corrupt")],
)
def test_bad_files(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[:1000])
    with pytest.raises(ImageLoadError) as err:
        load_image(path)
    # Pillow's reason follows as a clause of its own, not inside a bracket of ours around its bracket
    reason = r"corrupt or truncated image: image file is truncated \(\d+ bytes not processed\)"
    assert re.fullmatch(f"{re.escape(str(path))}: {reason}", str(err.value)), err.value


def test_decompression_bomb_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # 400 MP, a few KB on disk
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(path, max_pixels=1000)
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text().strip().startswith("{") and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_writes_get_the_mode_of_a_plain_new_file(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    atomic_write_json(tmp_path / "out" / "atomic.json", {})
    mode = (tmp_path / "out" / "atomic.json").stat().st_mode & 0o777
    assert mode == plain.stat().st_mode & 0o777  # not mkstemp's private 0600


def test_encode_image_keeps_rgb_order_and_writes_grayscale_losslessly():
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB order
    for fmt in ("png", "jpeg"):
        decoded = np.asarray(Image.open(io.BytesIO(encode_image(rgb, fmt))))
        assert decoded.shape == (6, 8, 3) and decoded[..., 0].min() > 150 and decoded[..., 2].max() < 50, fmt
    labels = np.arange(48, dtype=np.uint8).reshape(6, 8) % 9
    png = Image.open(io.BytesIO(encode_image(labels, "png")))
    assert png.mode == "L"
    np.testing.assert_array_equal(np.asarray(png), labels)
    assert Image.open(io.BytesIO(encode_image(labels * 28, "jpeg"))).mode == "L"
    for bad in (labels.astype(np.int32), rgb[..., :2], rgb[None]):
        with pytest.raises(ValueError, match="uint8 image"):
            encode_image(bad)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 3), (9, 1, 3), (33, 50, 3), (1, 1), (17, 23)])
def test_png_is_lossless_with_either_deflate(shape):
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    img[len(img) // 2 :] = img[: len(img) - len(img) // 2]  # repeated rows: the Up filter gives zeros there
    for compress in (None, zlib.compress):
        data = encode_png(img, compress=compress)
        pil = np.asarray(Image.open(io.BytesIO(data)))
        ocv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(pil, img)
        np.testing.assert_array_equal(ocv if img.ndim == 2 else ocv[..., ::-1], img)  # OpenCV reads BGR
    flat = np.full((64, 64, 3), 7, np.uint8)
    assert len(encode_png(flat)) < 200  # a constant image deflates to almost nothing
    for bad in (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4), np.uint16), np.zeros((0, 5, 3), np.uint8)):
        with pytest.raises(ValueError, match="uint8 image"):
            encode_png(bad)


def test_a_montage_longer_than_webp_holds_is_scaled_to_fit():
    """WebP holds at most 16383 px a side: a wider montage is scaled down, not an export that stops."""
    img = np.zeros((40, 20000, 3), np.uint8)
    img[:, ::2] = (255, 128, 0)  # stripes average to half: an area filter, not a pick of every other column
    back = np.asarray(Image.open(io.BytesIO(encode_image(img, "webp", quality=100))).convert("RGB"))
    assert back.shape == (33, 16383, 3)
    assert abs(float(back[..., 0].mean()) - 127.5) < 6
    assert Image.open(io.BytesIO(encode_image(img, "jpg"))).size == (20000, 40)  # JPEG holds it as is
    longer = np.zeros((10, 65600, 3), np.uint8)  # over the 65500 px libjpeg-turbo takes
    assert Image.open(io.BytesIO(encode_image(longer, "jpg"))).size == (65500, 10)


def test_a_command_on_an_image_within_its_limit_prints_no_pillow_bomb_warning(tmp_path, capsys):
    """Pillow warns from 89.5 MP; an export takes up to MAX_IMAGE_PIXELS (and names its own limit when over it),
    so a command's stderr holds no Pillow warning. The library leaves the process's warning filters alone."""
    from mcloss.cli import main

    path = tmp_path / "wide.png"
    Image.new("1", (9500, 9500)).save(path)  # 90.25 MP, a few KB on disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        argv = ["export", "--input", str(path), "--out", str(tmp_path / "out"), "--workers", "0", "--no-progress",
                "--no-montage", "--maps", "channels"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
        load_image(path)  # the library itself: Pillow's warning reaches the caller's filters as Pillow sends it
        assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
