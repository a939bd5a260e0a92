"""Ground truth for "which parts define a class": a class's *defining parts* or regions, per dataset.

- ``mcloss synth`` data: the parts a class changes from the base bird (``synth.json``,
  ``class_definitions[].changed``); the base bird has none. All of them, in the design's order.
- Real CUB_200_2011: derived from the class-level attribute annotations. Each local attribute group
  (``has_wing_color``, ``has_bill_shape``, ...) belongs to one *region* (:data:`ATTRIBUTE_REGIONS`),
  and each region covers CUB parts (:data:`REGION_PARTS`; the regions partition CUB's 15 parts). With
  p(c, a) the percentage of class c's images annotated with attribute a
  (``attributes/class_attribute_labels_continuous.txt``) and m(a) its mean over the classes::

      score(c, r) = mean over the attributes a of region r of |p(c, a) - m(a)|   (percentage points)

  A class's defining regions are the ``top`` regions with the highest score, best first, ties broken by
  region name (scores are compared rounded to 1e-9). Global groups (size, shape, primary colour) belong to
  no region and are ignored, as are attribute groups this module does not know. The score is a plain mean,
  so a region of few-valued groups (patterns, 4 values) tends to score higher per attribute than one of
  15-colour groups; the rule favours simplicity over calibration.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mcloss.core.errors import DatasetError, ParameterError
from mcloss.data.cub import find_cub_root, read_class_names
from mcloss.data.synth.design import FORMAT_NAME
from mcloss.data.synth.writing import read_synth_meta

__all__ = [
    "ATTRIBUTE_REGIONS",
    "GLOBAL_ATTRIBUTE_GROUPS",
    "REGION_PARTS",
    "cub_defining_parts",
    "defining_indices",
    "defining_parts",
    "region_part_indices",
    "synth_defining_parts",
]

#: CUB attribute group (the attribute name before ``::``) → the region it describes. The 25 local groups of
#: CUB's 28; upperparts colour counts as the back, underparts colour as breast and belly (``underparts``),
#: and crown, forehead, nape, throat and the head pattern as the ``head``.
ATTRIBUTE_REGIONS: dict[str, str] = {
    "has_bill_shape": "beak",
    "has_bill_length": "beak",
    "has_bill_color": "beak",
    "has_eye_color": "eye",
    "has_head_pattern": "head",
    "has_crown_color": "head",
    "has_forehead_color": "head",
    "has_nape_color": "head",
    "has_throat_color": "head",
    "has_back_color": "back",
    "has_back_pattern": "back",
    "has_upperparts_color": "back",
    "has_wing_color": "wing",
    "has_wing_shape": "wing",
    "has_wing_pattern": "wing",
    "has_tail_shape": "tail",
    "has_tail_pattern": "tail",
    "has_upper_tail_color": "tail",
    "has_under_tail_color": "tail",
    "has_breast_color": "underparts",
    "has_breast_pattern": "underparts",
    "has_belly_color": "underparts",
    "has_belly_pattern": "underparts",
    "has_underparts_color": "underparts",
    "has_leg_color": "legs",
}

#: CUB attribute groups that describe the whole bird: no region, ignored.
GLOBAL_ATTRIBUTE_GROUPS: tuple[str, ...] = ("has_size", "has_shape", "has_primary_color")

#: Region → the CUB parts.txt names it covers; every CUB part is in exactly one region.
REGION_PARTS: dict[str, tuple[str, ...]] = {
    "beak": ("beak",),
    "eye": ("left eye", "right eye"),
    "head": ("crown", "forehead", "nape", "throat"),
    "back": ("back",),
    "wing": ("left wing", "right wing"),
    "tail": ("tail",),
    "underparts": ("breast", "belly"),
    "legs": ("left leg", "right leg"),
}

_CONTINUOUS = "class_attribute_labels_continuous.txt"


def _dataset_root(root: str | os.PathLike) -> Path:
    """``root`` or its CUB_200_2011 sub-folder, whichever is a CUB-layout dataset (else ``root``)."""
    return find_cub_root(root) or Path(root)


def synth_defining_parts(root: str | os.PathLike) -> dict[str, list[str]] | None:
    """Class name → the parts it changes from the base bird, from ``synth.json``; None if not synth data.

    Raises:
        DatasetError: synth.json is a synth dataset's but its class definitions are malformed.
    """
    base = _dataset_root(root)
    meta = read_synth_meta(base)
    if meta is None or meta.get("format") != FORMAT_NAME:
        return None
    path = base / "synth.json"
    definitions = meta.get("class_definitions")
    if not isinstance(definitions, list):
        raise DatasetError(f"{path}: 'class_definitions' must be a list")
    out: dict[str, list[str]] = {}
    for number, item in enumerate(definitions, 1):
        name = item.get("name") if isinstance(item, dict) else None
        changed = item.get("changed") if isinstance(item, dict) else None
        if not isinstance(name, str) or not isinstance(changed, list) or not all(isinstance(p, str) for p in changed):
            raise DatasetError(f"{path}: class definition {number} needs a 'name' and a 'changed' list of part names")
        out[name] = list(changed)
    return out


def _attribute_names(base: Path) -> tuple[Path, list[str]] | None:
    """(file, names in id order) of the first attributes.txt found, or None."""
    for path in (base / "attributes" / "attributes.txt", base.parent / "attributes.txt"):
        if path.is_file():
            break
    else:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    rows: dict[int, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        if len(fields) != 2 or not fields[0].isdigit():
            raise DatasetError(f"{path} line {number}: expected 'attribute_id attribute_name', got {line.strip()!r}")
        rows[int(fields[0])] = fields[1].strip()
    if sorted(rows) != list(range(1, len(rows) + 1)):
        raise DatasetError(f"{path}: attribute ids must be 1..{len(rows)}, each once")
    return path, [rows[i] for i in range(1, len(rows) + 1)]


def _class_percentages(path: Path, columns: int, rows: int) -> np.ndarray:
    """The [rows, columns] table of class_attribute_labels_continuous.txt, checked."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    if len(lines) != rows:
        raise DatasetError(f"{path}: {len(lines)} rows, expected one per class ({rows} in classes.txt)")
    table = np.empty((rows, columns), np.float64)
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if len(fields) != columns:
            raise DatasetError(f"{path} row {number}: {len(fields)} values, expected one per attribute ({columns})")
        for j, value in enumerate(fields):
            try:
                table[number - 1, j] = float(value)
            except ValueError:
                raise DatasetError(f"{path} row {number}: value {j + 1} is not a number ({value!r})") from None
            if not math.isfinite(table[number - 1, j]):
                raise DatasetError(f"{path} row {number}: value {j + 1} is not finite ({value!r})")
    return table


def cub_defining_parts(root: str | os.PathLike, top: int = 2) -> dict[str, list[str]] | None:
    """Class name → its ``top`` defining regions (best first) from CUB's class attribute percentages.

    See the module docstring for the rule. ``attributes.txt`` is read from ``<root>/attributes/`` or
    beside the dataset root; the percentages from ``<root>/attributes/class_attribute_labels_continuous.txt``.
    None when either file is absent (or ``root`` is not a CUB-layout dataset).

    Raises:
        ParameterError: ``top`` < 1.
        DatasetError: an attribute file is malformed (the message names it).
    """
    if int(top) < 1:
        raise ParameterError(f"top must be >= 1, got {top}", parameter="top")
    base = find_cub_root(root)
    if base is None:
        return None
    table_path = base / "attributes" / _CONTINUOUS
    names = _attribute_names(base)
    if not table_path.is_file() or names is None:
        return None
    classes = read_class_names(base)
    percent = _class_percentages(table_path, len(names[1]), len(classes))
    groups = [name.split("::", 1)[0].strip() for name in names[1]]
    deviation = np.abs(percent - percent.mean(axis=0, keepdims=True))
    regions = sorted({ATTRIBUTE_REGIONS[g] for g in groups if g in ATTRIBUTE_REGIONS})
    if not regions:
        return {name: [] for name in classes}
    scores = np.stack(
        [deviation[:, [j for j, g in enumerate(groups) if ATTRIBUTE_REGIONS.get(g) == r]].mean(axis=1) for r in regions],
        axis=1,
    ).round(9)
    out: dict[str, list[str]] = {}
    for row, name in enumerate(classes):
        ranked = sorted(range(len(regions)), key=lambda k, row=row: (-scores[row, k], regions[k]))
        out[name] = [regions[k] for k in ranked[: int(top)]]
    return out


def defining_parts(root: str | os.PathLike, top: int = 2) -> dict[str, list[str]] | None:
    """Class name → defining parts (synth data) or regions (CUB attributes); None when neither is known.

    ``top`` applies to CUB only; synth classes list every part they change.
    """
    synth = synth_defining_parts(root)
    return synth if synth is not None else cub_defining_parts(root, top)


def region_part_indices(region: str, part_names: list[str] | tuple[str, ...]) -> list[int]:
    """0-based indices into ``part_names`` that a region covers, ascending; [] for an unknown region.

    A region that is itself a part name (every synth part, CUB's beak, back and tail) is that part;
    otherwise :data:`REGION_PARTS` says which parts it covers.
    """
    index = {name.strip().lower(): i for i, name in enumerate(part_names)}
    key = region.strip().lower()
    if key in index:
        return [index[key]]
    return sorted(index[p] for p in REGION_PARTS.get(key, ()) if p in index)


def defining_indices(regions: Sequence[str], part_names: Sequence[str]) -> list[int]:
    """0-based indices into ``part_names`` that any of the defining parts (or regions) covers, ascending."""
    return sorted({i for region in regions for i in region_part_indices(region, list(part_names))})
