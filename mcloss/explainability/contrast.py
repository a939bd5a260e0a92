"""Contrastive maps: why class A and not class B, from the same forward pass.

- **Finer-CAM** (Zhang et al., CVPR 2025) is Grad-CAM of a contrastive score of the FC head instead of A's
  logit: with reference classes r and their softmax probabilities p_r,
  ``Σ_r p_r (y_A − α·y_r) / Σ_r p_r`` (α = 1). The references are the :data:`FINER_REFERENCES` classes whose
  logits are nearest A's (the paper's default), or the one class B a user names; the probabilities are part
  of the score (gradients flow through them), as in the authors' code and pytorch-grad-cam's ``FinerCAM``.
- **Group contrast** is native to MC-Loss and needs no gradient: A's channel group against B's, after
  normalising each group by its maximum. Each channel of A is weighted by how little of its mass B's group
  covers on this image (``1 − Σ min(Â_i, B̂) / Σ Â_i``, with Â_i the channel over its own maximum and B̂ B's
  CCMP over its maximum), so a channel that looks at a part B's group also sees drops out whole; the map is
  the maximum over A's weighted channels, on A's group scale. Why this design and not a pixel-wise difference
  is measured in ``docs/contrast.md`` (``scripts/contrast_designs.py``).
- :func:`ccmp_difference` is the plain baseline: A's CCMP minus B's, each over its maximum, clipped at 0.

A :class:`Contrast` names, for one target, the class B it is contrasted with and Finer-CAM's references;
:func:`resolve_contrasts` picks them from the FC-head logits (``"auto"``: B is the class whose logit is
nearest A's) or from a named class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mcloss.core.errors import ParameterError

if TYPE_CHECKING:
    from mcloss.core.model import MCModel

__all__ = [
    "AUTO",
    "CONTRAST_DESIGNS",
    "Contrast",
    "FINER_ALPHA",
    "FINER_REFERENCES",
    "ContrastSpec",
    "ccmp_difference",
    "check_contrast",
    "finer_weights",
    "group_contrast",
    "nearest_classes",
    "resolve_contrasts",
]

#: The contrast class is picked per target: the class whose FC-head logit is nearest the target's.
AUTO = "auto"
#: Finer-CAM's reference classes under ``"auto"`` (the authors' default: the 3 nearest logits).
FINER_REFERENCES = 3
#: Finer-CAM's α: how strongly the references' logits are subtracted (the authors' default).
FINER_ALPHA = 1.0

ContrastSpec = int | str


@dataclass(frozen=True)
class Contrast:
    """What one target is contrasted with.

    Attributes:
        references: Finer-CAM's reference classes (0-based), nearest first; the first is class B, the group
            contrast's other group (the only one when B was named).
        names: their class names.
        auto: B was picked from the logits (not named).
    """

    references: tuple[int, ...]
    names: tuple[str, ...]
    auto: bool

    @property
    def other(self) -> int:
        """Class B."""
        return self.references[0]

    def label(self) -> str:
        """``"B"``, or ``"B +2"`` when Finer-CAM has two more references (a tile's short title)."""
        extra = len(self.references) - 1
        return self.names[0] + (f" +{extra}" if extra else "")

    def described(self) -> str:
        """``"B"``, or ``"B and 2 more near classes"`` (captions and alternative text, where "+2" is unexplained)."""
        extra = len(self.references) - 1
        return self.names[0] + (f" and {extra} more near {'class' if extra == 1 else 'classes'}" if extra else "")


def check_contrast(model: MCModel, spec: ContrastSpec) -> ContrastSpec:
    """``"auto"`` (any case) or a class name or 0-based index → ``"auto"`` or the class's index.

    Raises:
        UnknownClassError, OutOfRangeError: an unknown class.
    """
    if isinstance(spec, str) and spec.strip().lower() == AUTO:
        return AUTO
    if model.num_classes < 2:
        raise ParameterError("contrast: a model with one class has nothing to contrast with", parameter="contrast")
    return model.class_index(int(spec) if isinstance(spec, (int, np.integer)) else str(spec).strip(), "contrast")


def nearest_classes(logits: np.ndarray, target: int, k: int) -> list[int]:
    """The ``k`` classes (not ``target``) whose logits are nearest ``target``'s, nearest first (ties by index)."""
    order = np.argsort(np.abs(np.asarray(logits, np.float64) - float(logits[target])), kind="stable")
    return [int(i) for i in order if i != target][:k]


def resolve_contrasts(
    model: MCModel,
    spec: ContrastSpec,
    logits: np.ndarray,
    per_image: Sequence[Sequence[int]],
    references: int = FINER_REFERENCES,
) -> list[list[Contrast]]:
    """One :class:`Contrast` per target of each image (``per_image`` as :func:`resolve_targets` gives them).

    ``"auto"``: B and Finer-CAM's references are the nearest logits to the target's. A named class is the
    only reference; a target that *is* the named class is contrasted as under ``"auto"``.
    """
    chosen = check_contrast(model, spec)
    k = max(1, min(int(references), model.num_classes - 1))
    out = []
    for row, targets in zip(np.asarray(logits), per_image, strict=True):
        contrasts = []
        for t in targets:
            auto = chosen in (AUTO, t)
            refs = tuple(nearest_classes(row, int(t), k)) if auto else (int(chosen),)
            contrasts.append(Contrast(refs, tuple(model.class_names[r] for r in refs), auto))
        out.append(contrasts)
    return out


def finer_weights(
    features: torch.Tensor,
    logits: torch.Tensor,
    targets: Sequence[int],
    references: Sequence[Sequence[int]],
    *,
    alpha: float = FINER_ALPHA,
    retain_graph: bool = True,
) -> torch.Tensor:
    """[B, K] Finer-CAM channel weights: the spatial mean of the gradient w.r.t. F of
    ``Σ_r p_r (y_t − α·y_r) / Σ_r p_r`` for each image's target ``t`` and references ``r`` (see the module
    docstring). ``features`` requires grad and produced ``logits``."""
    if len(targets) != logits.shape[0] or len(references) != logits.shape[0]:
        raise ParameterError(f"targets/references: one each per image of a batch of {logits.shape[0]}", parameter="targets")
    width = max(len(r) for r in references)
    dev = logits.device
    index = torch.tensor([[*r, *[r[0]] * (width - len(r))] for r in references], dtype=torch.long, device=dev)
    used = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in references], device=dev)
    target = torch.as_tensor(list(targets), dtype=torch.long, device=dev)[:, None]
    p = torch.softmax(logits.float(), dim=1).gather(1, index) * used
    margin = logits.gather(1, target) - alpha * logits.gather(1, index)
    score = (p * margin).sum(dim=1) / (p.sum(dim=1) + 1e-9)
    (grad,) = torch.autograd.grad(score.sum(), features, retain_graph=retain_graph)
    return grad.float().mean(dim=(2, 3))


def _over_max(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``x`` divided by its maximum over ``dims`` (all zero where that maximum is not positive)."""
    top = x.amax(dim=dims, keepdim=True)
    return torch.where(top > 0, x / top.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def ccmp_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The baseline: ReLU(CCMP_A / max − CCMP_B / max) of two groups [ξ_A, h, w], [ξ_B, h, w] → [h, w]."""
    return torch.relu(_over_max(a.amax(0), (0, 1)) - _over_max(b.amax(0), (0, 1)))


def channel_shares(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[ξ_A] the share of each A channel's mass (over its own maximum) that B's CCMP (over its maximum) covers."""
    a_unit = _over_max(a.clamp_min(0), (1, 2))
    b_unit = _over_max(b.clamp_min(0).amax(0), (0, 1))
    mass = a_unit.sum(dim=(1, 2))
    covered = torch.minimum(a_unit, b_unit[None]).sum(dim=(1, 2))
    return torch.where(mass > 0, covered / mass.clamp_min(torch.finfo(a.dtype).tiny), torch.ones_like(mass))


def _weighted_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A's channels on its group scale, each weighted by the share of it B's group does not cover; their maximum."""
    keep = 1.0 - channel_shares(a, b)
    return (_over_max(a.clamp_min(0), (0, 1, 2)) * keep[:, None, None]).amax(0)


def group_contrast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The group contrast (see the module docstring) of A's group [ξ_A, h, w] against B's [ξ_B, h, w] → [h, w]."""
    return torch.relu(_weighted_channels(a, b) - _over_max(b.clamp_min(0).amax(0), (0, 1)))


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A's CCMP where B's is low: CCMP_A / max × (1 − CCMP_B / max)."""
    return _over_max(a.amax(0), (0, 1)) * (1.0 - _over_max(b.amax(0), (0, 1)))


def _channel_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each A channel over its own maximum, minus B's CCMP over its maximum, clipped at 0; their maximum."""
    return torch.relu(_over_max(a.clamp_min(0), (1, 2)) - _over_max(b.clamp_min(0).amax(0), (0, 1))[None]).amax(0)


#: The group-contrast designs measured against each other (``scripts/contrast_designs.py``); ``channels``
#: is the one the ``contrast`` map kind uses.
CONTRAST_DESIGNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "channels": group_contrast,
    "weighted_channels": _weighted_channels,
    "difference": ccmp_difference,
    "channel_difference": _channel_difference,
    "product": _product,
}
