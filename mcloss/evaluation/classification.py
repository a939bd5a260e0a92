"""`mcloss eval`: top-1/top-5 of both heads (FC and MC) of a checkpoint on a test split."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from mcloss.core.checkpoint import CheckpointError, load_checkpoint
from mcloss.core.device import autocast, resolve_device
from mcloss.core.model import MCModel
from mcloss.data.datasets import build_datasets, class_mismatch
from mcloss.data.io import atomic_write_json

__all__ = ["evaluate", "evaluation_sums", "summarize_sums", "SUM_FIELDS", "main"]

#: The order of the accumulated sums returned by :func:`evaluation_sums`.
SUM_FIELDS = ("loss", "fc_top1", "fc_top5", "mc_top1", "mc_top5", "n")


def _topk_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of samples whose target is the argmax, and within the top ``k``."""
    top = logits.topk(k, dim=1).indices
    hits = top == targets[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


@torch.no_grad()
def evaluation_sums(
    model: MCModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    amp: bool = True,
    limit_batches: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Accumulate FC-head CE loss and top-1/top-5 hits of both heads over ``batches``.

    One forward per batch gives F; the FC head (``head_logits``) and the MC head (``mc_logits``) both
    read it. The model's train/eval mode is restored afterwards.

    Returns:
        A float64 tensor on ``device`` with the sums in :data:`SUM_FIELDS` order (summable across ranks).
    """
    was_training = model.training
    model.eval()
    k = min(5, model.num_classes)
    sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=device)
    channels_last = device.type == "cuda"
    try:
        for index, (images, targets) in enumerate(tqdm(batches, desc="eval", leave=False, disable=not progress)):
            if limit_batches is not None and index >= limit_batches:
                break
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            with autocast(device, amp):
                features = model.forward_features(images)
                fc = model.head_logits(features)
            fc = fc.float()
            mc = model.mc_logits(features.float())
            fc1, fc5 = _topk_hits(fc, targets, k)
            mc1, mc5 = _topk_hits(mc, targets, k)
            loss = F.cross_entropy(fc, targets, reduction="sum")
            sums += torch.stack([loss.double(), fc1, fc5, mc1, mc5, torch.tensor(len(targets), device=device)]).double()
    finally:
        model.train(was_training)
    return sums


def summarize_sums(sums: torch.Tensor, num_classes: int) -> dict:
    """Turn :func:`evaluation_sums` totals into averages: loss, and top-1/top-k accuracy (0..1) of each head."""
    values = dict(zip(SUM_FIELDS, sums.detach().cpu().tolist(), strict=True))
    n = int(values["n"])
    if n == 0:
        raise ValueError("no samples were evaluated (empty test split?)")
    return {
        "n": n,
        "topk": min(5, num_classes),
        "loss": values["loss"] / n,
        "fc_top1": values["fc_top1"] / n,
        "fc_top5": values["fc_top5"] / n,
        "mc_top1": values["mc_top1"] / n,
        "mc_top5": values["mc_top5"] / n,
    }


def evaluate(
    model: MCModel,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    *,
    amp: bool = True,
    limit_batches: int | None = None,
    progress: bool = False,
) -> dict:
    """Top-1/top-5 of the FC head and the MC head (CCMP + GAP of unmasked F), and the FC-head CE loss.

    Args:
        model: an MCModel (already on ``device``).
        loader: batches of (images, 0-based labels).
        device: where the batches are sent.
        amp: bf16 autocast on CUDA.
        limit_batches: stop after this many batches.
        progress: show a tqdm bar.

    Returns:
        ``{"n", "topk", "loss", "fc_top1", "fc_top5", "mc_top1", "mc_top5"}``; accuracies in 0..1;
        ``topk`` is 5, or the class count when there are fewer classes.
    """
    device = torch.device(device)
    sums = evaluation_sums(model, loader, device, amp=amp, limit_batches=limit_batches, progress=progress)
    return summarize_sums(sums, model.num_classes)


# ----------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcloss eval", description="Top-1/top-5 of both heads (FC and MC) on a test split.")
    p.add_argument("--checkpoint", required=True, help="an mcloss *.safetensors checkpoint")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument(
        "--dataset", default="auto", choices=["auto", "cub", "imagefolder", "aircraft", "cars", "flowers"], help="dataset layout"
    )
    p.add_argument("--download", action="store_true", help="download torchvision datasets that support it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p


def _report(result: dict, checkpoint: str, num_classes: int) -> str:
    k = result["topk"]
    lines = [
        f"{checkpoint}: {result['n']} test images, {num_classes} classes, FC-head loss {result['loss']:.4f}",
        f"{'head':<8} {'top-1':>8} {f'top-{k}':>8}",
        f"{'FC':<8} {100 * result['fc_top1']:>7.2f}% {100 * result['fc_top5']:>7.2f}%",
        f"{'MC':<8} {100 * result['mc_top1']:>7.2f}% {100 * result['mc_top5']:>7.2f}%",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate a checkpoint; prints a table of both heads' top-1/top-5 and optionally writes JSON."""
    args = _parser().parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        print("mcloss eval: --batch-size must be >= 1 and --workers >= 0", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
        model = load_checkpoint(args.checkpoint, device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        _, test_ds, class_names = build_datasets(
            args.data, args.dataset, model.transform, model.transform, download=args.download
        )
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"mcloss eval: {exc}", file=sys.stderr)
        return 2
    mismatch = class_mismatch(class_names, model.class_names)
    if mismatch:
        print(f"mcloss eval: {args.data}: {mismatch}", file=sys.stderr)
        return 2
    loader = DataLoader(
        test_ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=device.type == "cuda"
    )
    try:
        result = evaluate(model, loader, device, amp=not args.no_amp, progress=sys.stderr.isatty())
    except ValueError as exc:
        print(f"mcloss eval: {args.data}: {exc}", file=sys.stderr)
        return 2
    print(_report(result, args.checkpoint, model.num_classes))
    if args.json:
        payload = {
            "checkpoint": str(Path(args.checkpoint).resolve()),
            "data": str(Path(args.data).resolve()),
            "dataset": args.dataset,
            "num_classes": model.num_classes,
            **result,
            "fc": {"top1": result["fc_top1"], f"top{result['topk']}": result["fc_top5"]},
            "mc": {"top1": result["mc_top1"], f"top{result['topk']}": result["mc_top5"]},
        }
        atomic_write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
