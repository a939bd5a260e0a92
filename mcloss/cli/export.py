"""``mcloss export``: batch-export channel maps, Grad-CAM and montages for files, folders and globs.

Outputs are described in :mod:`mcloss.explainability.export` and :mod:`mcloss.explainability.outputs`.
The exit status is 1 when any input was rejected (listed in errors.csv and on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mcloss.cli._common import EXIT_OK, EXIT_REJECTED, add_checkpoint, add_device, checkpoint_path, run, say
from mcloss.core.checkpoint import load_checkpoint
from mcloss.core.device import resolve_device
from mcloss.explainability.explanation import DEFAULT_MAPS, MAP_KINDS, parse_maps
from mcloss.explainability.export import ExportConfig, export, parse_shard
from mcloss.explainability.render import (
    MAX_TILE_ASPECT,
    MAX_TILE_HEIGHT,
    MIN_TILE_HEIGHT,
    MONTAGE_MAX_PIXELS,
    Style,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcloss export", description="Batch-export channel maps and Grad-CAM.")
    add_checkpoint(p)
    p.add_argument("--input", nargs="+", required=True, help="image files, directories (recursive) or globs")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--target", default="pred", help="pred | pred_mc | label | topK | class index or name")
    p.add_argument("--maps", default=",".join(DEFAULT_MAPS), help=f"comma list of {','.join(MAP_KINDS)}")
    p.add_argument("--colormap", default="inferno")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity (0 = image only)")
    p.add_argument("--shared-scale", action="store_true", help="normalize a channel group by one max")
    p.add_argument(
        "--tile-height", type=int, default=224,
        help=f"montage tile height in pixels, {MIN_TILE_HEIGHT}..{MAX_TILE_HEIGHT}; images beyond "
        f"{MAX_TILE_ASPECT:g}:1 either way are letterboxed, and a montage over {MONTAGE_MAX_PIXELS / 1e6:g} MP "
        "gets shorter tiles",
    )  # fmt: skip
    p.add_argument("--topk", type=int, default=5, help="entries in the json's topk list")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="DataLoader decoding workers (0 = in process)")
    add_device(p)
    p.add_argument("--shard", default="0/1", help="i/n: process every n-th input starting at i")
    p.add_argument("--method", choices=("fused", "captum"), default="fused", help="Grad-CAM implementation")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the export; returns 0, or 1 when any input was rejected, or 2 on a usage error."""
    return run("export", build_parser(), argv, _export)


def _export(args: argparse.Namespace) -> int:
    style = Style(colormap=args.colormap, alpha=args.alpha, shared_scale=args.shared_scale, tile_height=args.tile_height)
    shard = parse_shard(args.shard)
    maps = parse_maps(args.maps)  # bad options fail before the checkpoint is read
    ckpt = checkpoint_path(args.checkpoint)
    device = resolve_device(args.device)
    # ExportConfig checks its counts: bad values fail before the checkpoint is read
    config = ExportConfig(
        checkpoint=str(ckpt), input=list(args.input), out=str(Path(args.out)), target=args.target, maps=maps, style=style,
        topk=args.topk, batch_size=args.batch_size, workers=args.workers, device=str(device), shard=shard,
        method=args.method,
    )  # fmt: skip
    model = load_checkpoint(ckpt, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    bars = []

    def progress(done: int, total: int) -> None:
        if not bars:  # created on the first report, when the number of images to do is known
            from tqdm import tqdm

            bars.append(tqdm(total=total, unit="img", desc="export", file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        result = export(model, config, device=device, progress=None if args.no_progress else progress)
    finally:
        for bar in bars:
            bar.close()
    redone = f" ({result.redone} re-done: made with other options)" if result.redone else ""
    say(
        "export",
        f"{result.written} exported{redone}, {result.skipped} already done, {len(result.errors)} rejected → {result.out}",
    )
    for _source, reason in result.errors:
        print(f"  rejected: {reason}", file=sys.stderr)
    return EXIT_REJECTED if result.errors else EXIT_OK
