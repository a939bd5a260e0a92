"""Fit, calibrate and measure a model's domain check (:mod:`mcloss.core.domain`).

- :func:`fit_domain`: the bank is the domain vectors of (at most ``bank_size``, a seeded sample of) the
  training images, read with the eval transform; the threshold is the ``quantile`` of the scores of held-out
  in-domain images (the test split), so that that share of them passes. The check is attached to the model.
- :func:`domain_auroc`: how well the score separates in-domain from out-of-domain images, as the area under
  the ROC curve (the probability that an out-of-domain image scores higher than an in-domain one, ties
  half), with a percentile-bootstrap interval; and the share of each set the threshold passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mcloss.core.device import autocast
from mcloss.core.domain import DOMAIN_K, DOMAIN_POOL_SHARE, DOMAIN_QUANTILE, DomainCheck, domain_features
from mcloss.core.errors import DatasetError, ParameterError, Progress, check_callback
from mcloss.core.model import MCModel, model_guard
from mcloss.data.io import ImageLoadError, load_image

__all__ = ["DOMAIN_BANK", "auroc", "domain_auroc", "fit_domain", "image_scores", "split_scores"]

#: Most training vectors kept in the bank (a seeded sample beyond that).
DOMAIN_BANK = 4096


def _vectors(
    model: MCModel, batches: Iterable, device: torch.device, pool_share: float, progress: Progress | None, total: int
) -> torch.Tensor:
    """[N, K] domain vectors of every batch of ``(images, labels)``, on the CPU."""
    out = []
    done = 0
    with model_guard(model, freeze=True), torch.no_grad():
        for images, _ in batches:
            with autocast(device, enabled=device.type == "cuda"):
                feats = model.forward_features(images.to(device, non_blocking=True))
            out.append(domain_features(feats.float(), pool_share).cpu())
            done += len(images)
            if progress is not None:
                progress(done, total)
    if not out:
        raise DatasetError("no images to read the domain statistics from (empty split)")
    return torch.cat(out)


def _checked(model: MCModel) -> DomainCheck:
    if model.domain is None:
        raise ParameterError("the model has no domain check (domain statistics); fit one first", parameter="model")
    return model.domain


def _batch_scores(model: MCModel, images: torch.Tensor, device: torch.device) -> np.ndarray:
    """The domain scores of one batch of preprocessed images, from one forward pass."""
    with model_guard(model, freeze=True), torch.no_grad(), autocast(device, enabled=device.type == "cuda"):
        feats = model.forward_features(images.to(device))
    return _checked(model).scores(feats.float()).cpu().numpy()


def _joined(scores: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(scores) if scores else np.zeros(0)


def split_scores(model: MCModel, dataset: Dataset, *, batch_size: int = 64, workers: int = 0,
                 device: torch.device | None = None) -> np.ndarray:  # fmt: skip
    """The domain score of every image of a dataset of ``(image tensor, label)`` (the model needs a check)."""
    _checked(model)
    dev = device or next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    return _joined([_batch_scores(model, images, dev) for images, _ in loader])


def image_scores(model: MCModel, paths: Sequence[str | Path], *, batch_size: int = 32) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The domain scores of image files (EXIF-rotated, read safely), and (file, reason) of those skipped."""
    _checked(model)
    dev = next(model.parameters()).device
    scores, skipped, batch = [], [], []
    for path in paths:
        try:
            batch.append(model.transform(load_image(path)))
        except ImageLoadError as exc:
            skipped.append((str(path), str(exc)))
        if len(batch) == batch_size:
            scores.append(_batch_scores(model, torch.stack(batch), dev))
            batch.clear()
    if batch:
        scores.append(_batch_scores(model, torch.stack(batch), dev))
    return _joined(scores), skipped


def fit_domain(
    model: MCModel,
    train: Dataset,
    held_out: Dataset,
    *,
    k: int = DOMAIN_K,
    quantile: float = DOMAIN_QUANTILE,
    bank_size: int = DOMAIN_BANK,
    pool_share: float = DOMAIN_POOL_SHARE,
    batch_size: int = 64,
    workers: int = 0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    source: str | None = None,
) -> dict:
    """Fit the domain check on ``train`` and calibrate its threshold on ``held_out``, then attach it.

    Args:
        model: the model (the check is attached: ``model.domain``, ``model.config["domain"]``).
        train: ``(image tensor, label)`` items read with the eval transform: the bank's images.
        held_out: in-domain images not in ``train`` (the test split): the threshold's.
        k: the neighbour whose distance is the score.
        quantile: the share of ``held_out`` that passes.
        bank_size: most training vectors kept (a seeded sample beyond that).
        pool_share: the per-channel pool of the vectors.
        batch_size, workers: the DataLoader's.
        seed: the bank's sample.
        device: where to run (default: the model's device).
        progress: called as ``(images done, images in total)`` over both sets.
        source: where the images came from, for the record.

    Returns:
        The calibration record (also ``model.config["domain"]["calibration"]``): images, the threshold and
        the share of the held-out images that pass.
    """
    check_callback(progress)
    if not 0 < quantile < 1:
        raise ParameterError(f"quantile must be in (0, 1), got {quantile}", parameter="quantile")
    if bank_size < 1 or k < 1:
        raise ParameterError(f"bank_size and k must be >= 1, got {bank_size} and {k}", parameter=("bank_size", "k"))
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    n_train, n_held = len(train), len(held_out)
    if n_held < 20:
        raise DatasetError(f"{n_held} held-out images are too few to set a threshold (at least 20)")
    total = n_train + n_held
    picked = train
    if n_train > bank_size:
        order = np.random.default_rng(seed).permutation(n_train)[:bank_size]
        picked = torch.utils.data.Subset(train, sorted(order.tolist()))
    bank = _vectors(model, DataLoader(picked, batch_size=batch_size, num_workers=workers), dev, pool_share, progress, total)
    k = min(k, len(bank))
    check = DomainCheck(bank, float("inf"), k=k, pool_share=pool_share).to(dev)
    held = _vectors(model, DataLoader(held_out, batch_size=batch_size, num_workers=workers), dev, pool_share, None, total)
    scores = check.vector_scores(held).cpu().numpy()
    threshold = float(np.quantile(scores, quantile, method="higher"))  # at least that share passes
    calibration = {
        "method": "deep kNN: cosine distance to the k-th nearest training vector (top-pooled, log1p, unit length)",
        "bank_images": len(bank), "train_images": n_train, "held_out_images": n_held, "quantile": quantile,
        "held_out_pass": float(np.mean(scores <= threshold)), "seed": seed, "source": source,
    }  # fmt: skip
    model.set_domain(DomainCheck(bank, threshold, k=k, pool_share=pool_share, calibration=calibration).to(dev))
    if progress is not None:
        progress(total, total)
    return calibration


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an outside score > an inside score), ties counted half (the Mann-Whitney form of the ROC AUC)."""
    a, b = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    if not len(a) or not len(b):
        return float("nan")
    _, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, ties at their average rank
    r_out = ranks[len(a) :].sum()
    return float((r_out - len(b) * (len(b) + 1) / 2.0) / (len(a) * len(b)))


def domain_auroc(
    inside: np.ndarray,
    outside: np.ndarray,
    threshold: float,
    *,
    groups: Sequence[str] | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """AUROC of out-of-domain against in-domain scores with a 95 % percentile-bootstrap interval, and the
    share of each set at or below the threshold. ``groups`` (one per outside score, e.g. the source photo of
    each crop) makes the bootstrap resample whole groups, so variants of one image move together."""
    inside, outside = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    value = auroc(inside, outside)
    rng = np.random.default_rng(seed)
    keys = np.asarray(groups if groups is not None else np.arange(len(outside)).astype(str))
    names = np.unique(keys)
    members = [np.flatnonzero(keys == g) for g in names]
    draws = []
    for _ in range(resamples):
        a = inside[rng.integers(0, len(inside), len(inside))]
        b = outside[np.concatenate([members[i] for i in rng.integers(0, len(names), len(names))])]
        draws.append(auroc(a, b))
    lo, hi = np.nanpercentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
    return {
        "auroc": value, "auroc_ci": [float(lo), float(hi)], "inside": len(inside), "outside": len(outside),
        "outside_groups": len(names), "inside_pass": float(np.mean(inside <= threshold)),
        "outside_flagged": float(np.mean(outside > threshold)), "threshold": threshold,
    }  # fmt: skip
