"""Top-1/top-5 of both heads (FC and MC) of a model on a test split (what ``mcloss eval`` reports)."""

from __future__ import annotations

from collections.abc import Iterable, Sized

import torch
import torch.nn.functional as F

from mcloss.core.device import autocast
from mcloss.core.errors import DatasetError, Progress, check_callback
from mcloss.core.model import MCModel, model_guard

__all__ = ["evaluate", "evaluation_sums", "summarize_sums", "format_report", "SUM_FIELDS"]

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
    progress: Progress | None = None,
) -> torch.Tensor:
    """Accumulate FC-head CE loss and top-1/top-5 hits of both heads over ``batches``.

    One forward per batch gives F; the FC head (``head_logits``) and the MC head (``mc_logits``) both
    read it. The model's train/eval mode is restored afterwards. ``progress`` is called as
    ``(batches done, batches in total)`` before the first batch and after each (when ``batches`` has a
    length).

    Returns:
        A float64 tensor on ``device`` with the sums in :data:`SUM_FIELDS` order (summable across ranks).
    """
    k = min(5, model.num_classes)
    sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=device)
    total = None
    if progress is not None and isinstance(batches, Sized):
        total = len(batches) if limit_batches is None else min(limit_batches, len(batches))
    if total is not None:
        progress(0, total)
    with model_guard(model):
        for index, (images, targets) in enumerate(batches):
            if limit_batches is not None and index >= limit_batches:
                break
            images = images.to(device, non_blocking=True)  # run channels-last by the model itself
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
            if total is not None:
                progress(index + 1, total)
    return sums


def summarize_sums(sums: torch.Tensor, num_classes: int) -> dict:
    """Turn :func:`evaluation_sums` totals into averages: loss, and top-1/top-k accuracy (0..1) of each head."""
    values = dict(zip(SUM_FIELDS, sums.detach().cpu().tolist(), strict=True))
    n = int(values["n"])
    if n == 0:
        raise DatasetError("no samples were evaluated (empty test split?)")
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
    progress: Progress | None = None,
) -> dict:
    """Top-1/top-5 of the FC head and the MC head (CCMP of unmasked F, pooled as L_dis was trained), and the FC-head CE loss.

    Args:
        model: an MCModel (already on ``device``).
        loader: batches of (images, 0-based labels).
        device: where the batches are sent.
        amp: bf16 autocast on CUDA.
        limit_batches: stop after this many batches.
        progress: called as ``(batches done, batches in total)`` (see :func:`evaluation_sums`).

    Returns:
        ``{"n", "topk", "loss", "fc_top1", "fc_top5", "mc_top1", "mc_top5"}``; accuracies in 0..1;
        ``topk`` is 5, or the class count when there are fewer classes.
    """
    check_callback(progress)
    device = torch.device(device)
    sums = evaluation_sums(model, loader, device, amp=amp, limit_batches=limit_batches, progress=progress)
    return summarize_sums(sums, model.num_classes)


def format_report(result: dict, checkpoint: str, num_classes: int) -> str:
    """The table of :func:`evaluate`'s result: a header line naming ``checkpoint``, then one row per head."""
    k = result["topk"]
    lines = [
        f"{checkpoint}: {result['n']} test images, {num_classes} classes, FC-head loss {result['loss']:.4f}",
        f"{'head':<8} {'top-1':>8} {f'top-{k}':>8}",
        f"{'FC':<8} {100 * result['fc_top1']:>7.2f}% {100 * result['fc_top5']:>7.2f}%",
        f"{'MC':<8} {100 * result['mc_top1']:>7.2f}% {100 * result['mc_top5']:>7.2f}%",
    ]
    return "\n".join(lines)
