"""Drawing one synthetic bird: part polygons in a random pose, patterns, clutter, photometric noise.

Coordinates (keypoints, boxes) are in original pixels with the pixel-centre convention of
:class:`mcloss.core.transforms.Geometry`: pixel i covers [i, i+1).
"""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from mcloss.data.synth.design import (
    _ALL_COLOURS,
    BODY_LABEL,
    CLASS_PARTS,
    COLOURS,
    MIN_VISIBLE_FRACTION,
    NEUTRALS,
    PART_NAMES,
    BirdClass,
)

__all__ = ["RenderedBird", "instance_rng", "render_bird"]

# ---------------------------------------------------------------------------------------------- geometry


@functools.lru_cache(maxsize=16)
def _unit_circle(n: int) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _rotation(angle: float) -> np.ndarray:
    ca, sa = math.cos(angle), math.sin(angle)
    return np.array([[ca, -sa], [sa, ca]])


def _ellipse(cx: float, cy: float, ax: float, ay: float, angle: float = 0.0, n: int = 28) -> np.ndarray:
    return (_unit_circle(n) * (ax, ay)) @ _rotation(angle).T + (cx, cy)


def _rotate(points: np.ndarray, centre: tuple[float, float], angle: float) -> np.ndarray:
    return (np.asarray(points, dtype=np.float64) - centre) @ _rotation(angle).T + centre


def _quad(x0: float, y0: float, x1: float, y1: float, width: float) -> np.ndarray:
    """A bar of the given width from (x0, y0) to (x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    norm = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / norm * width / 2.0, dx / norm * width / 2.0
    return np.array([[x0 + nx, y0 + ny], [x1 + nx, y1 + ny], [x1 - nx, y1 - ny], [x0 - nx, y0 - ny]])


def _stripes(centre: tuple[float, float], half: tuple[float, float], angle: float, period: float, width: float) -> list[np.ndarray]:
    """Bars across a box (local x axis = box length), rotated by ``angle``."""
    xs = np.arange(-half[0], half[0] + 1e-9, period)
    corners = np.array([[-width / 2, -half[1]], [width / 2, -half[1]], [width / 2, half[1]], [-width / 2, half[1]]])
    bars = corners[None] + np.stack([xs, np.zeros_like(xs)], axis=1)[:, None]
    return list(bars @ _rotation(angle).T + centre)


def _dots(centre: tuple[float, float], half: tuple[float, float], angle: float, period: float, radius: float) -> list[np.ndarray]:
    """A staggered grid of dots over a box, rotated by ``angle``."""
    centres = []
    for row, y in enumerate(np.arange(-half[1], half[1] + 1e-9, period * 0.87)):
        xs = np.arange(-half[0] + (period / 2.0 if row % 2 else 0.0), half[0] + 1e-9, period)
        centres.append(np.stack([xs, np.full_like(xs, y)], axis=1))
    if not centres:
        return []
    points = np.vstack(centres) @ _rotation(angle).T + centre
    return list(points[:, None, :] + radius * _unit_circle(10)[None])


@dataclass(frozen=True)
class _Shape:
    """Polygons of one drawn element in canonical bird units, plus its pattern polygons."""

    polys: list[np.ndarray]
    pattern: list[np.ndarray] = field(default_factory=list)
    centre: tuple[float, float] = (0.0, 0.0)


_WING_ANGLE = math.radians(10.0)
_BELLY_ANGLE = math.radians(-4.0)


def _bird_shapes(attrs: dict[str, dict[str, str]]) -> dict[str, _Shape]:
    """Canonical bird (facing +x, y down, about 0.77 × 0.5 units) for the given attributes."""
    shapes: dict[str, _Shape] = {}
    tail = attrs["tail"]["shape"]
    if tail == "fan":
        arc = np.radians(np.linspace(150.0, 210.0, 9))
        poly = np.vstack([[[-0.16, -0.025]], np.stack([-0.16 + 0.19 * np.cos(arc), 0.19 * np.sin(arc)], 1), [[-0.16, 0.025]]])
        shapes["tail"] = _Shape([poly], centre=(-0.27, 0.0))
    elif tail == "forked":
        poly = np.array([[-0.15, -0.035], [-0.37, -0.085], [-0.29, 0.0], [-0.37, 0.085], [-0.15, 0.035]])
        shapes["tail"] = _Shape([poly], centre=(-0.25, 0.0))
    else:  # pointed
        poly = np.array([[-0.15, -0.04], [-0.39, 0.0], [-0.15, 0.04]])
        shapes["tail"] = _Shape([poly], centre=(-0.24, 0.0))

    legs = [_quad(0.0, 0.10, -0.012, 0.22, 0.016), _quad(0.055, 0.10, 0.06, 0.22, 0.016),
            _quad(-0.012, 0.22, 0.03, 0.225, 0.012), _quad(0.06, 0.22, 0.10, 0.225, 0.012)]
    shapes["legs"] = _Shape(legs, centre=(0.028, 0.175))
    shapes["body"] = _Shape([_ellipse(0.0, 0.0, 0.20, 0.12)])

    belly_centre, belly_half = (0.03, 0.055), (0.13, 0.058)
    belly = _ellipse(*belly_centre, *belly_half, angle=_BELLY_ANGLE)
    shapes["belly"] = _Shape([belly], _pattern(attrs["belly"]["pattern"], belly_centre, belly_half, _BELLY_ANGLE), belly_centre)

    wing_centre, wing_half = (-0.045, -0.02), (0.145, 0.058)
    wing = _ellipse(*wing_centre, *wing_half, angle=_WING_ANGLE)
    shapes["wing"] = _Shape([wing], _pattern(attrs["wing"]["pattern"], wing_centre, wing_half, _WING_ANGLE), wing_centre)

    head_centre, r = (0.19, -0.10), 0.072
    marking = attrs["head"]["marking"]
    if marking == "masked":
        head_pattern = [np.array([[0.10, -0.123], [0.27, -0.123], [0.27, -0.094], [0.10, -0.094]])]
    elif marking == "capped":
        head_pattern = [np.array([[0.10, -0.20], [0.28, -0.20], [0.28, -0.118], [0.10, -0.118]])]
    else:
        head_pattern = []
    shapes["head"] = _Shape([_ellipse(*head_centre, r, r, n=32)], head_pattern, head_centre)
    shapes["eye"] = _Shape([_ellipse(0.218, -0.108, 0.013, 0.013, n=12)])

    crest = attrs["crest"]["shape"]
    if crest == "round":
        shapes["crest"] = _Shape([_ellipse(0.17, -0.185, 0.048, 0.03, angle=math.radians(-15))], centre=(0.17, -0.185))
    elif crest == "spiky":
        spikes = [np.array([[x0 - 0.017, -0.16], [tx, ty], [x0 + 0.017, -0.16]])
                  for x0, tx, ty in ((0.14, 0.10, -0.255), (0.175, 0.165, -0.275), (0.21, 0.225, -0.25))]
        shapes["crest"] = _Shape(spikes, centre=(0.165, -0.21))
    else:  # plumed
        plume = np.array([[0.205, -0.165], [0.16, -0.215], [0.09, -0.25], [0.025, -0.255], [0.085, -0.225], [0.14, -0.185], [0.165, -0.16]])
        shapes["crest"] = _Shape([plume], centre=(0.12, -0.215))

    beak = attrs["beak"]["shape"]
    if beak == "short":
        shapes["beak"] = _Shape([np.array([[0.252, -0.118], [0.335, -0.096], [0.252, -0.074]])], centre=(0.285, -0.096))
    elif beak == "long":
        shapes["beak"] = _Shape([np.array([[0.252, -0.111], [0.41, -0.094], [0.252, -0.081]])], centre=(0.32, -0.095))
    else:  # hooked
        hook = np.array([[0.252, -0.12], [0.30, -0.12], [0.335, -0.107], [0.352, -0.08], [0.34, -0.066],
                         [0.324, -0.086], [0.29, -0.079], [0.252, -0.074]])
        shapes["beak"] = _Shape([hook], centre=(0.295, -0.097))
    return shapes


def _pattern(kind: str, centre: tuple[float, float], half: tuple[float, float], angle: float) -> list[np.ndarray]:
    if kind == "striped":
        return _stripes(centre, half, angle, period=0.042, width=0.017)
    if kind == "dotted":
        return _dots(centre, half, angle, period=0.038, radius=0.0115)
    return []


#: Drawing order (later covers earlier) and owner codes in the part-ownership map: part i of PART_NAMES is
#: i + 1, the body outside the parts BODY_LABEL, the eye belongs to the head; 0 is no bird.
_DRAW_ORDER = ("tail", "legs", "body", "belly", "wing", "head", "eye", "crest", "beak")
_OWNER = {name: PART_NAMES.index(name) + 1 for name in PART_NAMES} | {"body": BODY_LABEL, "eye": PART_NAMES.index("head") + 1}


# --------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class RenderedBird:
    """One rendered instance.

    Attributes:
        image: [S, S, 3] uint8 RGB.
        parts: [P, 3] float64 (x, y, visible) per :data:`PART_NAMES`, original pixels; (0, 0, 0) when invisible.
        bbox: (x, y, w, h) of the bird's extent inside the image, original pixels.
        labels: [S, S] uint8 map of the visible pixels: 0 background or an occluder in front of the bird,
            i (1..len(PART_NAMES)) part i of :data:`PART_NAMES` (its parts.txt id), :data:`BODY_LABEL` the
            body outside the parts. Drawn without anti-aliasing, at the polygons the image fills.
    """

    image: np.ndarray
    parts: np.ndarray
    bbox: tuple[float, float, float, float]
    labels: np.ndarray


def instance_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index`` (0-based) of a dataset with ``seed``: independent per image."""
    return np.random.default_rng([int(seed), int(index)])


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, hue_deg: float = 6.0) -> tuple[float, float, float]:
    """A slightly different shade of ``rgb`` (hue ±hue_deg, saturation and value ±12 %)."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    h = (h + rng.uniform(-hue_deg, hue_deg) / 360.0) % 1.0
    s = min(1.0, s * rng.uniform(0.85, 1.1))
    v = min(1.0, v * rng.uniform(0.86, 1.12))
    return tuple(255.0 * c for c in colorsys.hsv_to_rgb(h, s, v))


def _fixed(points: np.ndarray) -> np.ndarray:
    """Continuous (pixel-centre convention) → OpenCV fixed-point (shift 4) int32 vertices."""
    return np.round((np.asarray(points) - 0.5) * 16.0).astype(np.int32)


def _fill(img: np.ndarray, polys: list[np.ndarray], colour: Sequence[float]) -> None:
    cv2.fillPoly(img, [_fixed(p) for p in polys], tuple(float(c) for c in colour), lineType=cv2.LINE_AA, shift=4)


def _fill_patterned(img: np.ndarray, polys: list[np.ndarray], colour: Sequence[float],
                    pattern: list[np.ndarray], ink: Sequence[float]) -> None:
    """Fill ``polys`` with ``colour`` and draw ``pattern`` in ``ink`` clipped to them (anti-aliased)."""
    if not pattern:
        _fill(img, polys, colour)
        return
    allpts = np.vstack(polys)
    h, w = img.shape[:2]
    x0, y0 = max(0, int(math.floor(allpts[:, 0].min())) - 1), max(0, int(math.floor(allpts[:, 1].min())) - 1)
    x1, y1 = min(w, int(math.ceil(allpts[:, 0].max())) + 2), min(h, int(math.ceil(allpts[:, 1].max())) + 2)
    if x1 <= x0 or y1 <= y0:
        return
    offset = np.array([x0, y0], dtype=np.float64)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(mask, [_fixed(p - offset) for p in polys], 255, lineType=cv2.LINE_AA, shift=4)
    layer = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    layer[:] = np.round(colour).astype(np.uint8)
    cv2.fillPoly(layer, [_fixed(p - offset) for p in pattern], tuple(float(c) for c in ink), lineType=cv2.LINE_AA, shift=4)
    roi = img[y0:y1, x0:x1]
    alpha = mask.astype(np.float32)[..., None] / 255.0
    roi[:] = np.round(roi * (1.0 - alpha) + layer * alpha).astype(np.uint8)


def _outline(img: np.ndarray, polys: list[np.ndarray], colour: Sequence[float], thickness: int) -> None:
    dark = tuple(0.55 * float(c) for c in colour)
    cv2.polylines(img, [_fixed(p) for p in polys], True, dark, thickness, lineType=cv2.LINE_AA, shift=4)


def _random_shape(rng: np.random.Generator, size: int, scale: tuple[float, float]) -> tuple[list[np.ndarray], np.ndarray, float, tuple[float, float]]:
    """A clutter shape in image pixels: (polygons, centre, angle, half-extent)."""
    c = rng.uniform(-0.05, 1.05, 2) * size
    angle = float(rng.uniform(0.0, math.pi))
    a = float(rng.uniform(*scale)) * size
    kind = int(rng.integers(0, 5))
    if kind == 0:  # blob
        b = a * float(rng.uniform(0.4, 1.0))
        return [_ellipse(c[0], c[1], a, b, angle)], c, angle, (a, b)
    if kind == 1:  # leaf
        b = a * float(rng.uniform(0.18, 0.35))
        return [_ellipse(c[0], c[1], a, b, angle, n=20)], c, angle, (a, b)
    if kind == 2:  # irregular polygon
        n = int(rng.integers(3, 7))
        t = np.sort(rng.uniform(0.0, 2.0 * math.pi, n))
        r = a * rng.uniform(0.5, 1.0, n)
        return [np.stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)], 1)], c, angle, (a, a)
    if kind == 3:  # branch
        width = float(rng.uniform(0.012, 0.035)) * size
        d = np.array([math.cos(angle), math.sin(angle)]) * a * 1.6
        return [_quad(*(c - d), *(c + d), width)], c, angle, (a * 1.6, width / 2)
    b = a * float(rng.uniform(0.5, 1.0))  # rectangle
    rect = np.array([[-a, -b], [a, -b], [a, b], [-a, b]]) + c
    return [_rotate(rect, tuple(c), angle)], c, angle, (a, b)


def _draw_clutter(img: np.ndarray, rng: np.random.Generator, count: int, scale: tuple[float, float],
                  mask: np.ndarray | None = None) -> None:
    size = img.shape[0]
    for _ in range(count):
        polys, c, angle, half = _random_shape(rng, size, scale)
        colour = _jitter(_ALL_COLOURS[int(rng.integers(len(_ALL_COLOURS)))], rng, 10.0)
        pattern: list[np.ndarray] = []
        if rng.random() < 0.3:
            period = float(rng.uniform(0.03, 0.05)) * size
            if rng.random() < 0.5:
                pattern = _stripes(tuple(c), half, angle, period, period * 0.4)
            else:
                pattern = _dots(tuple(c), half, angle, period, period * 0.3)
        ink = _jitter(NEUTRALS["black" if rng.random() < 0.5 else "white"], rng)
        _fill_patterned(img, polys, colour, pattern, ink)
        if mask is not None:
            cv2.fillPoly(mask, [_fixed(p) for p in polys], 255, lineType=cv2.LINE_8, shift=4)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted base colour with low-frequency texture and clutter in palette colours."""
    colour = np.array(_jitter(_ALL_COLOURS[int(rng.integers(len(_ALL_COLOURS)))], rng, 10.0), np.float32)
    grey = float(rng.uniform(90.0, 170.0))
    keep = float(rng.uniform(0.3, 0.7))
    base = np.float32(keep) * colour + np.float32((1.0 - keep) * grey)
    texture = cv2.resize(rng.standard_normal((6, 6, 3), dtype=np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    img = np.clip(base + texture * np.float32(rng.uniform(8.0, 28.0)), 0, 255).astype(np.uint8)
    _draw_clutter(img, rng, int(rng.integers(6, 15)), (0.03, 0.16))
    return img


def _pose_matrix(unit: float, angle: float, mirror: bool) -> np.ndarray:
    ca, sa = math.cos(angle), math.sin(angle)
    m = -1.0 if mirror else 1.0
    return unit * np.array([[ca * m, -sa], [sa * m, ca]])


def render_bird(bird: BirdClass, size: int, rng: np.random.Generator, object_scale: float = 1.0) -> RenderedBird:
    """Render one random instance of ``bird`` as a ``size`` × ``size`` RGB image with its annotations.

    ``object_scale`` multiplies the bird's size relative to the image (1.0: about 40 % of the side).
    """
    attributes = bird.instance_attributes(rng)
    img = _background(rng, size)
    shapes = _bird_shapes(attributes)

    # pose: scale 0.7-1.3 (× object_scale), rotation ±30°, mirror, position keeping the bird (mostly) in the image
    unit = 0.85 * size * object_scale * float(rng.uniform(0.7, 1.3))
    angle = math.radians(float(rng.uniform(-30.0, 30.0)))
    mirror = bool(rng.random() < 0.5)
    a = _pose_matrix(unit, angle, mirror)
    local = {name: [p @ a.T for p in shape.polys] for name, shape in shapes.items()}
    allpts = np.vstack([p for polys in local.values() for p in polys])
    lo, hi = allpts.min(0), allpts.max(0)
    margin = 0.06 * size
    t = np.empty(2)
    for k in range(2):
        low, high = -margin - lo[k], size + margin - hi[k]
        t[k] = rng.uniform(low, high) if high > low else (low + high) / 2.0
    placed = {name: [p + t for p in polys] for name, polys in local.items()}
    pattern = {name: [p @ a.T + t for p in shape.pattern] for name, shape in shapes.items()}
    centres = {name: np.asarray(shape.centre) @ a.T + t for name, shape in shapes.items()}

    # colours: class colours jittered; body, legs and pattern ink are nuisance
    colours = {part: _jitter(COLOURS[attributes[part]["colour"]], rng) for part in CLASS_PARTS}
    colours["body"] = _jitter(_ALL_COLOURS[int(rng.integers(len(_ALL_COLOURS)))], rng, 10.0)
    colours["legs"] = _jitter(_ALL_COLOURS[int(rng.integers(len(_ALL_COLOURS)))], rng, 10.0)
    colours["eye"] = _jitter(NEUTRALS["black"], rng)
    inks = {part: _jitter(NEUTRALS["black" if rng.random() < 0.5 else "white"], rng) for part in CLASS_PARTS}
    thickness = max(1, int(round(size / 224)))

    # ownership map on a padded canvas: which part owns each pixel, on- or off-image
    pad = size // 2
    owner = np.zeros((size + 2 * pad, size + 2 * pad), np.uint8)
    for name in _DRAW_ORDER:
        polys = placed[name]
        cv2.fillPoly(owner, [_fixed(p + pad) for p in polys], _OWNER[name], lineType=cv2.LINE_8, shift=4)
        if name in pattern and pattern[name]:
            _fill_patterned(img, polys, colours[name], pattern[name], inks[name])
        else:
            _fill(img, polys, colours[name])
        if name != "eye":
            _outline(img, polys, colours[name], thickness)

    # occasional occluders in front of the bird
    occluded = np.zeros((size, size), np.uint8)
    if rng.random() < 0.3:
        _draw_clutter(img, rng, int(rng.integers(1, 3)), (0.04, 0.12), occluded)

    img = _photometric(img, rng)

    inside = owner[pad : pad + size, pad : pad + size]
    seen = np.where(occluded > 0, 0, inside)
    parts, bbox = _keypoints_and_box(owner, inside, seen, centres, size)
    return RenderedBird(img, parts, bbox, seen.astype(np.uint8))


def _keypoints_and_box(
    owner: np.ndarray, inside: np.ndarray, seen: np.ndarray, centres: dict[str, np.ndarray], size: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The part keypoints [P, 3] and the bird's box (x, y, w, h) from the ownership maps (padded, in-image, seen).

    A part counts as visible when enough of it is seen and its centre is in the image. A visible keypoint
    lies on a seen pixel of its own part, as in CUB: its centre where that is so, else the centre of the
    part's seen pixel nearest to it (the legs' centre, for one, lies between the two legs).
    """
    parts = np.zeros((len(PART_NAMES), 3))
    for i, name in enumerate(PART_NAMES):
        code = _OWNER[name]
        total = int(np.count_nonzero(owner == code))
        visible_px = int(np.count_nonzero(seen == code))
        x, y = centres[name]
        if total and visible_px >= MIN_VISIBLE_FRACTION * total and 0.0 <= x < size and 0.0 <= y < size:
            parts[i] = (*_on_part(seen == code, float(x), float(y)), 1.0)
    ys, xs = np.nonzero(inside)
    bbox = (float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min()))
    return parts, bbox


def _on_part(mask: np.ndarray, x: float, y: float) -> tuple[float, float]:
    """(x, y) when it lies on ``mask`` (also as written, to 2 decimals), else the nearest pixel centre on it."""
    h, w = mask.shape

    def on(px: float, py: float) -> bool:
        col, row = math.floor(px), math.floor(py)
        return 0 <= col < w and 0 <= row < h and bool(mask[row, col])

    if on(x, y) and on(round(x, 2), round(y, 2)):
        return x, y
    ys, xs = np.nonzero(mask)
    k = int(np.argmin((xs + 0.5 - x) ** 2 + (ys + 0.5 - y) ** 2))
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting (brightness, white balance, gradient), mild blur and sensor noise."""
    size = img.shape[0]
    out = img.astype(np.float32)
    gains = np.float32(rng.uniform(0.75, 1.2)) * rng.uniform(0.93, 1.07, 3).astype(np.float32)
    phi = float(rng.uniform(0.0, 2.0 * math.pi))
    amp = float(rng.uniform(-0.25, 0.25))
    ramp = (np.arange(size, dtype=np.float32) - size / 2.0) / size
    gradient = 1.0 + amp * (ramp[None, :] * math.cos(phi) + ramp[:, None] * math.sin(phi))
    out *= gradient[..., None]
    out *= gains
    sigma = float(rng.uniform(0.0, 1.0)) * size / 224.0
    if sigma > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    # sensor noise: uniform with standard deviation 1-6 grey levels (cheaper to draw than Gaussian)
    spread = np.float32(rng.uniform(1.0, 6.0) * math.sqrt(12.0))
    noise = rng.random(out.shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= spread
    out += noise
    out += np.float32(0.5)
    return np.clip(out, 0, 255).astype(np.uint8)


