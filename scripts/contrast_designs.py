"""Which group contrast: every design of ``mcloss.explainability.contrast.CONTRAST_DESIGNS`` scored as
``mcloss parts --contrast`` scores the maps (on every pair of classes that share a defining part and differ in
one, mass per area on the parts that tell them apart ÷ on the parts they share, on images of A).

    python scripts/contrast_designs.py --data runs/data/birds12-fresh checkpoints/default.safetensors \\
        checkpoints/ce-baseline.safetensors --json runs/contrast_designs.json

Prints one markdown table per checkpoint (the maps of ``mcloss parts --contrast``, then each design); used in
docs/contrast.md to choose the ``contrast`` map kind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mcloss.core.checkpoint import load_checkpoint
from mcloss.core.files import atomic_write_json, json_safe
from mcloss.evaluation.contrast import contrast_table, evaluate_contrast


def design_blocks(checkpoints: Sequence[str], data: str, limit: int | None = None) -> dict[str, dict]:
    """{checkpoint: evaluate_contrast(..., designs=True)} on the test split of ``data``."""
    return {path: evaluate_contrast(load_checkpoint(path, "cpu"), data, designs=True, limit=limit) for path in checkpoints}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", required=True, help="CUB-layout data with part masks and defining parts")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--json", help="also write the blocks here")
    args = p.parse_args(argv)
    blocks = design_blocks(args.checkpoints, args.data, args.limit)
    for path, block in blocks.items():
        print(contrast_table(block, f"## {Path(path).name}\n"))
    if args.json:
        atomic_write_json(args.json, json_safe(blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
