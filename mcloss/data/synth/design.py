"""The class design of ``mcloss synth``: parts, attributes, the base bird, and which parts each class changes.

A class is a choice of LOCAL part attributes (a part's colour, pattern, marking or shape); its *defining
parts* are the parts it changes from the base bird. Classes are a fixed function of the class count and
the design only (``--seed`` only changes the instances). Two designs (``--design``):

- ``single`` (default): class 1 is a base bird and every other class changes one part of it (two parts
  once the single-part changes run out), so one part identifies a class and most pairs of classes differ
  in one or two parts.
- ``combo``: class 1 is the base bird and the others change two parts each (then four, then all six), using
  one alternative per part, so any two classes differ in two or four parts and each changed part is shared
  by several classes: no single part identifies a class, a classifier has to combine parts, as with real
  species.
- ``varied``: the classes of ``combo``, but every part a class does not change varies from instance to
  instance: the attribute that some class changes at that part (the head's colour, the wing's pattern, the
  tail's shape, ...) takes any of its other values, the base one included. So a class's defining parts are
  the only parts that carry information about it: in ``combo`` the unchanged base parts are evidence too
  (a base head rules out every class that changes the head), and a model may rightly look there.

Global colour content carries no class information by design: the body, legs, pattern ink, background
and clutter colours are random per instance and come from the same palette as the part colours, so a
class shows only in WHICH part has which colour, pattern or shape.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mcloss.core.errors import MclossError

__all__ = ["ATTRIBUTES", "BASE_ATTRIBUTES", "BODY_LABEL", "CLASS_PARTS", "COLOURS", "DESIGNS", "NEUTRALS", "PART_NAMES", "BirdClass", "SynthError", "class_definitions", "max_classes"]

FORMAT_NAME = "mcloss-synth"
#: 1: images and keypoints; 2: also segmentations/ and part_masks/ (version-1 datasets remain readable).
FORMAT_VERSION = 2

#: Part names in CUB order (parts/parts.txt ids are 1-based positions in this tuple).
PART_NAMES: tuple[str, ...] = ("head", "beak", "crest", "wing", "tail", "belly", "legs")

#: Label of the bird's body outside every part in a part mask (parts are 1..len(PART_NAMES), 0 is background).
BODY_LABEL: int = len(PART_NAMES) + 1

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

JPEG_QUALITY = 90


class SynthError(MclossError, ValueError):
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
    varies: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict, hash=False)

    def instance_attributes(self, rng: np.random.Generator) -> dict[str, dict[str, str]]:
        """The attributes of one instance: the class's, each varying attribute drawn uniformly from its values.

        Draws nothing from ``rng`` when nothing varies, so designs without variation keep their instances.
        """
        if not self.varies:
            return self.attributes
        out = {part: dict(values) for part, values in self.attributes.items()}
        for part in CLASS_PARTS:
            for name, values in self.varies.get(part, {}).items():
                out[part][name] = values[int(rng.integers(len(values)))]
        return out

    def to_dict(self) -> dict:
        """JSON-friendly form (stored in synth.json)."""
        out = {"name": self.name, "changed": list(self.changed), "attributes": self.attributes}
        if self.varies:
            out["varies"] = {part: {k: list(v) for k, v in attrs.items()} for part, attrs in self.varies.items()}
        return out


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
DESIGNS = ("single", "combo", "varied")
_DESIGN_CACHE: dict[str, list[tuple[tuple[str, dict[str, str]], ...]]] = {}


def _designed(design: str) -> list[tuple[tuple[str, dict[str, str]], ...]]:
    if design not in DESIGNS:
        raise SynthError(f"design must be one of {', '.join(DESIGNS)}, got {design!r}", parameter="design")
    if design not in _DESIGN_CACHE:
        _DESIGN_CACHE[design] = _design() if design == "single" else _combo_design()  # varied: combo's classes
    return _DESIGN_CACHE[design]


def max_classes(design: str = "single") -> int:
    """How many distinct classes the design can produce."""
    return len(_designed(design))


def class_definitions(num_classes: int, design: str = "single") -> list[BirdClass]:
    """The first ``num_classes`` classes of a fixed design (depends on the count and design, never a seed).

    The classes for N are a prefix of those for N + 1. Class 1 is the base bird in both designs. In
    ``single``, classes 2..139 change one part and later ones two; in ``combo`` and ``varied`` (at most 32 classes)
    classes 2..16 change two parts, later ones four and six, and any two classes differ in at least two.
    """
    total = max_classes(design)
    if not 2 <= num_classes <= total:
        raise SynthError(
            f"classes must be between 2 and {total} for design {design}, got {num_classes}", parameter=("classes", "design")
        )
    classes = []
    for changes in _designed(design)[:num_classes]:
        attributes = {part: dict(values) for part, values in BASE_ATTRIBUTES.items()}
        for part, combo in changes:
            attributes[part] = dict(combo)
        name = "_".join(_change_name(part, combo) for part, combo in changes) or "Common_Bird"
        changed = tuple(part for part, _ in changes)
        varies = _unchanged_variation(changed) if design == "varied" else {}
        classes.append(BirdClass(name, attributes, changed, varies))
    return classes


def _unchanged_variation(changed: Sequence[str]) -> dict[str, dict[str, tuple[str, ...]]]:
    """``varied``: per unchanged part, the attribute the design's change there alters, with its other values."""
    alts = _part_alternatives(np.random.default_rng(_CLASS_DESIGN_SEED))
    out = {}
    for part in CLASS_PARTS:
        if part in changed:
            continue
        change = alts[part][0]
        (name,) = [n for n, v in change.items() if v != BASE_ATTRIBUTES[part][n]]
        out[part] = {name: tuple(v for v in ATTRIBUTES[part][name] if v != change[name])}
    return out


