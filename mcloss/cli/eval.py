"""``mcloss eval``: top-1/top-5 of both heads (FC and MC) of a checkpoint on a test split."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mcloss.cli._common import (
    add_checkpoint,
    add_device,
    add_no_progress,
    checkpoint_path,
    model_splits,
    progress_bar,
    run,
    show_progress,
    writing_to,
)
from mcloss.core.checkpoint import load_checkpoint
from mcloss.core.device import resolve_device
from mcloss.core.errors import DatasetError, MclossError, ParameterError
from mcloss.core.files import atomic_write_json
from mcloss.data.datasets import DATASET_KINDS
from mcloss.evaluation.classification import evaluate, format_report

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcloss eval", description="Top-1/top-5 of both heads (FC and MC) on a test split.")
    add_checkpoint(p)
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--dataset", default="auto", choices=list(DATASET_KINDS), help="dataset layout")
    p.add_argument("--download", action="store_true", help="download torchvision datasets that support it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    add_device(p)
    add_no_progress(p)
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument(
        "--ood", metavar="INPUT", nargs="+",
        help="out-of-domain images (folders, files, globs): the AUROC of the checkpoint's domain score, these against "
        "the test split (needs a domain check: mcloss domain)",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate a checkpoint; prints a table of both heads' top-1/top-5 and optionally writes JSON.

    Returns 0, or 2 on bad arguments or unusable inputs (one line on stderr).
    """
    return run("eval", build_parser(), argv, _eval)


def _eval(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 0:
        raise ParameterError("batch_size must be >= 1 and workers >= 0", parameter=("batch_size", "workers"))
    device = resolve_device(args.device)
    checkpoint = checkpoint_path(args.checkpoint)
    model = load_checkpoint(checkpoint, device)
    if args.ood and model.domain is None:
        raise ParameterError(f"--ood: {checkpoint} has no domain check (domain check unavailable); add one with mcloss domain")
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    _, test_ds = model_splits(model, args.data, args.dataset, download=args.download)
    ood_files = None
    if args.ood:  # collected before the evaluation: an --ood that gives nothing is refused at once
        from mcloss.cli.domain import ood_inputs

        ood_files = ood_inputs("eval", args.ood)
    loader = DataLoader(
        test_ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=device.type == "cuda"
    )
    try:
        with progress_bar("eval", show_progress(args), unit="it", leave=False) as progress:
            result = evaluate(model, loader, device, amp=not args.no_amp, progress=progress)
    except MclossError as exc:  # an empty split, an unreadable image
        raise DatasetError(f"{args.data}: {exc}") from exc
    print(format_report(result, str(checkpoint), model.num_classes))
    ood = None
    if ood_files is not None:
        from mcloss.cli.domain import ood_report
        from mcloss.evaluation.domain import split_scores

        inside = split_scores(model, test_ds, batch_size=args.batch_size, workers=args.workers, device=device)
        ood = ood_report("eval", model, inside, ood_files, args.ood, "the test split")
    if args.json:
        payload = {
            "checkpoint": str(checkpoint.resolve()),
            "data": str(Path(args.data).resolve()),
            "dataset": args.dataset,
            "num_classes": model.num_classes,
            **result,
            "fc": {"top1": result["fc_top1"], f"top{result['topk']}": result["fc_top5"]},
            "mc": {"top1": result["mc_top1"], f"top{result['topk']}": result["mc_top5"]},
            **({} if ood is None else {"domain": ood}),
        }
        with writing_to(args.json, "--json"):
            atomic_write_json(args.json, payload)
    return 0
