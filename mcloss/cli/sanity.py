"""``mcloss sanity``: cascading randomization, group knockout and random-logit checks of a checkpoint's maps."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mcloss.cli._common import (
    add_checkpoint,
    add_device,
    check_at_least,
    check_output,
    checkpoint_path,
    command_line,
    run,
    say,
    seed_value,
    writing_to,
)
from mcloss.core.checkpoint import load_checkpoint
from mcloss.core.device import resolve_device
from mcloss.core.errors import DatasetError, ParameterError
from mcloss.core.files import atomic_write_json
from mcloss.data.cub import CUBDataset
from mcloss.data.datasets import check_classes
from mcloss.data.io import ImageLoadError
from mcloss.evaluation.sanity import run_sanity
from mcloss.evaluation.sanity_report import summary_markdown, write_sanity
from mcloss.explainability.explanation import prepare

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcloss sanity",
        description="Do the maps depend on the model, and does the FC head use each class's own channel group? "
        "Cascading randomization (Spearman and SSIM per step), group knockout against random channels, random logit.",
    )
    add_checkpoint(p)
    p.add_argument("--data", required=True, help="CUB-layout dataset root (the images' true classes are the targets)")
    p.add_argument("--split", default="test", choices=["test", "train", "all"])
    p.add_argument("--limit", type=int, default=64, help="images, spread evenly over the split (default 64)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--draws", type=int, default=5, help="random knockout draws per image (default 5)")
    p.add_argument("--seed", type=seed_value, default=0, help="seeds the re-initialization and the random choices")
    add_device(p)
    p.add_argument("--out", help="output directory (default runs/sanity-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier sanity run in --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks and write their files; prints summary.md. 0 when run (whatever the verdicts), 2 on a
    usage error."""
    return run("sanity", build_parser(), argv, lambda args: _sanity(args, argv))


def _sanity(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    check_at_least(("limit", args.limit, 1), ("batch_size", args.batch_size, 1), ("draws", args.draws, 1))
    out = Path(args.out) if args.out else Path("runs") / f"sanity-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "sanity.json").exists() and not args.overwrite:
        raise ParameterError(f"--out {out}: already holds a sanity run; pass --overwrite or choose another --out")
    check_output(out, "--out", folder=True)  # before the checks run, not after them
    checkpoint = checkpoint_path(args.checkpoint)
    if not Path(args.data).is_dir():
        raise DatasetError(f"{args.data}: dataset directory not found")
    device = resolve_device(args.device)
    model = load_checkpoint(checkpoint, device)
    dataset = CUBDataset(args.data, args.split)
    check_classes(args.data, dataset.class_names, model.class_names)
    records = dataset.records
    if not records:
        raise DatasetError(f"{args.data}: the {args.split} split has no images")
    count = min(args.limit, len(records))
    pick = sorted({round(i * (len(records) - 1) / max(1, count - 1)) for i in range(count)})
    inputs, targets = [], []
    for rec in (records[i] for i in pick):
        try:
            inputs.append(prepare(model.transform, rec.path, view=None).x)
        except ImageLoadError as exc:
            say("sanity", f"skipped {exc}")
            continue
        targets.append(int(rec.label))
    if not inputs:
        raise DatasetError(f"{args.data}: no readable images")
    x = torch.stack(inputs).to(device)
    batches = [(x[i : i + args.batch_size], targets[i : i + args.batch_size]) for i in range(0, len(targets), args.batch_size)]
    summary = run_sanity(model, batches, seed=args.seed, draws=args.draws)
    summary["config"] = {
        "command": command_line("sanity", argv), "checkpoint": str(checkpoint.resolve()),
        "data": str(Path(args.data).resolve()), "split": args.split, "limit": args.limit, "draws": args.draws,
        "seed": args.seed, "device": str(device),
    }  # fmt: skip
    with writing_to(out):
        write_sanity(summary, out, checkpoint.name)
        atomic_write_json(out / "config.json", summary["config"])
    print(summary_markdown(summary, checkpoint.name))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0
