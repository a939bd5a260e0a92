"""Target specs: which classes to explain for each image.

Per image: ``"pred"`` (FC-head argmax), ``"pred_mc"`` (MC-head argmax), ``"topK"`` (e.g. ``"top3"``: the K
most probable FC-head classes, best first), ``"label"`` (needs labels), a 0-based class index, a class
name, or a list of those (several targets for one image). A single spec applies to every image; a list
must hold one spec per image. This module is the one parser of that vocabulary (the CLI's ``--target``
included).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mcloss.core.errors import ParameterError

if TYPE_CHECKING:
    from mcloss.core.model import MCModel

__all__ = ["TargetSpec", "check_target", "per_image", "resolve_targets", "spec_error"]

TargetSpec = int | str | Sequence[int | str]
_TOPK = re.compile(r"^top(\d+)$", re.IGNORECASE)
_KEYWORDS = ("pred", "pred_mc", "label")


def _parse(model: MCModel, spec: int | str) -> tuple[str, int]:
    """One spec → (kind, value): ("pred"|"pred_mc"|"label", 0), ("top", K) or ("class", index).

    Raises:
        UnknownClassError, OutOfRangeError: an unknown class name or an out-of-range index.
        ParameterError: ``topK`` with K outside [1, classes].
    """
    if isinstance(spec, (int, np.integer)):
        return "class", model.class_index(int(spec), "target")
    s = str(spec).strip()
    if s.lower() in _KEYWORDS:
        return s.lower(), 0
    m = _TOPK.match(s)
    if m:
        k = int(m.group(1))
        if not 1 <= k <= model.num_classes:
            raise ParameterError(f"target {s!r}: k must be in [1, {model.num_classes}]", parameter="target")
        return "top", k
    return "class", model.class_index(s, "target")


def check_target(model: MCModel, spec: int | str) -> int | str:
    """Validate one spec before any work: a keyword or ``topK`` comes back lower-case, a class name or
    index as its 0-based index (errors as :func:`resolve_targets` raises them)."""
    kind, value = _parse(model, spec)
    if kind == "class":
        return value
    return f"top{value}" if kind == "top" else kind


def _one_target(model: MCModel, spec: int | str, probs: np.ndarray, probs_mc: np.ndarray, label: int | None) -> list[int]:
    kind, value = _parse(model, spec)
    if kind == "pred":
        return [int(np.argmax(probs))]
    if kind == "pred_mc":
        return [int(np.argmax(probs_mc))]
    if kind == "label":
        if label is None:
            raise ParameterError("target 'label' needs a label for every image", parameter="target")
        return [model.class_index(int(label))]
    if kind == "top":
        return [int(i) for i in np.argsort(-probs, kind="stable")[:value]]
    return [value]


def resolve_targets(
    model: MCModel,
    spec: TargetSpec | Sequence[TargetSpec],
    probs_fc: np.ndarray,
    probs_mc: np.ndarray,
    labels: Sequence[int | None] | None = None,
) -> list[list[int]]:
    """Turn a target spec into a list of 0-based class indices per image (see the module docstring)."""
    batch = probs_fc.shape[0]
    labels = list(labels) if labels is not None else [None] * batch
    if len(labels) != batch:
        raise ParameterError(f"labels: {len(labels)} labels for {batch} images", parameter="labels")
    out = []
    for b, item in enumerate(per_image(spec, batch)):
        items = [item] if isinstance(item, (str, int, np.integer)) else list(item) if isinstance(item, (list, tuple)) else None
        if items is None or not all(isinstance(one, (str, int, np.integer)) for one in items):
            raise spec_error(item)
        resolved: list[int] = []
        for one in items:
            for t in _one_target(model, one, probs_fc[b], probs_mc[b], labels[b]):
                if t not in resolved:
                    resolved.append(t)
        if not resolved:
            raise ParameterError(f"target: no target for image {b}", parameter="target")
        out.append(resolved)
    return out


def spec_error(value: object) -> ParameterError:
    """The error of a target that is not a spec (a class index or name, ``pred``, ``topK``, …) or a list of them."""
    return ParameterError(
        f"target must be a class index or name, a spec such as 'pred' or 'top3', or a list of them; got {value!r}",
        parameter="target",
    )


def per_image(targets: TargetSpec | Sequence[TargetSpec], batch: int) -> list:
    """One target spec per image: a single spec is repeated, a list must have one entry per image."""
    if isinstance(targets, (str, int, np.integer)):
        return [targets] * batch
    if not isinstance(targets, (list, tuple)):
        raise spec_error(targets)
    targets = list(targets)
    if len(targets) != batch:
        raise ParameterError(f"targets: {len(targets)} per-image targets for {batch} images", parameter="targets")
    return targets


