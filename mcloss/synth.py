"""``mcloss synth``: a synthetic fine-grained "bird parts" dataset written in the exact CUB_200_2011 layout.

Every image shows one bird made of seven named parts (head, beak, crest, wing, tail, belly, legs) in a
random pose on a cluttered background. A class is a choice of LOCAL part attributes (a part's colour,
pattern, marking or shape). Classes are a fixed function of the class count and the design only;
``--seed`` only changes the instances. Two designs (``--design``):

- ``single`` (default): class 1 is a base bird and every other class changes one part of it (two parts
  once the single-part changes run out), so one part identifies a class and most pairs of classes differ
  in one or two parts.
- ``combo``: class 1 is the base bird and the others change two parts each (then four, then all six), using
  one alternative per part, so any two classes differ in two or four parts and each changed part is shared
  by several classes: no single part identifies a class, a classifier has to combine parts, as with real
  species.

Global colour content carries no class information by design: the body, legs, pattern ink, background
and clutter colours are random per instance and come from the same palette as the part colours, so a
class shows only in WHICH part has which colour, pattern or shape.

Coordinates (keypoints, boxes) are in original pixels with the pixel-centre convention of
:class:`mcloss.transforms.Geometry`: pixel i covers [i, i+1).
"""

from __future__ import annotations

import argparse
import colorsys
import functools
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .io import default_mode

__all__ = [
    "PART_NAMES",
    "CLASS_PARTS",
    "ATTRIBUTES",
    "BASE_ATTRIBUTES",
    "COLOURS",
    "DESIGNS",
    "BirdClass",
    "RenderedBird",
    "SynthError",
    "class_definitions",
    "max_classes",
    "render_bird",
    "instance_rng",
    "generate_dataset",
    "encode_jpeg",
    "is_synth_output",
    "main",
]

FORMAT_NAME = "mcloss-synth"
FORMAT_VERSION = 1

#: Part names in CUB order (parts/parts.txt ids are 1-based positions in this tuple).
PART_NAMES: tuple[str, ...] = ("head", "beak", "crest", "wing", "tail", "belly", "legs")

#: The parts that carry class attributes (the legs are a plain keypoint).
CLASS_PARTS: tuple[str, ...] = ("head", "beak", "crest", "wing", "tail", "belly")

#: Chromatic palette (RGB) of the class colour attributes.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 135, 25),
    "yellow": (235, 215, 45),
    "green": (55, 165, 60),
    "teal": (25, 165, 165),
    "blue": (40, 80, 215),
    "purple": (130, 55, 190),
    "pink": (235, 105, 185),
}

#: Neutral colours: nuisance only (body, background, clutter, pattern ink).
NEUTRALS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 228),
    "grey": (128, 128, 128),
    "black": (32, 32, 36),
    "brown": (120, 78, 42),
}

_COLOUR_NAMES = tuple(COLOURS)
_ALL_COLOURS = tuple(COLOURS.values()) + tuple(NEUTRALS.values())

#: Per class part: attribute → allowed values.
ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "head": {"colour": _COLOUR_NAMES, "marking": ("plain", "masked", "capped")},
    "beak": {"shape": ("short", "long", "hooked"), "colour": _COLOUR_NAMES},
    "crest": {"shape": ("round", "spiky", "plumed"), "colour": _COLOUR_NAMES},
    "wing": {"colour": _COLOUR_NAMES, "pattern": ("solid", "striped", "dotted")},
    "tail": {"shape": ("fan", "forked", "pointed"), "colour": _COLOUR_NAMES},
    "belly": {"colour": _COLOUR_NAMES, "pattern": ("solid", "striped", "dotted")},
}

#: The base bird (class 1); every other class changes one or two of its parts.
BASE_ATTRIBUTES: dict[str, dict[str, str]] = {
    "head": {"colour": "blue", "marking": "plain"},
    "beak": {"shape": "short", "colour": "orange"},
    "crest": {"shape": "round", "colour": "red"},
    "wing": {"colour": "green", "pattern": "solid"},
    "tail": {"shape": "fan", "colour": "purple"},
    "belly": {"colour": "yellow", "pattern": "solid"},
}

#: Seed of the class design; a constant so that classes never depend on ``--seed``.
_CLASS_DESIGN_SEED = 20200204

#: A part counts as visible when its centre is in the image and this share of its area is unoccluded.
MIN_VISIBLE_FRACTION = 0.25

_JPEG_QUALITY = 90


class SynthError(ValueError):
    """Invalid synth arguments or output directory; the message says what and why."""


# ------------------------------------------------------------------------------------------ class design


@dataclass(frozen=True)
class BirdClass:
    """One class: its name and the attributes of every class part.

    Attributes:
        name: readable, filesystem-safe class name (e.g. ``Striped_Wing``).
        attributes: part → attribute → value, for every part in :data:`CLASS_PARTS`.
        changed: the parts that differ from the base bird.
    """

    name: str
    attributes: dict[str, dict[str, str]] = field(hash=False)
    changed: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-friendly form (stored in synth.json)."""
        return {"name": self.name, "changed": list(self.changed), "attributes": self.attributes}


def _part_alternatives(rng: np.random.Generator) -> dict[str, list[dict[str, str]]]:
    """Every non-base attribute combination of each part; single-attribute changes first, then random."""
    out: dict[str, list[dict[str, str]]] = {}
    for part in CLASS_PARTS:
        names = list(ATTRIBUTES[part])
        combos = []
        for values in itertools.product(*(ATTRIBUTES[part][n] for n in names)):
            combo = dict(zip(names, values, strict=True))
            changed = sum(combo[n] != BASE_ATTRIBUTES[part][n] for n in names)
            if changed:
                combos.append((changed, float(rng.random()), combo))
        combos.sort(key=lambda item: (item[0], item[1]))
        out[part] = [combo for _, _, combo in combos]
    return out


def _change_name(part: str, combo: dict[str, str]) -> str:
    words = [value.capitalize() for name, value in combo.items() if value != BASE_ATTRIBUTES[part][name]]
    return "_".join([*words, part.capitalize()])


def _design() -> list[tuple[tuple[str, dict[str, str]], ...]]:
    """All classes in order, as tuples of (part, new attributes) changes from the base."""
    rng = np.random.default_rng(_CLASS_DESIGN_SEED)
    alts = _part_alternatives(rng)
    order = [CLASS_PARTS[i] for i in rng.permutation(len(CLASS_PARTS))]
    singles: list[tuple[tuple[str, dict[str, str]], ...]] = []
    for rank in range(max(len(v) for v in alts.values())):
        singles += [((part, alts[part][rank]),) for part in order if rank < len(alts[part])]
    pairs = [
        ((p, a), (q, b))
        for p, q in itertools.combinations(CLASS_PARTS, 2)
        for a in alts[p]
        for b in alts[q]
    ]
    doubles = [pairs[i] for i in rng.permutation(len(pairs))]
    return [(), *singles, *doubles]


def _combo_design() -> list[tuple[tuple[str, dict[str, str]], ...]]:
    """Classes as combinations of changed parts: the even-weight words of {0,1}^6, base first, then by weight.

    A 1 switches a part to its first single-attribute alternative. Even weight makes any two classes
    differ in at least two parts. Within a weight, each next word is the one whose parts have been changed
    least so far (ties in a fixed random order), so every prefix spreads the changes evenly over the parts.
    """
    rng = np.random.default_rng(_CLASS_DESIGN_SEED + 1)
    alts = _part_alternatives(np.random.default_rng(_CLASS_DESIGN_SEED))
    uses = [0] * len(CLASS_PARTS)
    words: list[tuple[int, ...]] = []
    for weight in range(2, len(CLASS_PARTS) + 1, 2):
        same = [w for w in itertools.product((0, 1), repeat=len(CLASS_PARTS)) if sum(w) == weight]
        left = [same[i] for i in rng.permutation(len(same))]
        while left:
            word = min(left, key=lambda w: sum(u for u, bit in zip(uses, w, strict=True) if bit))
            left.remove(word)
            words.append(word)
            uses = [u + bit for u, bit in zip(uses, word, strict=True)]
    return [(), *(tuple((part, alts[part][0]) for part, bit in zip(CLASS_PARTS, w, strict=True) if bit) for w in words)]


#: Class designs: name → every class in order, as tuples of (part, new attributes) changes from the base.
DESIGNS = ("single", "combo")
_DESIGN_CACHE: dict[str, list[tuple[tuple[str, dict[str, str]], ...]]] = {}


def _designed(design: str) -> list[tuple[tuple[str, dict[str, str]], ...]]:
    if design not in DESIGNS:
        raise SynthError(f"--design must be one of {', '.join(DESIGNS)}, got {design!r}")
    if design not in _DESIGN_CACHE:
        _DESIGN_CACHE[design] = _design() if design == "single" else _combo_design()
    return _DESIGN_CACHE[design]


def max_classes(design: str = "single") -> int:
    """How many distinct classes the design can produce."""
    return len(_designed(design))


def class_definitions(num_classes: int, design: str = "single") -> list[BirdClass]:
    """The first ``num_classes`` classes of a fixed design (depends on the count and design, never a seed).

    The classes for N are a prefix of those for N + 1. Class 1 is the base bird in both designs. In
    ``single``, classes 2..139 change one part and later ones two; in ``combo`` (at most 32 classes)
    classes 2..16 change two parts, later ones four and six, and any two classes differ in at least two.
    """
    total = max_classes(design)
    if not 2 <= num_classes <= total:
        raise SynthError(f"--classes must be between 2 and {total} for --design {design}, got {num_classes}")
    classes = []
    for changes in _designed(design)[:num_classes]:
        attributes = {part: dict(values) for part, values in BASE_ATTRIBUTES.items()}
        for part, combo in changes:
            attributes[part] = dict(combo)
        name = "_".join(_change_name(part, combo) for part, combo in changes) or "Common_Bird"
        classes.append(BirdClass(name, attributes, tuple(part for part, _ in changes)))
    return classes


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


#: Drawing order (later covers earlier) and owner codes in the part-ownership map.
_DRAW_ORDER = ("tail", "legs", "body", "belly", "wing", "head", "eye", "crest", "beak")
_OWNER = {name: PART_NAMES.index(name) + 1 for name in PART_NAMES} | {"body": 100, "eye": PART_NAMES.index("head") + 1}


# --------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class RenderedBird:
    """One rendered instance.

    Attributes:
        image: [S, S, 3] uint8 RGB.
        parts: [P, 3] float64 (x, y, visible) per :data:`PART_NAMES`, original pixels; (0, 0, 0) when invisible.
        bbox: (x, y, w, h) of the bird's extent inside the image, original pixels.
    """

    image: np.ndarray
    parts: np.ndarray
    bbox: tuple[float, float, float, float]


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
    img = _background(rng, size)
    shapes = _bird_shapes(bird.attributes)

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
    colours = {part: _jitter(COLOURS[bird.attributes[part]["colour"]], rng) for part in CLASS_PARTS}
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
    parts = np.zeros((len(PART_NAMES), 3))
    for i, name in enumerate(PART_NAMES):
        code = _OWNER[name]
        total = int(np.count_nonzero(owner == code))
        visible_px = int(np.count_nonzero(seen == code))
        x, y = centres[name]
        if total and visible_px >= MIN_VISIBLE_FRACTION * total and 0.0 <= x < size and 0.0 <= y < size:
            parts[i] = (x, y, 1.0)
    ys, xs = np.nonzero(inside)
    bbox = (float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min()))
    return RenderedBird(img, parts, bbox)


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


# ------------------------------------------------------------------------------------------------ writing


def encode_jpeg(rgb: np.ndarray, quality: int = _JPEG_QUALITY) -> bytes:
    """Encode an RGB uint8 image as JPEG bytes (deterministic: fixed quality, no metadata)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _render_job(job: tuple[int, int, int, dict, str, str, int, float]) -> tuple[list[float], list[list[float]]]:
    """Worker: render image ``index`` and write it; returns (bbox, parts)."""
    index, seed, size, attrs, name, path, quality, object_scale = job
    bird = BirdClass(name, attrs)
    rendered = render_bird(bird, size, instance_rng(seed, index), object_scale)
    Path(path).write_bytes(encode_jpeg(rendered.image, quality))
    return list(rendered.bbox), rendered.parts.tolist()


def is_synth_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a previous ``mcloss synth`` output (its synth.json says so)."""
    try:
        meta = json.loads((Path(path) / "synth.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def _check_out(out: Path) -> None:
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SynthError(f"--out {out}: {ancestor} is not a directory")
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_synth_output(out):
        raise SynthError(
            f"--out {out}: directory is not empty and is not a previous 'mcloss synth' output "
            "(no synth.json); choose a new or empty directory"
        )


def _split_counts(per_class: int, test_fraction: float) -> tuple[int, int]:
    n_test = int(math.floor(per_class * test_fraction + 0.5))
    if 0.0 < test_fraction < 1.0:
        if per_class < 2:
            raise SynthError(f"--per-class {per_class} cannot be split into train and test; use at least 2")
        n_test = min(max(n_test, 1), per_class - 1)
    return per_class - n_test, n_test


def _fmt(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") if v != int(v) else f"{v:.1f}"


def generate_dataset(
    out: str | os.PathLike,
    classes: int,
    per_class: int,
    size: int,
    seed: int,
    *,
    test_fraction: float = 0.5,
    jpeg_quality: int = _JPEG_QUALITY,
    workers: int = 1,
    object_scale: float = 1.0,
    design: str = "single",
) -> dict:
    """Write a synthetic CUB-layout dataset to ``out``; returns a summary (counts, time, images/s).

    The dataset is written to a temporary sibling directory and moved into place at the end, so ``out``
    is never left half-written. Every file depends only on the arguments (not on ``out`` or ``workers``),
    so the same call writes byte-identical files. ``out`` may be missing, empty, or a previous synth output (replaced).

    Raises:
        SynthError: invalid counts/size/seed or an unusable output directory.
    """
    for label, value, low in (("--classes", classes, 2), ("--per-class", per_class, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise SynthError(f"{label} must be an integer >= {low}, got {value!r}")
    if not isinstance(size, (int, np.integer)) or not 32 <= size <= 4096:
        raise SynthError(f"--size must be an integer between 32 and 4096 pixels, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SynthError(f"--seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= float(test_fraction) <= 1.0:
        raise SynthError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise SynthError(f"--jpeg-quality must be between 1 and 100, got {jpeg_quality}")
    if int(workers) < 1:
        raise SynthError(f"--workers must be >= 1, got {workers}")
    if not 0.25 <= float(object_scale) <= 2.5:
        raise SynthError(f"--object-scale must be between 0.25 and 2.5, got {object_scale}")
    birds = class_definitions(int(classes), design)
    n_train, n_test = _split_counts(int(per_class), float(test_fraction))
    out = Path(out)
    _check_out(out)

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes 0700
    try:
        jobs, lines = [], {"images": [], "labels": [], "split": []}
        for c, bird in enumerate(birds):
            folder = f"{c + 1:03d}.{bird.name}"
            (tmp / "images" / folder).mkdir(parents=True)
            for k in range(per_class):
                index = c * per_class + k
                rel = f"{folder}/{bird.name}_{index + 1:05d}.jpg"
                jobs.append((index, int(seed), int(size), bird.attributes, bird.name, str(tmp / "images" / rel), int(jpeg_quality), float(object_scale)))
                lines["images"].append(f"{index + 1} {rel}")
                lines["labels"].append(f"{index + 1} {c + 1}")
                lines["split"].append(f"{index + 1} {1 if k < n_train else 0}")
        if workers > 1 and len(jobs) > 1:
            # threads, not forked processes: forking a process that already runs torch/OpenMP threads can
            # deadlock; OpenCV drawing and JPEG encoding release the GIL
            with ThreadPoolExecutor(int(workers)) as pool:
                results = list(pool.map(_render_job, jobs, chunksize=16))
        else:
            results = [_render_job(job) for job in jobs]

        boxes = [f"{i + 1} " + " ".join(_fmt(v) for v in bbox) for i, (bbox, _) in enumerate(results)]
        locs = [
            f"{i + 1} {p + 1} {x:.2f} {y:.2f} {int(v)}"
            for i, (_, parts) in enumerate(results)
            for p, (x, y, v) in enumerate(parts)
        ]
        texts = {
            "images.txt": lines["images"],
            "classes.txt": [f"{c + 1} {c + 1:03d}.{bird.name}" for c, bird in enumerate(birds)],
            "image_class_labels.txt": lines["labels"],
            "train_test_split.txt": lines["split"],
            "bounding_boxes.txt": boxes,
            "parts/parts.txt": [f"{p + 1} {name}" for p, name in enumerate(PART_NAMES)],
            "parts/part_locs.txt": locs,
        }
        (tmp / "parts").mkdir()
        for rel, rows in texts.items():
            (tmp / rel).write_text("\n".join(rows) + "\n", encoding="utf-8")
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "classes": int(classes),
            "per_class": int(per_class),
            "size": int(size),
            "seed": int(seed),
            "test_fraction": float(test_fraction),
            "jpeg_quality": int(jpeg_quality),
            "object_scale": float(object_scale),
            "design": design,
            "command": f"mcloss synth --out DIR --classes {classes} --per-class {per_class} --size {size} "
            f"--seed {seed} --test-fraction {float(test_fraction)} --jpeg-quality {jpeg_quality}"
            + (f" --object-scale {float(object_scale)}" if float(object_scale) != 1.0 else "")
            + (f" --design {design}" if design != "single" else ""),
            "split": {"train_per_class": n_train, "test_per_class": n_test},
            "parts": list(PART_NAMES),
            "class_parts": list(CLASS_PARTS),
            "attributes": {part: {k: list(v) for k, v in attrs.items()} for part, attrs in ATTRIBUTES.items()},
            "base": BASE_ATTRIBUTES,
            "class_definitions": [{"id": c + 1, **bird.to_dict()} for c, bird in enumerate(birds)],
            "min_visible_fraction": MIN_VISIBLE_FRACTION,
            "coordinates": "original pixels, pixel i covers [i, i+1); invisible parts are 0 0 0 as in CUB",
        }
        (tmp / "synth.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    images = len(jobs)
    return {
        "out": str(out),
        "classes": int(classes),
        "per_class": int(per_class),
        "size": int(size),
        "seed": int(seed),
        "images": images,
        "train": n_train * int(classes),
        "test": n_test * int(classes),
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 1) if seconds > 0 else float("inf"),
    }


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an empty or previous-output ``dst``."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{dst.name}.old-", dir=dst.parent))
        old.rmdir()
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# -------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcloss synth",
        description="Write a synthetic fine-grained bird-parts dataset in CUB_200_2011 layout. "
        "Classes depend on --classes only; --seed draws new instances of the same classes.",
    )
    p.add_argument("--out", required=True, help="output directory (new, empty, or a previous synth output)")
    p.add_argument("--classes", type=int, required=True, help="number of classes N (>= 2)")
    p.add_argument("--per-class", type=int, required=True, help="images per class M")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--seed", type=int, default=0, help="instance seed (default 0)")
    p.add_argument("--test-fraction", type=float, default=0.5, help="share of each class in the test split (default 0.5)")
    p.add_argument("--jpeg-quality", type=int, default=_JPEG_QUALITY, help=f"JPEG quality (default {_JPEG_QUALITY})")
    p.add_argument("--workers", type=int, default=1, help="rendering threads (default 1; output is identical)")
    p.add_argument("--object-scale", type=float, default=1.0, help="bird size relative to the image (default 1.0)")
    p.add_argument(
        "--design", choices=DESIGNS, default="single",
        help="single: each class changes one part of a base bird (default); combo: each class is a combination "
        "of part states, any two differ in >= 2 parts",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mcloss synth``; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(args_list)
    except SystemExit as exc:  # argparse already printed the reason
        return int(exc.code or 0)
    try:
        summary = generate_dataset(
            args.out, args.classes, args.per_class, args.size, args.seed,
            test_fraction=args.test_fraction, jpeg_quality=args.jpeg_quality, workers=args.workers,
            object_scale=args.object_scale, design=args.design,
        )
    except (SynthError, OSError) as exc:
        print(f"mcloss synth: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {summary['images']} images ({summary['train']} train / {summary['test']} test) of "
        f"{summary['classes']} classes at {summary['size']} px to {summary['out']} in {summary['seconds']:.1f} s "
        f"({summary['images_per_second']:.0f} images/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
