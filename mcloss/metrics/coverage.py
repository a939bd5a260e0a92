"""The "distinct parts" claim, counted: do a class's channels land on its defining parts, each on another?

Pure functions on part indices (no models, no files); shared by ``mcloss parts`` and ``mcloss atlas``.

Definitions:

* A *peak's part* is a 0-based part index, or :data:`NO_PART` (-1) for a peak on the background, on the
  object outside every part (the synth ``body``), on no visible keypoint's disc, or a dead channel's.
* A *channel's part* is the plurality (most frequent) of its peaks' parts over the images of its class,
  with "no part" one of the candidates. The channel has **no part** when "no part" is the most frequent,
  or when two or more candidates tie for the most (``status`` ``"none"`` / ``"tie"``): a tie is never broken
  by part order, so coverage is never credited by an arbitrary choice. ``share`` is the channel part's
  share of the channel's peaks (its purity).
* A class's *defining parts* are given as named groups of part indices: on ``mcloss synth`` data each group
  is one part; a CUB region (``head``: crown, forehead, nape, throat) is covered by a channel on any of its
  parts.
* **Coverage**: a defining part is covered when at least one channel's part is in it; the class is fully
  covered when every defining part is.
* **Distinct parts**: the number of different parts among the channels' parts (channels with no part
  left out). **Duplicates**: channels with a part minus distinct parts, i.e. the channels that add no new
  part (channels 2 and 3 both on the head: 1 duplicate). **Channels on a shared part**: channels whose part
  is also another channel's part (that example: 2).
* **Chance**: the same counts if each channel that has a part had instead a part drawn independently with
  probability its share of the visible part area (``part_shares``: the mean over the class's images of
  each part's share of the visible part area), the number of channels with a part kept as measured.
  Closed forms: with m channels and shares q, E[distinct] = Σ_p 1 − (1 − q_p)^m, P(full coverage) by
  inclusion–exclusion, E[channels on a shared part] = Σ_p m·q_p·(1 − (1 − q_p)^(m−1)).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from mcloss.core.errors import ParameterError

__all__ = [
    "NO_PART",
    "DEFINITION",
    "channel_part",
    "channel_parts",
    "chance_coverage",
    "group_coverage",
    "class_coverage",
    "coverage_summary",
]

#: A peak (or channel) on no part.
NO_PART = -1

#: The rules in one paragraph, written beside the numbers (summary.json, summary.md).
DEFINITION = (
    "Each channel's part is the most frequent part of its peaks over the images of its class; peaks on the "
    "background or on the object outside the parts count as 'no part', and a channel has no part when 'no part' "
    "is the most frequent or two candidates tie for the most. A defining part is covered when some channel of "
    "the class's group has it as its part. Duplicates: channels with a part minus distinct parts (the channels "
    "that add no new part); channels on a shared part: channels whose part is another channel's too. Chance: "
    "the same counts with each part-holding channel's part drawn from the visible part-area shares."
)


def channel_part(peaks: Sequence[int]) -> tuple[int, float, str]:
    """One channel's part from its peaks' parts (see the module docstring).

    Returns:
        (part or :data:`NO_PART`, the share of peaks on it (on the plurality for a tie, NaN without peaks),
        status ``"part"``, ``"none"`` (no part most frequent), ``"tie"`` or ``"no peaks"``).
    """
    values = [NO_PART if int(p) < 0 else int(p) for p in peaks]
    if not values:
        return NO_PART, float("nan"), "no peaks"
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    most = max(counts.values())
    leaders = [v for v, n in counts.items() if n == most]
    share = most / len(values)
    if len(leaders) > 1:
        return NO_PART, share, "tie"
    if leaders[0] == NO_PART:
        return NO_PART, share, "none"
    return leaders[0], share, "part"


def channel_parts(peaks: np.ndarray | Sequence[Sequence[int]]) -> list[tuple[int, float, str]]:
    """:func:`channel_part` of every channel of an [images, ξ] array of peak parts."""
    arr = np.asarray(peaks, dtype=np.int64)
    if arr.ndim != 2:
        raise ParameterError(f"peaks must be [images, channels], got shape {arr.shape}", parameter="peaks")
    return [channel_part(arr[:, c].tolist()) for c in range(arr.shape[1])]


def chance_coverage(
    part_shares: Sequence[float], defining: Sequence[Sequence[int]], channels: int
) -> dict[str, float]:
    """Expected counts when ``channels`` channels each take a part drawn from ``part_shares``.

    Args:
        part_shares: [P] probability of each part (normalized here; all zero gives NaNs).
        defining: the defining parts, each a group of part indices.
        channels: how many channels have a part (m).

    Returns:
        ``covered`` (expected defining parts covered), ``full`` (probability all are), ``distinct``,
        ``duplicates`` and ``shared`` (expected channels on a shared part).
    """
    q = np.clip(np.asarray(part_shares, dtype=np.float64), 0.0, None)
    m = int(channels)
    if q.sum() <= 0 or m < 0:
        return {k: float("nan") for k in ("covered", "full", "distinct", "duplicates", "shared")}
    q = q / q.sum()
    groups = [sorted({int(i) for i in g if 0 <= int(i) < len(q)}) for g in defining]

    def mass(indices: set[int]) -> float:
        return float(q[sorted(indices)].sum()) if indices else 0.0

    covered = sum(1.0 - (1.0 - mass(set(g))) ** m for g in groups)
    full = 0.0
    for r in range(len(groups) + 1):  # inclusion–exclusion over the sets of missed defining parts
        for subset in itertools.combinations(groups, r):
            union = set().union(*map(set, subset)) if subset else set()
            full += (-1) ** r * (1.0 - mass(union)) ** m
    distinct = float(np.sum(1.0 - (1.0 - q) ** m))
    shared = float(np.sum(m * q * (1.0 - (1.0 - q) ** (m - 1)))) if m else 0.0
    return {"covered": float(covered), "full": float(min(max(full, 0.0), 1.0)), "distinct": distinct,
            "duplicates": m - distinct, "shared": shared}  # fmt: skip


def group_coverage(
    peaks: np.ndarray | Sequence[Sequence[int]],
    defining: Sequence[Sequence[int]],
    part_shares: Sequence[float] | None = None,
) -> dict:
    """Coverage, distinct parts and duplicates of one class's group (see the module docstring).

    Args:
        peaks: [images, ξ] the part of each channel's peak on each image of the class (-1 = no part).
        defining: the class's defining parts, each a group of part indices (one part each on synth data).
        part_shares: [P] the visible part-area shares for the chance reference (None: no chance).

    Returns:
        ``images``; per channel ``channel_parts`` (-1 = none), ``channel_shares``, ``channel_status``;
        ``covered`` / ``missed`` (positions in ``defining``), ``covered_count``, ``defining_count``, ``full``;
        ``distinct_parts``, ``duplicates``, ``shared`` (part → its channels, 0-based, for parts held by two
        or more), ``channels_on_shared_part``, ``channels_with_part``, ``channels``; ``chance`` (or None).
    """
    arr = np.asarray(peaks, dtype=np.int64)
    if arr.ndim != 2:
        raise ParameterError(f"peaks must be [images, channels], got shape {arr.shape}", parameter="peaks")
    per_channel = channel_parts(arr)
    parts = [p for p, _, _ in per_channel]
    held = [p for p in parts if p != NO_PART]
    holders: dict[int, list[int]] = {}
    for c, p in enumerate(parts):
        if p != NO_PART:
            holders.setdefault(p, []).append(c)
    covered = [k for k, g in enumerate(defining) if any(p in {int(i) for i in g} for p in held)]
    shared = {p: cs for p, cs in sorted(holders.items()) if len(cs) > 1}
    return {
        "images": int(arr.shape[0]),
        "channels": int(arr.shape[1]),
        "channel_parts": parts,
        "channel_shares": [s for _, s, _ in per_channel],
        "channel_status": [st for _, _, st in per_channel],
        "covered": covered,
        "missed": [k for k in range(len(defining)) if k not in covered],
        "covered_count": len(covered),
        "defining_count": len(defining),
        "full": len(covered) == len(defining),
        "channels_with_part": len(held),
        "distinct_parts": len(holders),
        "duplicates": len(held) - len(holders),
        "shared": shared,
        "channels_on_shared_part": sum(len(cs) for cs in shared.values()),
        "chance": None if part_shares is None else chance_coverage(part_shares, defining, len(held)),
    }


def class_coverage(
    peaks: Mapping[str, np.ndarray | Sequence[Sequence[int]]],
    defining: Mapping[str, Mapping[str, Sequence[int]]],
    part_names: Sequence[str],
    part_shares: Mapping[str, Sequence[float]] | None = None,
) -> dict:
    """The coverage block of a run: every class with defining parts and peaks, named, and the summary.

    Args:
        peaks: class name → [images, ξ] peak parts (-1 = no part).
        defining: class name → {defining part (or region) name → its part indices}; classes with none are
            left out, as are defining parts with no index among ``part_names``.
        part_names: the dataset's part names (index → name).
        part_shares: class name → [P] visible part-area shares (for the chance reference), or None.

    Returns:
        ``{"definition", "per_class", "summary"}`` (JSON-friendly; ``summary`` from
        :func:`coverage_summary`); ``per_class`` is empty and ``summary`` None when no class qualifies.
    """
    names = list(part_names)

    def name(p: int) -> str | None:
        return None if p == NO_PART else names[p] if 0 <= p < len(names) else f"part_{p}"

    per_class: dict[str, dict] = {}
    for cls, arr in peaks.items():
        groups = {k: [int(i) for i in v] for k, v in (defining.get(cls) or {}).items() if len(v)}
        if not groups or len(arr) == 0:
            continue
        shares = None if part_shares is None else part_shares.get(cls)
        g = group_coverage(arr, list(groups.values()), shares)
        labels = list(groups)
        per_class[cls] = {
            "images": g["images"],
            "defining": labels,
            "channel_parts": [name(p) for p in g["channel_parts"]],
            "channel_shares": g["channel_shares"],
            "channel_status": g["channel_status"],
            "covered": [labels[k] for k in g["covered"]],
            "missed": [labels[k] for k in g["missed"]],
            "covered_count": g["covered_count"],
            "defining_count": g["defining_count"],
            "full": g["full"],
            "channels": g["channels"],
            "channels_with_part": g["channels_with_part"],
            "distinct_parts": g["distinct_parts"],
            "duplicates": g["duplicates"],
            "shared": {
                name(p): [c + 1 for c in cs] for p, cs in g["shared"].items()
            },  # 1-based, as displayed
            "channels_on_shared_part": g["channels_on_shared_part"],
            "chance": g["chance"],
        }
    return {"definition": DEFINITION, "per_class": per_class, "summary": coverage_summary(per_class)}


def coverage_summary(per_class: Mapping[str, Mapping]) -> dict | None:
    """Over the classes: fully covered k of n, defining parts covered (share), mean distinct parts per
    group, duplicates, channels on a shared part and without a part; each with its chance where every
    class has one. None without classes."""
    rows = list(per_class.values())
    if not rows:
        return None
    n = len(rows)
    defining = sum(r["defining_count"] for r in rows)
    covered = sum(r["covered_count"] for r in rows)
    channels = sum(r["channels"] for r in rows)
    out = {
        "classes": n,
        "fully_covered": sum(bool(r["full"]) for r in rows),
        "defining_parts": defining,
        "defining_covered": covered,
        "defining_covered_share": covered / defining if defining else float("nan"),
        "distinct_parts_mean": float(np.mean([r["distinct_parts"] for r in rows])),
        "channels": channels,
        "channels_with_part": sum(r["channels_with_part"] for r in rows),
        "duplicates": sum(r["duplicates"] for r in rows),
        "channels_on_shared_part": sum(r["channels_on_shared_part"] for r in rows),
        "chance": None,
    }
    chances = [r.get("chance") for r in rows]
    if all(c is not None for c in chances):
        out["chance"] = {
            "fully_covered": float(sum(c["full"] for c in chances)),
            "defining_covered": float(sum(c["covered"] for c in chances)),
            "defining_covered_share": float(sum(c["covered"] for c in chances)) / defining
            if defining
            else float("nan"),
            "distinct_parts_mean": float(np.mean([c["distinct"] for c in chances])),
            "duplicates": float(sum(c["duplicates"] for c in chances)),
            "channels_on_shared_part": float(sum(c["shared"] for c in chances)),
        }
    return out
