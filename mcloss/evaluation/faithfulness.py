"""Deletion and insertion curves: does removing what a saliency map ranks first remove the evidence?

Each map is upsampled bilinearly to the input resolution, pixels are ranked by decreasing saliency (ties
in random order), and at each of ``steps`` equal steps a further 1/steps of the input's pixels is deleted
(replaced by the baseline) or inserted (taken from the image, starting from the baseline). The baseline
is, by default, the input blurred by a Gaussian of σ = max(H, W)/45 (≈ 5 px at 224), or with
``baseline="mean"`` the normalization mean (0 in the normalized tensor). The curve is the FC-head softmax
probability of the target class; all step images of one input go through the model in one batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from mcloss.core.device import autocast
from mcloss.core.errors import ParameterError
from mcloss.core.model import MCModel
from mcloss.metrics import localization as M

__all__ = ["BASELINES", "baseline_input", "perturbation_curves"]

#: What deleted pixels become: a blurred copy of the input, or the normalization mean.
BASELINES = ("blur", "mean")


def baseline_input(x: torch.Tensor, baseline: str = "blur") -> torch.Tensor:
    """The "nothing here" input for deletion/insertion: ``x`` [3, H, W] blurred, or zeros (the mean)."""
    if baseline == "mean":
        return torch.zeros_like(x)
    if baseline != "blur":
        raise ParameterError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}", parameter="baseline")
    h, w = x.shape[-2:]
    sigma = max(h, w) / 45.0
    kernel = 2 * math.ceil(2 * sigma) + 1
    kernel = max(1, min(kernel, 2 * min(h, w) - 1))  # reflect padding needs kernel // 2 < side
    return TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])


@torch.no_grad()
def perturbation_curves(
    model: MCModel,
    x: torch.Tensor,
    target: int,
    saliencies: Sequence[np.ndarray],
    *,
    steps: int = 16,
    baseline: str = "blur",
    rng: np.random.Generator | None = None,
    max_batch: int = 128,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves of several saliency maps for one input.

    Args:
        model: the classifier (eval mode, on the device of ``x``).
        x: [3, H, W] normalized input.
        target: class whose FC-head softmax probability is measured.
        saliencies: maps [h, w] covering the input (any resolution; upsampled bilinearly to H×W).
        steps: number of equal steps from 0 to all pixels.
        baseline: ``"blur"`` or ``"mean"`` (see :func:`baseline_input`).
        rng: breaks saliency ties (by flat index when None).
        max_batch: most step images per forward pass (all of them in one batch when they fit).
        amp: bf16 autocast on CUDA.

    Returns:
        (deletion, insertion): [len(saliencies), steps + 1] float64 probabilities at fractions
        0, 1/steps, …, 1.
    """
    h, w = x.shape[-2:]
    base = baseline_input(x, baseline)
    masks = []
    for sal in saliencies:
        s = torch.as_tensor(np.asarray(sal, dtype=np.float32))[None, None]
        up = F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
        masks.append(M.perturbation_masks(M.saliency_rank(up, rng), steps))
    m = torch.from_numpy(np.concatenate(masks)).to(x.device)[:, None]  # [n·(S+1), 1, H, W]
    deleted = torch.where(m, base, x)
    inserted = torch.where(m, x, base)
    batch = torch.cat([deleted, inserted])
    probs = []
    size = max(1, int(max_batch))
    for start in range(0, len(batch), size):
        with autocast(x.device, enabled=amp):
            logits = model(batch[start : start + size])
        probs.append(torch.softmax(logits.float(), dim=1)[:, target])
    p = torch.cat(probs).double().cpu().numpy().reshape(2, len(saliencies), steps + 1)
    return p[0], p[1]
