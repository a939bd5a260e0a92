"""Safe image decoding and the one image encoder (file primitives are in :mod:`mcloss.core.files`)."""

from __future__ import annotations

import functools
import io
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mcloss.core.errors import MclossError, ParameterError, first_line

__all__ = [
    "DEFAULT_QUALITY",
    "check_encoding",
    "IMAGE_FORMATS",
    "ImageFormat",
    "encode_image",
    "encode_jpeg_tensor",
    "encode_png",
    "image_format",
    "ImageLoadError",
    "load_image",
    "MAX_IMAGE_PIXELS",
    "to_rgb",
]


#: Images with more pixels than this are refused as decompression bombs (PIL's default × 2 ≈ 179 MP).
MAX_IMAGE_PIXELS = 178_956_970


class ImageLoadError(MclossError, ValueError):
    """An input could not be decoded as an image; the message names the file and the reason."""


def _megapixels(pixels: int, limit: int) -> str:
    """``pixels`` in MP with as many decimals as it takes to read apart from ``limit`` in whole MP: an image
    of 8000×5001 is "40.01 MP, limit 40 MP", not "40 MP, limit 40 MP"."""
    shown = f"{limit / 1e6:.0f}"
    for digits in range(7):
        text = f"{pixels / 1e6:.{digits}f}"
        if float(text) != float(shown):
            return text
    return text


def load_image(source: str | os.PathLike | IO[bytes], name: str | None = None, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image to 8-bit RGB with its EXIF orientation applied.

    Handles palette, RGBA/LA (composited on white), CMYK, 16-bit and float modes, and takes the first
    frame of multi-page TIFF/GIF files.

    Raises:
        ImageLoadError: unreadable, empty, corrupt, truncated, not an image, or too many pixels.
    """
    if name is not None:
        label = name
    elif isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
    else:
        label = str(getattr(source, "name", "<upload>"))
    try:
        if isinstance(source, (str, os.PathLike)) and os.path.getsize(source) == 0:
            raise ImageLoadError(f"{label}: empty file")
        with Image.open(source) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    f"{label}: image too large ({width}×{height} = {_megapixels(width * height, max_pixels)} MP, "
                    f"limit {max_pixels / 1e6:.0f} MP)"
                )
            img.seek(0)
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{label}: is a directory") from None
    except PermissionError:
        raise ImageLoadError(f"{label}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{label}: {_unidentified(source)}") from None
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{_megapixels(int(found.group(1)), max_pixels)} MP, " if found else ""
        raise ImageLoadError(
            f"{label}: image too large ({size}limit {max_pixels / 1e6:.0f} MP), refused as a possible decompression bomb"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{label}: corrupt or truncated image: {first_line(exc, 160)}") from None


_TIFF_SAMPLE_FORMATS = {1: "unsigned integer", 2: "signed integer", 3: "floating-point", 4: "undefined"}


def _head(source: str | os.PathLike | IO[bytes], n: int = 4096) -> bytes:
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return f.read(n)
        source.seek(0)
        return source.read(n)
    except (OSError, AttributeError, ValueError):
        return b""


def _unidentified(source: str | os.PathLike | IO[bytes]) -> str:
    """Why Pillow could not identify a file: a TIFF whose samples it cannot decode is named as such."""
    head = _head(source)
    if head[:4] not in (b"II*\x00", b"MM\x00*"):
        return "not a recognized image format"
    samples = _tiff_samples(head)
    what = f" ({samples} samples)" if samples else ""
    return f"a TIFF whose pixel format Pillow cannot decode{what}; convert it to 8- or 16-bit integer samples"


def _tiff_samples(head: bytes) -> str | None:
    """``"64-bit floating-point"`` (or ``"3 × 64-bit floating-point"`` for three samples a pixel) from the first
    IFD of a TIFF header, or None. A tag's SHORT values sit in its entry when two fit there, else at the offset
    the entry holds (issue 26: reading that offset as the value gave "206-bit")."""
    end = "<" if head[:2] == b"II" else ">"
    try:
        (offset,) = struct.unpack(end + "I", head[4:8])
        (count,) = struct.unpack(end + "H", head[offset : offset + 2])
        tags: dict[int, tuple[int, int]] = {}
        for i in range(count):
            entry = offset + 2 + 12 * i
            tag, kind, n = struct.unpack(end + "HHI", head[entry : entry + 8])
            if kind == 3 and n >= 1:  # SHORT
                at = entry + 8 if n <= 2 else struct.unpack(end + "I", head[entry + 8 : entry + 12])[0]
                tags[tag] = (struct.unpack(end + "H", head[at : at + 2])[0], n)
    except struct.error:
        return None
    if 258 not in tags:
        return None
    bits, samples = tags[258]
    fmt = tags.get(339, (1, 1))[0]
    kind = f"{bits}-bit {_TIFF_SAMPLE_FORMATS.get(fmt, f'format-{fmt}')}"
    return f"{samples} × {kind}" if samples > 1 else kind


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, as :func:`load_image` reads files (alpha composited on white, 16-bit and float
    modes scaled); an RGB image is copied."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)
        return Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class ImageFormat:
    """One format the image encoder writes.

    Attributes:
        name: its name (``--montage-format``).
        suffix: the file suffix.
        mime: the MIME type (downloads).
        lossy: whether ``quality`` applies.
        encode: (image, quality, full_chroma) → bytes; image RGB [H, W, 3] or grayscale [H, W] uint8,
            C-contiguous; ``full_chroma`` asks a format that subsamples colour not to.
        max_side: the longest side the format can hold (WebP 16383; JPEG 65535, of which libjpeg-turbo takes
            65500), or None.
    """

    name: str
    suffix: str
    mime: str
    lossy: bool
    encode: Callable[[np.ndarray, int, bool], bytes]
    max_side: int | None = None


#: The default quality of the lossy formats: a JPEG montage at 92 (4:4:4) stays above 38 dB PSNR of its PNG (39.3 dB
#: on a textured photograph-like image, 42.4 dB on a synthetic bird; at 90, 38.1 and 41.3).
DEFAULT_QUALITY = 92


def _jpeg(img: np.ndarray, quality: int, full_chroma: bool) -> bytes:
    """libjpeg-turbo through OpenCV; 4:2:0 unless ``full_chroma`` (4:4:4: montages are thin colour lines, text
    and heatmaps, where 4:2:0 costs 4-5 dB: at 90, 37 dB against 42 dB on a synthetic bird's montage)."""
    bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    if full_chroma:
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    ok, buf = cv2.imencode(".jpg", bgr, params)
    if not ok:
        raise OSError("JPEG encoding failed")
    return buf.tobytes()


def _webp(img: np.ndarray, quality: int, full_chroma: bool) -> bytes:
    """libwebp through Pillow at method 0, its fastest (OpenCV's default effort took 2.5-3.5× longer)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="WEBP", quality=int(quality), method=0)
    return buf.getvalue()


#: The formats of :func:`encode_image`, by name (``jpeg`` is ``jpg``).
IMAGE_FORMATS: dict[str, ImageFormat] = {
    "png": ImageFormat("png", ".png", "image/png", False, lambda img, _q, _c: encode_png(img)),
    "jpg": ImageFormat("jpg", ".jpg", "image/jpeg", True, _jpeg, 65500),
    "webp": ImageFormat("webp", ".webp", "image/webp", True, _webp, 16383),
}


def image_format(name: str) -> ImageFormat:
    """The format called ``name`` (``jpeg`` is ``jpg``).

    Raises:
        ParameterError: an unknown format.
    """
    fmt = IMAGE_FORMATS.get("jpg" if name == "jpeg" else name)
    if fmt is None:
        raise ParameterError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {name!r}", parameter="fmt")
    return fmt


def encode_image(rgb: np.ndarray, fmt: str = "png", *, quality: int = DEFAULT_QUALITY, full_chroma: bool = False) -> bytes:
    """Encode an RGB [H, W, 3] or grayscale [H, W] uint8 image (deterministic, no metadata).

    Args:
        rgb: the image, RGB channel order, or a 2-D grayscale array (label maps, masks), written as one
            8-bit channel unchanged.
        fmt: ``"png"`` (lossless, :func:`encode_png`), ``"jpg"`` (or ``"jpeg"``) or ``"webp"``.
        quality: the lossy formats' quality, 1..100.
        full_chroma: JPEG without chroma subsampling (4:4:4), as montages are written.

    An image longer than the format can hold (``ImageFormat.max_side``: a wide montage in WebP) is first
    scaled down (area filter) to fit it.
    """
    img = _checked_image(rgb)
    form = check_encoding(fmt, quality)
    if form.max_side is not None and max(img.shape[:2]) > form.max_side:
        scale = form.max_side / max(img.shape[:2])
        size = (min(form.max_side, max(1, round(img.shape[1] * scale))), min(form.max_side, max(1, round(img.shape[0] * scale))))
        img = np.ascontiguousarray(cv2.resize(img, size, interpolation=cv2.INTER_AREA))
    return form.encode(img, quality, full_chroma)


def encode_jpeg_tensor(rgb: torch.Tensor, quality: int = DEFAULT_QUALITY) -> bytes:
    """A JPEG of an RGB uint8 [H, W, 3] tensor, 4:4:4 as montages are written, encoded where it lies.

    On a CUDA device ``torchvision.io.encode_jpeg`` encodes it there (nvJPEG, 4:4:4) and only the bytes
    come back; elsewhere :func:`encode_image` does (torchvision's CPU encoder subsamples chroma 4:2:0).
    """
    check_encoding("jpg", quality)
    if rgb.dtype != torch.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.numel() == 0:
        raise ParameterError(f"expected an RGB uint8 tensor [H, W, 3], got {rgb.dtype} {tuple(rgb.shape)}")
    if rgb.device.type != "cuda" or max(rgb.shape[:2]) > IMAGE_FORMATS["jpg"].max_side:
        return encode_image(rgb.cpu().numpy(), "jpg", quality=quality, full_chroma=True)
    from torchvision.io import encode_jpeg

    return bytes(encode_jpeg(rgb.permute(2, 0, 1).contiguous(), quality=quality).cpu().numpy())


def check_encoding(fmt: str, quality: int) -> ImageFormat:
    """The format called ``fmt``, with ``quality`` checked (an integer in 1..100).

    Raises:
        ParameterError: an unknown format or a quality out of range.
    """
    chosen = image_format(fmt)
    if not (isinstance(quality, int) and not isinstance(quality, bool) and 1 <= quality <= 100):
        raise ParameterError(f"quality must be an integer in 1..100, got {quality!r}", parameter="quality")
    return chosen


def _checked_image(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` as a C-contiguous uint8 [H, W, 3] or [H, W] array with at least one pixel, else ParameterError."""
    img = np.asarray(rgb)
    if img.dtype != np.uint8 or not (img.ndim == 2 or img.ndim == 3 and img.shape[2] == 3) or img.size == 0:
        raise ParameterError(f"expected an RGB [H, W, 3] or grayscale [H, W] uint8 image, got {img.dtype} {img.shape}")
    return np.ascontiguousarray(img)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(img: np.ndarray, *, compress: Callable[[bytes, int], bytes] | None = None) -> bytes:
    """A PNG of an RGB [H, W, 3] or grayscale [H, W] uint8 array: every row with the Up filter (the row minus
    the one above, one numpy subtraction), deflated at level 1 by ISA-L when the ``isal`` package is there
    (about 4× faster than OpenCV's libpng on a montage, and as small), else by zlib. ``compress``
    (data, level) replaces the deflate, e.g. ``zlib.compress``."""
    img = _checked_image(img)
    h, w = img.shape[:2]
    rows = img.reshape(h, -1)
    filtered = np.empty((h, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # filter type Up; the first row's "above" is zeros
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if img.ndim == 2 else 2, 0, 0, 0)
    deflate = compress or _fast_deflate()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", deflate(filtered.data, 1)) + _png_chunk(b"IEND", b"")


@functools.lru_cache(maxsize=1)
def _fast_deflate() -> Callable[[bytes, int], bytes]:
    try:
        from isal import isal_zlib
    except ImportError:  # a platform without ISA-L wheels: the same PNG, deflated by zlib (slower)
        return zlib.compress
    return isal_zlib.compress
