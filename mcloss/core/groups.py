"""Channel groups: which feature channels belong to which class."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mcloss.core.errors import ParameterError

__all__ = ["normalize_groups", "split_channels", "group_index", "default_drop"]


def normalize_groups(groups: int | Sequence[int], num_channels: int | None = None) -> list[int]:
    """Return per-class group sizes as a list.

    Args:
        groups: ξ for equal groups (then ``num_channels`` fixes the class count) or one size per class.
        num_channels: K, required when ``groups`` is an int; checked against the sum otherwise.
    """
    if isinstance(groups, int):
        if groups < 1:
            raise ParameterError(f"group size must be >= 1, got {groups}", parameter="groups")
        if num_channels is None:
            raise ParameterError("num_channels is required when groups is an int", parameter="num_channels")
        if num_channels % groups:
            raise ParameterError(f"{num_channels} channels do not split into groups of {groups}", parameter="groups")
        return [groups] * (num_channels // groups)
    sizes = [int(g) for g in groups]
    if not sizes or min(sizes) < 1:
        raise ParameterError(f"group sizes must be a non-empty list of positive ints, got {sizes[:8]}", parameter="groups")
    if num_channels is not None and sum(sizes) != num_channels:
        raise ParameterError(f"group sizes sum to {sum(sizes)} but the feature map has {num_channels} channels")
    return sizes


def split_channels(num_channels: int, num_classes: int) -> list[int]:
    """Split K channels over C classes as the official pretrained code does (e.g. 2048/200 → 152×10 + 48×11)."""
    if num_classes < 1 or num_channels < num_classes:
        raise ParameterError(f"cannot split {num_channels} channels over {num_classes} classes")
    base, extra = divmod(num_channels, num_classes)
    return [base] * (num_classes - extra) + [base + 1] * extra


def group_index(sizes: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Return a [C, ξmax] tensor of channel indices per class, padded with K (one past the last channel)."""
    sizes_t = torch.as_tensor(list(sizes), dtype=torch.long, device=device)
    starts = torch.cumsum(sizes_t, 0) - sizes_t
    offsets = torch.arange(int(sizes_t.max()), device=device)
    index = starts[:, None] + offsets[None, :]
    return torch.where(offsets[None, :] < sizes_t[:, None], index, torch.full_like(index, int(sizes_t.sum())))


def default_drop(size: int) -> int:
    """Channels dropped per group by the official channel-wise attention: 1 of 3, 4 of 10 or 11."""
    if size <= 1:
        return 0
    return max(1, int(0.4 * size))
