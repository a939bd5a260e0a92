"""The Mutual-Channel Loss: discriminality (L_dis) and diversity (L_div) components."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mcloss.core.errors import ParameterError
from mcloss.core.groups import default_drop, group_index, normalize_groups

__all__ = [
    "ccmp",
    "draw_channel_mask",
    "top_share_mean",
    "trained_pool_share",
    "mutual_channel_loss",
    "MCLoss",
    "MCLossOutput",
    "RECIPE_WEIGHTS",
]

#: (α, β) of the official recipes: total = CE + α·L_dis + β·L_div.
RECIPE_WEIGHTS: dict[str, tuple[float, float]] = {
    "official-scratch": (1.5, 20.0),
    "official-pretrained": (0.0005, 0.005),
}


def ccmp(features: torch.Tensor, groups: int | Sequence[int]) -> torch.Tensor:
    """Cross-channel max pooling: [B, K, *S] → [B, C, *S], the maximum over each class's channels."""
    k = features.shape[1]
    sizes = normalize_groups(groups, k)
    if len(set(sizes)) == 1:
        return features.unflatten(1, (len(sizes), sizes[0])).amax(dim=2)
    index = group_index(sizes, features.device)  # [C, ξmax], padded with K
    pad = features.new_full((features.shape[0], 1, *features.shape[2:]), float("-inf"))
    padded = torch.cat([features, pad], dim=1)
    gathered = padded[:, index.flatten()].unflatten(1, index.shape)
    return gathered.amax(dim=2)


def top_share_mean(values: torch.Tensor, share: float) -> torch.Tensor:
    """The mean of the largest ``share`` of the last dimension (at least one value; 1 = the plain mean)."""
    if not 0 < share <= 1:
        raise ParameterError(f"share must be in (0, 1], got {share}", parameter="share")
    n = values.shape[-1]
    count = max(1, round(share * n))
    if count >= n:
        return values.mean(dim=-1)
    return _top_mean(values, count)


#: Inputs smaller than this (values) take ``torch.topk``: too small to time, and fast either way.
_TIMED_SIZE = 1 << 17
#: (row-count bucket, row length, count, dtype, torch threads) → the faster exact way on this machine.
_FASTER_WAY: dict[tuple, Callable[[torch.Tensor, int], torch.Tensor]] = {}


def _top_mean(values: torch.Tensor, count: int) -> torch.Tensor:
    """The mean of the ``count`` largest values of the last dimension, as ``topk(count).values.mean()``.

    On the CPU without autograd there are two exact ways, :func:`_topk_mean` and :func:`_selected_mean`, and
    which is faster depends on the CPU: on the domain check's pooling of F (576 rows of 3136, 45 % zeros), one
    thread, a numpy selection took 3-6 ms against topk's 19 on one 2-core VM, and 12 against 19 on another,
    where topk's 10 ms at 2 threads beat it (BENCHMARKS.md). Each shape is timed once per process, the two ways alternated, and the
    faster is kept; both give the same mean bit for bit, so only the speed depends on the choice.
    """
    if values.device.type != "cpu" or values.requires_grad or values.dtype not in (torch.float32, torch.float64):
        return _topk_mean(values, count)
    n = values.shape[-1]
    rows = values.reshape(-1, n)
    if rows.numel() < _TIMED_SIZE:
        return _topk_mean(rows, count).reshape(values.shape[:-1])
    key = (rows.shape[0].bit_length(), n, count, values.dtype, torch.get_num_threads())
    way = _FASTER_WAY.get(key)
    if way is None:
        way = _FASTER_WAY[key] = _faster(rows, count)
    return way(rows, count).reshape(values.shape[:-1])


def _topk_mean(values: torch.Tensor, count: int) -> torch.Tensor:
    return values.topk(count, dim=-1).values.mean(dim=-1)


def _selected_mean(rows: torch.Tensor, count: int) -> torch.Tensor:
    """:func:`_topk_mean` of CPU rows [R, n] through numpy's selection, sorted back into topk's order so that the
    mean adds the same values in the same order.

    It selects the ``count`` smallest of the negated values: selecting the largest directly was 2-3x slower on
    post-ReLU maps, whose many tied zeros then lie on the side the selection keeps partitioning.
    """
    a = rows.numpy()
    if np.isnan(a).any():  # topk counts NaN as the largest; the negated selection would drop it
        return _topk_mean(rows, count)
    smallest = np.partition(np.negative(a), count - 1, axis=1)[:, :count]
    return torch.from_numpy(smallest).sort(dim=-1).values.neg_().mean(dim=-1)


def _faster(rows: torch.Tensor, count: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The faster of the two exact ways on ``rows``: the best of two alternated timings of each."""
    best: dict[Callable[[torch.Tensor, int], torch.Tensor], float] = {}
    for _ in range(2):
        for way in (_topk_mean, _selected_mean):
            start = time.perf_counter()
            way(rows, count)
            best[way] = min(best.get(way, math.inf), time.perf_counter() - start)
    return min(best, key=best.__getitem__)


def trained_pool_share(dis_topk: float, alpha: float) -> float:
    """The pool a model's L_dis scored its classes by, which its MC head reads them with: ``dis_topk`` when
    L_dis was on (``alpha`` > 0), else 1, the official global average (a CE-only model trained no pool)."""
    return float(dis_topk) if alpha > 0 else 1.0


def draw_channel_mask(
    groups: int | Sequence[int],
    num_channels: int | None = None,
    *,
    drop: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw the 0/1 channel-wise attention mask [K]: in every group, ``drop`` random channels are zeroed.

    Args:
        groups: ξ or per-class group sizes.
        num_channels: K, needed when ``groups`` is an int.
        drop: channels dropped per group; None follows the official rule (1 of 3, 4 of 10/11).
            Always capped so that at least one channel per group survives.
        generator: optional torch RNG for reproducible masks.
        device: where the mask lives.
    """
    sizes = torch.as_tensor(normalize_groups(groups, num_channels), dtype=torch.long)
    k = int(sizes.sum())
    group_of = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    if drop is None:
        unique, inverse = sizes.unique(return_inverse=True)
        drops = torch.tensor([default_drop(s) for s in unique.tolist()], dtype=torch.long)[inverse]
    else:
        drops = torch.minimum(torch.full_like(sizes, max(0, int(drop))), sizes - 1)
    keys = torch.rand(k, generator=generator)
    # sort by (group, key); float64 keeps group + key exact (in float32, 199 + 0.99999994 rounds to 200)
    order = torch.argsort(group_of.double() + keys.double())
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(k) - starts[group_of[order]]
    mask = torch.empty(k)
    mask[order] = (rank >= drops[group_of[order]]).float()
    return mask.to(device) if device is not None else mask


def mutual_channel_loss(
    features: torch.Tensor,
    targets: torch.Tensor,
    groups: int | Sequence[int],
    *,
    mask: torch.Tensor | None = None,
    drop: int | None = None,
    generator: torch.Generator | None = None,
    dis_topk: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the MC-Loss components with the official semantics.

    Args:
        features: F, [B, K, H, W] (H ≠ W allowed), after the last ReLU.
        targets: [B] class indices.
        groups: ξ (K = ξ·C) or a list of per-class group sizes.
        mask: 0/1 channel mask, [K] (shared by the batch) or [B, K]; drawn officially when None.
        drop: channels dropped per group when the mask is drawn (None: official rule).
        generator: RNG for the drawn mask.
        dis_topk: the share of the H×W positions whose mean is a class's L_dis logit, the largest
            first; 1 (default) is the official spatial mean, 1/(H·W) the spatial max.

    Returns:
        ``(dis, div)``: the cross-entropy of the masked CCMP+GAP logits (official ``loss_1``) and
        ``1 − mean_{b,c}(Σ_hw CCMP(softmax_hw F) / ξ_c)`` (official ``loss_2``).
    """
    if features.dim() != 4:
        raise ParameterError(f"features must be [B, K, H, W], got shape {tuple(features.shape)}", parameter="features")
    b, k = features.shape[:2]
    sizes = normalize_groups(groups, k)
    if mask is None:
        mask = draw_channel_mask(sizes, drop=drop, generator=generator)
    mask = mask.to(device=features.device, dtype=features.dtype)
    if mask.shape not in ((k,), (b, k)):
        raise ParameterError(f"mask must be [K]={k} or [B, K]=({b}, {k}), got {tuple(mask.shape)}", parameter="mask")
    mask = mask.view(1, k, 1, 1) if mask.dim() == 1 else mask.view(b, k, 1, 1)

    dis_logits = top_share_mean(ccmp(features * mask, sizes).flatten(2), dis_topk)
    dis = F.cross_entropy(dis_logits, targets)

    attention = torch.softmax(features.flatten(2), dim=2)
    spread = ccmp(attention, sizes).sum(dim=2)  # [B, C], each in [1, ξ_c]
    xi = torch.as_tensor(sizes, dtype=spread.dtype, device=spread.device)
    div = 1.0 - (spread / xi).mean()
    return dis, div


class MCLossOutput(NamedTuple):
    """The total loss and its parts (all scalars)."""

    total: torch.Tensor
    ce: torch.Tensor
    dis: torch.Tensor
    div: torch.Tensor


class MCLoss(nn.Module):
    """CE(head logits) + α·L_dis + β·L_div, as the official training scripts combine them.

    Set ``alpha = beta = 0`` for a CE-only baseline on the same model; the MC terms are then still
    reported but carry no gradient weight.
    """

    def __init__(
        self,
        groups: int | Sequence[int],
        alpha: float = 1.5,
        beta: float = 20.0,
        *,
        drop: int | None = None,
        dis_topk: float = 1.0,
    ) -> None:
        super().__init__()
        self.groups = groups if isinstance(groups, int) else list(groups)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.drop = drop
        self.dis_topk = float(dis_topk)

    def forward(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        targets: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MCLossOutput:
        ce = F.cross_entropy(logits, targets)
        dis, div = mutual_channel_loss(
            features.float(), targets, self.groups, mask=mask, drop=self.drop, generator=generator,
            dis_topk=self.dis_topk,
        )
        total = ce + self.alpha * dis + self.beta * div
        return MCLossOutput(total, ce, dis, div)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, drop={self.drop}, dis_topk={self.dis_topk}"
