"""Text on RGB uint8 images: titles, labels with a halo, legends (OpenCV Hershey fonts, ASCII only)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np

from mcloss.explainability.render.layout import blank_canvas

__all__ = ["put_text", "channel_labels", "composite_legend", "halo_label", "legend_columns", "legend_strip", "LEGEND_ONE_COLUMN"]


_FONT = cv2.FONT_HERSHEY_SIMPLEX


_TEXT_RGB = (30, 30, 30)


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only: strip accents, replace the rest with '?'."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii") or "?"


#: Text too wide for its place is first drawn smaller, down to this share of its size (titles of one row stay
#: alike), then shortened with '..'.
MIN_SHRINK = 0.8
#: A trailing number (a probability, a peak) that shortening keeps: "Grad-CAM Forked_Ta.. 0.30".
_TRAILING_NUMBER = re.compile(r"\s[-+]?\d+(?:\.\d+)?$")


def put_text(
    img: np.ndarray, text: str, org: tuple[int, int], scale: float, max_width: int, *, min_shrink: float = MIN_SHRINK
) -> None:
    """Draw text (RGB colour) in place, shrinking it (to ``min_shrink`` of ``scale``, and never below 0.3) then
    shortening it with '..' before a trailing number, to fit ``max_width``. A line of its own (a montage's
    header) passes ``min_shrink=0``: smaller, but whole."""
    text, scale = _fitted(text, scale, max_width, min_shrink)
    cv2.putText(img, text, org, _FONT, scale, _TEXT_RGB, 1, cv2.LINE_AA)


@lru_cache(maxsize=4096)
def _fitted(text: str, scale: float, max_width: int, min_shrink: float = MIN_SHRINK) -> tuple[str, float]:
    """(text, scale) as :func:`put_text` draws them within ``max_width`` (cached: a montage's titles repeat from
    image to image)."""
    text = _ascii(text)
    (tw, _), _ = cv2.getTextSize(text, _FONT, scale, 1)
    if tw > max_width and tw > 0:
        floor = max(0.3, scale * min_shrink)
        scale = max(floor, scale * max_width / tw)
        while scale > floor and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > max_width:  # glyph widths round
            scale = max(floor, scale * 0.97)
    found = _TRAILING_NUMBER.search(text)
    head, tail = (text[: found.start()], text[found.start() :]) if found and found.start() > 1 else (text, "")
    text = _shortened(head, tail, scale, max_width)
    if cv2.getTextSize(text, _FONT, scale, 1)[0][0] > max_width:  # not even the number fits: cut the end
        text = _shortened(text, "", scale, max_width)
    return text, scale


def _shortened(head: str, tail: str, scale: float, max_width: int) -> str:
    """``head`` cut short with '..' until ``head + tail`` fits ``max_width`` (or one character is left)."""
    while len(head) > 1 and cv2.getTextSize(head + tail, _FONT, scale, 1)[0][0] > max_width:
        head = head[:-3] + ".." if len(head) > 3 else head[:-1]
    return head + tail


#: A legend of up to this many entries is one column; a longer one (a large class group) fills columns side by
#: side, as many as its width holds, so that it stays about as tall as its tile.
LEGEND_ONE_COLUMN = 8


def channel_labels(count: int) -> list[str]:
    """The part composite's legend labels: ``ch 1`` … ``ch <count>`` (1-based, as the tiles' titles)."""
    return [f"ch {i + 1}" for i in range(count)]


def legend_columns(labels: Sequence[str], width: int, row_height: int = 18) -> int:
    """The columns :func:`composite_legend` lays ``labels`` out in at ``width``."""
    n = len(labels)
    if n <= LEGEND_ONE_COLUMN:
        return 1
    sw, scale = row_height - 6, row_height / 40.0
    entry = 10 + sw + max(cv2.getTextSize(_ascii(t), _FONT, scale, 1)[0][0] for t in labels) + 8
    return max(1, min(n, width // entry))


def composite_legend(
    colors: np.ndarray, labels: Sequence[str], *, width: int, row_height: int = 18
) -> np.ndarray:
    """A small legend strip [rows·row_height, width, 3]: a colour swatch and a label per channel, down one
    column, or down :func:`legend_columns` columns side by side for more than :data:`LEGEND_ONE_COLUMN`."""
    n = len(labels)
    cols = legend_columns(labels, width, row_height)
    rows = -(-max(1, n) // cols)
    col_w = width // cols
    out = blank_canvas(rows * row_height, width)
    scale = row_height / 40.0
    sw = row_height - 6
    for i, text in enumerate(labels):
        x0, y0 = (i // rows) * col_w, (i % rows) * row_height
        c = tuple(int(v) for v in colors[i])
        cv2.rectangle(out, (x0 + 4, y0 + 3), (x0 + 4 + sw, y0 + 3 + sw), c, -1)
        put_text(out, text, (x0 + 10 + sw, y0 + row_height - 5), scale, col_w - 14 - sw)
    return out


def halo_label(
    out: np.ndarray,
    text: str,
    box: tuple[int, int, int, int],
    busy: np.ndarray,
    keep_clear: np.ndarray,
    scale: float,
    offset: int,
) -> None:
    """Dark text with a white halo beside the region ``box`` (x0, y0, x1, y1), kept inside ``out``: right,
    left, above or below it, whichever covers least of ``busy`` (the object and earlier labels, updated) and
    above all of ``keep_clear`` (the defining parts)."""
    text = _ascii(text)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
    h, w = busy.shape
    x0, y0, x1, y1 = box
    xc, yc = (x0 + x1 - tw) // 2, (y0 + y1 + th) // 2
    candidates = [(x1 + offset, yc), (x0 - offset - tw, yc), (xc, y0 - offset), (xc, y1 + offset + th)]
    best, best_cost = None, None
    for x, y in candidates:
        x = int(np.clip(x, 4, max(4, w - tw - 4)))
        y = int(np.clip(y, th + 4, max(th + 4, h - base - 4)))
        rows, cols = slice(max(0, y - th), y + base), slice(x, x + tw)
        cost = float(busy[rows, cols].mean() + 4.0 * keep_clear[rows, cols].mean()) if tw and th else 0.0
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = (x, y), cost
    x, y = best
    busy[max(0, y - th - 4) : y + base + 4, max(0, x - 4) : x + tw + 4] = True
    cv2.putText(out, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 6, cv2.LINE_AA)
    cv2.putText(out, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), 2, cv2.LINE_AA)


def legend_strip(width: int, scale: float, entries: Sequence[tuple[str, tuple[int, int, int], bool]]) -> np.ndarray:
    """A white strip with one swatch (filled, or outlined) and label per entry, wrapped onto rows."""
    row_h = int(round(40 * scale))
    sw = int(round(row_h * 0.55))
    pad = max(6, row_h // 3)
    rows: list[list[tuple[int, str, tuple[int, int, int], bool]]] = [[]]
    x = pad
    for text, color, filled in entries:
        text = _ascii(text)
        (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
        need = sw + 8 + tw + 2 * pad
        if rows[-1] and x + need > width:
            rows.append([])
            x = pad
        rows[-1].append((x, text, color, filled))
        x += need
    out = np.full((row_h * len(rows) + pad // 2, width, 3), 255, np.uint8)
    for r, items in enumerate(rows):
        yc = r * row_h + row_h // 2 + pad // 4
        for x0, text, color, filled in items:
            p0, p1 = (x0, yc - sw // 2), (x0 + sw, yc + sw // 2)
            if filled:
                cv2.rectangle(out, p0, p1, color, -1)
                cv2.rectangle(out, p0, p1, (40, 40, 40), 1)
            else:
                cv2.rectangle(out, p0, p1, color, max(2, sw // 6))
            org = (x0 + sw + 8, yc + int(10 * scale))
            cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (30, 30, 30), 2, cv2.LINE_AA)
    return out
