"""Canvas and layout: tile sizes, letterboxing, montage rows, views and thumbnails of the original.

Images are RGB uint8 [H, W, 3]; the background is white."""

from __future__ import annotations

import cv2
import numpy as np

from mcloss.core.errors import ParameterError

__all__ = [
    "check_image",
    "blank_canvas",
    "fit_width",
    "within_cap",
    "DEFAULT_TILE_HEIGHT",
    "VIEW_MAX_SIDE",
    "MAX_TILE_ASPECT",
    "MAX_TILE_HEIGHT",
    "MIN_TILE_HEIGHT",
    "MONTAGE_MAX_PIXELS",
    "tile_box",
    "pad_to_aspect",
    "aspect_padding",
    "letterbox",
    "montage_height",
    "thumbnail",
    "fit_view",
]


_BG = 255  # the background's value in every channel (white)


#: Views of the original are kept downscaled to this long side for drawing (the app and ``explain``).
VIEW_MAX_SIDE = 1024


#: Montage tiles are at most this many times wider than tall (or taller than wide); a more extreme image is
#: letterboxed: fitted inside the tile and padded with white.
MAX_TILE_ASPECT = 4.0


#: The largest montage tile height (``Style.tile_height``, ``--tile-height``).
MAX_TILE_HEIGHT = 2048


#: Rows of each montage tile unless a style says otherwise (``Style.tile_height``, ``--tile-height``).
DEFAULT_TILE_HEIGHT = 224
#: The smallest montage tile height (titles stay legible).
MIN_TILE_HEIGHT = 16


#: A montage never has more pixels than this: its tile height is lowered until it fits (Pillow's
#: decompression-bomb guard starts warning at 89 MP).
MONTAGE_MAX_PIXELS = 24_000_000


def blank_canvas(rows: int, cols: int) -> np.ndarray:
    """A background-coloured RGB uint8 canvas of rows × cols."""
    return np.full((rows, cols, 3), _BG, np.uint8)


def check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ParameterError(f"expected an RGB uint8 image [H, W, 3], got {img.dtype} {img.shape}")
    return img


def tile_box(size_hw: tuple[int, int], height: int) -> tuple[int, int]:
    """(rows, cols) of an image of ``size_hw`` drawn in a tile of ``height`` rows: scaled to ``height`` rows,
    or to ``MAX_TILE_ASPECT × height`` columns when it is wider than that."""
    h, w = int(size_hw[0]), int(size_hw[1])
    scale = min(height / h, MAX_TILE_ASPECT * height / w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``img`` at rows × cols: the area filter when it shrinks, bilinear when it grows (unchanged if equal)."""
    if img.shape[:2] == (rows, cols):
        return img
    interp = cv2.INTER_AREA if rows * cols < img.shape[0] * img.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(img, (cols, rows), interpolation=interp)


def within_cap(picture: np.ndarray) -> np.ndarray:
    """``picture``, scaled down (aspect kept) when it has more than MONTAGE_MAX_PIXELS pixels."""
    pixels = picture.shape[0] * picture.shape[1]
    if pixels <= MONTAGE_MAX_PIXELS:
        return picture
    scale = (MONTAGE_MAX_PIXELS / pixels) ** 0.5
    return _resize(picture, max(1, int(picture.shape[0] * scale)), max(1, int(picture.shape[1] * scale)))


def pad_to_aspect(image: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Pad (white, centred) so that width ÷ height lies in [1/MAX_TILE_ASPECT, MAX_TILE_ASPECT], and to at
    least ``rows`` rows; an image already inside is returned as is."""
    img = check_image(image)
    top, bottom, left, right = aspect_padding(img.shape[:2], rows)
    if top == bottom == left == right == 0:
        return img
    return np.pad(img, ((top, bottom), (left, right), (0, 0)), constant_values=255)


def aspect_padding(size_hw: tuple[int, int], rows: int | None = None) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the white rows and columns :func:`pad_to_aspect` adds to an image of
    ``size_hw``."""
    h, w = int(size_hw[0]), int(size_hw[1])
    want_h = max(h, rows or 0, int(np.ceil(w / MAX_TILE_ASPECT)))
    want_w = max(w, int(np.ceil(want_h / MAX_TILE_ASPECT)))
    top, left = (want_h - h) // 2, (want_w - w) // 2
    return top, want_h - h - top, left, want_w - w - left


def letterbox(image: np.ndarray, height: int) -> np.ndarray:
    """The image as a montage tile of exactly ``height`` rows: scaled into :func:`tile_box`, then padded to
    at most MAX_TILE_ASPECT:1 either way (an ordinary image is only scaled)."""
    img = check_image(image)
    return pad_to_aspect(_resize(img, *tile_box(img.shape[:2], height)), height)


def montage_height(size_hw: tuple[int, int], tiles: int, tile_height: int, *, extra_rows: int = 0) -> int:
    """The tile height a montage of ``tiles`` tiles of an image of ``size_hw`` is drawn at: ``tile_height``,
    lowered until the montage stays within MONTAGE_MAX_PIXELS (``extra_rows``: titles, header, legend)."""
    h, w = int(size_hw[0]), int(size_hw[1])
    aspect = min(max(w / h, 1 / MAX_TILE_ASPECT), MAX_TILE_ASPECT)
    height = min(int(tile_height), MAX_TILE_HEIGHT)

    def pixels(rows: int) -> float:
        return tiles * (aspect * rows + 8) * (rows + extra_rows)

    while height > MIN_TILE_HEIGHT and pixels(height) > MONTAGE_MAX_PIXELS:
        height = max(MIN_TILE_HEIGHT, int(height * 0.95))
    return height


def fit_width(img: np.ndarray, width: int) -> np.ndarray:
    if img.shape[1] >= width:
        return img[:, :width]
    return np.pad(img, ((0, 0), (0, width - img.shape[1]), (0, 0)), constant_values=255)


def thumbnail(image: np.ndarray, height: int) -> tuple[np.ndarray, float]:
    """The image scaled into a ``height``-row tile (:func:`tile_box`: ``height`` rows, or fewer for an image
    wider than MAX_TILE_ASPECT:1) and the scale factor (thumbnail px per original px)."""
    img = check_image(image)
    thumb = _resize(img, *tile_box(img.shape[:2], height))
    return thumb, thumb.shape[1] / img.shape[1]


def fit_view(image: np.ndarray, max_side: int | None = VIEW_MAX_SIDE) -> np.ndarray:
    """The image downscaled (area filter) so that its long side is at most ``max_side`` (None: as is)."""
    img = check_image(image)
    h, w = img.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return img
    scale = max_side / max(h, w)
    return _resize(img, max(1, round(h * scale)), max(1, round(w * scale)))
