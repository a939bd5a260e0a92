"""How content-independent are a model's channel peaks? The share of images whose peak sits in one fixed cell.

For each channel position j of the true class's group (j = 1..ξ, all classes together), count in which
feature-map cell the channel peaks on each image, and report the share of images that fall in the most
common cell. Birds move from image to image (random pose and position), so a channel that follows a part
spreads its peaks over many cells (a small share); a channel that spikes at a fixed position (for example a
border cell, where zero padding makes a cheap anchor) piles them into one cell (a large share).

    python scripts/peak_cells.py --data runs/ablation-224px/fresh runs/ablation-224px/mc-s0/last.safetensors ...

Used in docs/ablation_discussion.md to compare 8 × 8 and 14 × 14 maps.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence

from mcloss.core.checkpoint import load_checkpoint
from mcloss.data.cub import CUBDataset
from mcloss.data.io import load_image
from mcloss.explainability.explanation import explain


def peak_cell_shares(checkpoint: str, data: str, limit: int | None = None, batch: int = 16) -> dict:
    """Top-cell share per channel position, distinct peak cells, and the share of peaks on the border ring."""
    model = load_checkpoint(checkpoint)
    records = CUBDataset(data, "test").records[:limit]
    counters: list[Counter] = []
    cells: Counter = Counter()
    hw = (0, 0)
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        images = [load_image(r.path) for r in chunk]
        for exp in explain(model, images, targets=[r.label for r in chunk], maps=("channels",)):
            group = exp.groups[0]
            hw = exp.feature_hw
            while len(counters) < len(group.peaks_feature):
                counters.append(Counter())
            for j, (x, y) in enumerate(group.peaks_feature.tolist()):
                counters[j][(x, y)] += 1
                cells[(x, y)] += 1
    n = len(records)
    h, w = hw
    on_border = sum(c for (x, y), c in cells.items() if x in (0, w - 1) or y in (0, h - 1))
    return {
        "checkpoint": checkpoint,
        "images": n,
        "map": f"{hw[0]}x{hw[1]}",
        "top_cell_share": [round(c.most_common(1)[0][1] / n, 3) for c in counters],
        "distinct_cells": len(cells),
        "cells": hw[0] * hw[1],
        "uniform_share": round(1 / max(1, h * w), 3),
        "border_share": round(on_border / max(1, sum(cells.values())), 3),
        "border_cells_share": round((h * w - max(0, h - 2) * max(0, w - 2)) / max(1, h * w), 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a CUB-layout dataset with labels (its test split is used)")
    parser.add_argument("--limit", type=int, help="at most this many images")
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args(argv)
    for checkpoint in args.checkpoints:
        print(json.dumps(peak_cell_shares(checkpoint, args.data, args.limit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
