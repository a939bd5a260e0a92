"""Where a channel's mass lies, next to where it peaks: per part, for the true class's group.

Every pixel of the original image within the hit radius (0.12 × max(width, height)) of a visible keypoint
belongs to its nearest part, every other pixel to "elsewhere". For each channel of the true class's group,
the map (ReLU output, upsampled onto the image) is split over those regions as shares of its total, and its
peak is assigned to the region it falls in. The area row is what a uniform map would give. Usage::

    python scripts/part_mass.py --data runs/data/birds12-fresh [checkpoints/default.safetensors]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

import mcloss
from mcloss.data.cub import CUBDataset
from mcloss.explainability.explanation import explain
from mcloss.explainability.geometry import to_original


def part_owner(keypoints: np.ndarray, size: tuple[int, int], radius: float) -> np.ndarray:
    """[H, W] region index per pixel: the nearest visible keypoint within ``radius``, else P (elsewhere)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    dist = np.stack([np.hypot(xx - x, yy - y) if v > 0 else np.full((h, w), np.inf) for x, y, v in keypoints])
    return np.where(dist.min(0) <= radius, dist.argmin(0), len(keypoints))


def region_shares(values: np.ndarray, owner: np.ndarray, regions: int) -> np.ndarray:
    """Share of a non-negative map's total in each region (zeros for an all-zero map)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, None)
    total = v.sum()
    return np.bincount(owner.ravel(), weights=v.ravel(), minlength=regions) / total if total > 0 else np.zeros(regions)


def part_mass(checkpoint: str, data: str, batch: int = 16) -> dict[str, np.ndarray]:
    """Mean ``mass``, ``peak`` and ``area`` shares per region (parts, then elsewhere) over the test split."""
    model = mcloss.load_checkpoint(checkpoint)
    ds = CUBDataset(data, "test")
    regions = len(ds.part_names) + 1
    sums = {key: np.zeros(regions) for key in ("mass", "peak", "area")}
    for start in range(0, len(ds.records), batch):
        chunk = ds.records[start : start + batch]
        exps = explain(model, [mcloss.load_image(r.path) for r in chunk], targets=[r.label for r in chunk], maps=("channels",))
        for rec, ex in zip(chunk, exps, strict=True):
            size = ex.geometry.original
            owner = part_owner(rec.parts, size, 0.12 * max(size))
            sums["area"] += region_shares(np.ones(owner.shape), owner, regions)
            for c, channel in enumerate(ex.groups[0].channels):
                sums["mass"] += region_shares(to_original(channel, ex.geometry), owner, regions)
                x, y = ex.groups[0].peaks_xy[c]
                sums["peak"][owner[min(int(y), size[1] - 1), min(int(x), size[0] - 1)]] += 1
    return {key: value / value.sum() for key, value in sums.items()} | {"regions": [*ds.part_names, "elsewhere"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=str(mcloss.default_checkpoint()))
    parser.add_argument("--data", default="runs/data/birds12-fresh")
    args = parser.parse_args(argv)
    result = part_mass(args.checkpoint, args.data)
    print("| share of | " + " | ".join(result["regions"]) + " |")
    print("|---|" + "---|" * len(result["regions"]))
    for key, label in (("peak", "channel peaks"), ("mass", "channel mass"), ("area", "image area (uniform map)")):
        print(f"| {label} | " + " | ".join(f"{v:.2f}" for v in result[key]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
