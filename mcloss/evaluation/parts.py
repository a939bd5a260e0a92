"""`mcloss parts`: do a class's channels land on distinct object parts, and are the maps faithful?

For every image of a CUB-layout split with part keypoints, the TRUE class's channel group is scored:

* **Localization.** Each channel's peak (argmax cell centre, in original pixels) is matched to its nearest
  visible keypoint; it *hits* when within ``radius × max(width, height)`` of the original image (the
  reference size is configurable, see :mod:`mcloss.metrics`). Reported: hit rate over all peaks, distinct
  parts hit per group (0..ξ), separated parts per group (the same, with parts whose keypoints are less than
  two radii apart merged: head, crest and beak are often one location at this radius), the channel × part
  matrix of nearest-part assignments, and the mean pairwise IoU of the channels' top-k % masks (at feature
  resolution). The same is done for the Grad-CAM peak (one per image) and for a chance baseline of ξ
  uniform random points in the part of the image the network sees, seeded per image. A channel (or
  Grad-CAM map) that is zero everywhere has no peak and counts as a miss. Images without any visible keypoint count for accuracy and faithfulness only.
* **Faithfulness.** Deletion and insertion curves for the CCMP map, the Grad-CAM map and a random map
  (uniform noise at feature resolution, seeded): each map is upsampled bilinearly to the input
  resolution, pixels are ranked by decreasing saliency (ties in random order), and at each of ``steps``
  equal steps a further 1/steps of the input's pixels is deleted (replaced by the baseline) or inserted
  (taken from the image, starting from the baseline). The baseline is, by default, the input blurred by a
  Gaussian of σ = max(H, W)/45 (≈ 5 px at 224), or with ``baseline="mean"`` the normalization mean (0 in
  the normalized tensor). The curve is the FC-head softmax probability of the true class; its area by the
  trapezoid rule over the deleted/inserted fraction [0, 1] is the AUC: lower deletion AUC and higher
  insertion AUC mean a more faithful map. All step images of one image go through the model in one batch.

Outputs (``--out``, default ``runs/parts-<timestamp>``): per_image.csv, summary.csv, summary.md,
summary.json, config.json, channel_part_matrix.png, hit_rate.png, deletion_insertion.png.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF
from tqdm import tqdm

from mcloss.core.checkpoint import CheckpointError, load_checkpoint
from mcloss.core.device import autocast, resolve_device
from mcloss.core.model import MCModel
from mcloss.data.datasets import class_mismatch
from mcloss.data.io import ImageLoadError, atomic_path, atomic_write_json, atomic_write_text, load_image
from mcloss.evaluation import metrics as M
from mcloss.explainability.explanation import Explanation, GroupMaps, explain
from mcloss.explainability.export import DEFAULT_CHECKPOINT

__all__ = [
    "METHODS",
    "BASELINES",
    "PER_IMAGE_COLUMNS",
    "SUMMARY_COLUMNS",
    "OUTPUT_FILES",
    "PartsResult",
    "evaluate_parts",
    "run_parts",
    "score_group",
    "perturbation_curves",
    "baseline_input",
    "summary_table",
    "write_outputs",
    "main",
]

#: The rows of the summary: the true class's channels (CCMP map for faithfulness), Grad-CAM, random.
METHODS = ("channels", "gradcam", "random")
METHOD_LABELS = {"channels": "channels (CCMP)", "gradcam": "Grad-CAM", "random": "random"}
METHOD_COLORS = {"channels": "tab:blue", "gradcam": "tab:orange", "random": "tab:gray"}
#: What deleted pixels become: a blurred copy of the input, or the normalization mean.
BASELINES = ("blur", "mean")
OUTPUT_FILES = (
    "per_image.csv",
    "summary.csv",
    "summary.md",
    "summary.json",
    "config.json",
    "channel_part_matrix.png",
    "hit_rate.png",
    "deletion_insertion.png",
)
PER_IMAGE_COLUMNS = (
    "image_id",
    "path",
    "label",
    "pred_fc",
    "pred_mc",
    "prob_fc",
    "width",
    "height",
    "radius_px",
    "visible_parts",
    "channels",
    "channel_hits",
    "channel_distinct",
    "channel_separated",
    "channel_parts",
    "channel_distances",
    "overlap",
    "gradcam_hit",
    "gradcam_part",
    "gradcam_distance",
    "random_hits",
    "random_distinct",
    "random_separated",
    "deletion_auc_channels",
    "insertion_auc_channels",
    "deletion_auc_gradcam",
    "insertion_auc_gradcam",
    "deletion_auc_random",
    "insertion_auc_random",
)
SUMMARY_COLUMNS = (
    "method", "peaks", "hit_rate", "distinct_parts", "separated_parts", "overlap", "deletion_auc", "insertion_auc"
)


@dataclass
class PartsResult:
    """What :func:`run_parts` measured.

    Attributes:
        summary: the aggregate numbers (what :func:`evaluate_parts` returns; JSON-friendly).
        per_image: one row per evaluated image (keys :data:`PER_IMAGE_COLUMNS`).
        curves: method → (deletion [N, steps+1], insertion [N, steps+1]) probabilities, or empty.
    """

    summary: dict
    per_image: list[dict] = field(default_factory=list)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- per image


def score_group(
    group: GroupMaps,
    keypoints: np.ndarray,
    radius_px: float,
    random_xy: np.ndarray,
    topk_percent: float = 10.0,
) -> dict:
    """Localization scores of one image's target group against its keypoints.

    Args:
        group: the target class's maps (peaks in original pixels).
        keypoints: [P, 3] (x, y, visible) in original pixels.
        radius_px: hit radius in original pixels.
        random_xy: [n, 2] chance-baseline points in original pixels.
        topk_percent: size of each channel's top-k % mask for the overlap.

    Returns:
        ``channel_parts``/``channel_distances``/``channel_hits`` [ξ] (part −1 = no peak or no visible part),
        ``channel_distinct``, ``channel_separated`` (distinct parts with overlapping hit disks merged),
        ``overlap`` (NaN when undefined), ``gradcam_part``/``gradcam_distance``/``gradcam_hit``,
        ``random_parts``/``random_hits``/``random_distinct``/``random_separated``.
    """
    peaks = np.asarray(group.peaks_xy, dtype=np.float64).reshape(-1, 2).copy()
    peaks[np.asarray(group.peak_values).ravel() <= 0] = np.nan  # a dead channel has no peak
    parts, dist = M.nearest_keypoints(peaks, keypoints)
    hits = M.hit_mask(dist, radius_px)
    masks = np.stack([M.topk_mask(c, topk_percent) for c in group.channels])

    gc_xy = np.full((1, 2), np.nan)
    if group.gradcam is not None and group.gradcam_peak_xy is not None and float(np.max(group.gradcam)) > 0:
        gc_xy = np.asarray(group.gradcam_peak_xy, dtype=np.float64).reshape(1, 2)
    gc_part, gc_dist = M.nearest_keypoints(gc_xy, keypoints)
    gc_hit = M.hit_mask(gc_dist, radius_px)

    rnd_parts, rnd_dist = M.nearest_keypoints(random_xy, keypoints)
    rnd_hits = M.hit_mask(rnd_dist, radius_px)
    return {
        "channel_parts": parts,
        "channel_distances": dist,
        "channel_hits": hits,
        "channel_distinct": M.distinct_parts(parts, hits),
        "channel_separated": M.separated_parts(parts, hits, keypoints, radius_px),
        "overlap": M.mean_pairwise_iou(masks),
        "gradcam_part": int(gc_part[0]),
        "gradcam_distance": float(gc_dist[0]),
        "gradcam_hit": bool(gc_hit[0]),
        "random_parts": rnd_parts,
        "random_hits": rnd_hits,
        "random_distinct": M.distinct_parts(rnd_parts, rnd_hits),
        "random_separated": M.separated_parts(rnd_parts, rnd_hits, keypoints, radius_px),
    }


def baseline_input(x: torch.Tensor, baseline: str = "blur") -> torch.Tensor:
    """The "nothing here" input for deletion/insertion: ``x`` [3, H, W] blurred, or zeros (the mean)."""
    if baseline == "mean":
        return torch.zeros_like(x)
    if baseline != "blur":
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    h, w = x.shape[-2:]
    sigma = max(h, w) / 45.0
    kernel = 2 * math.ceil(2 * sigma) + 1
    kernel = max(1, min(kernel, 2 * min(h, w) - 1))  # reflect padding needs kernel // 2 < side
    return TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])


@torch.no_grad()
def perturbation_curves(
    model: MCModel,
    x: torch.Tensor,
    target: int,
    saliencies: Sequence[np.ndarray],
    *,
    steps: int = 16,
    baseline: str = "blur",
    rng: np.random.Generator | None = None,
    max_batch: int = 128,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves of several saliency maps for one input.

    Args:
        model: the classifier (eval mode, on the device of ``x``).
        x: [3, H, W] normalized input.
        target: class whose FC-head softmax probability is measured.
        saliencies: maps [h, w] covering the input (any resolution; upsampled bilinearly to H×W).
        steps: number of equal steps from 0 to all pixels.
        baseline: ``"blur"`` or ``"mean"`` (see :func:`baseline_input`).
        rng: breaks saliency ties (by flat index when None).
        max_batch: most step images per forward pass (all of them in one batch when they fit).
        amp: bf16 autocast on CUDA.

    Returns:
        (deletion, insertion): [len(saliencies), steps + 1] float64 probabilities at fractions
        0, 1/steps, …, 1.
    """
    h, w = x.shape[-2:]
    base = baseline_input(x, baseline)
    masks = []
    for sal in saliencies:
        s = torch.as_tensor(np.asarray(sal, dtype=np.float32))[None, None]
        up = F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
        masks.append(M.perturbation_masks(M.saliency_rank(up, rng), steps))
    m = torch.from_numpy(np.concatenate(masks)).to(x.device)[:, None]  # [n·(S+1), 1, H, W]
    deleted = torch.where(m, base, x)
    inserted = torch.where(m, x, base)
    batch = torch.cat([deleted, inserted])
    probs = []
    for start in range(0, len(batch), max(1, int(max_batch))):
        with autocast(x.device, enabled=amp):
            logits = model(batch[start : start + max_batch])
        probs.append(torch.softmax(logits.float(), dim=1)[:, target])
    p = torch.cat(probs).double().cpu().numpy().reshape(2, len(saliencies), steps + 1)
    return p[0], p[1]


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class _Item:
    image_id: int
    path: Path
    label: int
    keypoints: np.ndarray


def _items(dataset: Any) -> list[_Item]:
    out = []
    for rec in dataset.records:
        parts = rec.parts
        kps = np.zeros((0, 3)) if parts is None else np.asarray(parts, dtype=np.float64).reshape(-1, 3)
        out.append(_Item(int(rec.image_id), Path(rec.path), int(rec.label), kps))
    return out


def _open_dataset(dataset_or_root: Any, split: str) -> Any:
    if hasattr(dataset_or_root, "records"):
        return dataset_or_root
    from mcloss.data.cub import CUBDataset

    root = Path(dataset_or_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset directory not found")
    return CUBDataset(root, split, with_parts=True)


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_parts(model: MCModel, dataset_or_root: Any, **kwargs: Any) -> dict:
    """Part-localization and faithfulness summary of ``model`` on a CUB-layout split with part keypoints.

    Takes the same keyword arguments as :func:`run_parts`; returns its ``summary`` (JSON-friendly: rows
    ``channels``/``gradcam``/``random`` with hit rate, distinct parts, overlap and deletion/insertion AUC,
    the channel × part matrix, part histograms, mean curves and both heads' top-1; undefined values,
    e.g. the overlap of Grad-CAM or AUCs without ``faithfulness``, are None).
    """
    return run_parts(model, dataset_or_root, **kwargs).summary


def run_parts(
    model: MCModel,
    dataset_or_root: Any,
    *,
    split: str = "test",
    radius: float = 0.12,
    size_reference: str = "max",
    topk_percent: float = 10.0,
    steps: int = 16,
    baseline: str = "blur",
    faithfulness: bool = True,
    limit: int | None = None,
    batch_size: int = 16,
    perturbation_batch: int = 128,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> PartsResult:
    """Score the true class's channel group of every image (see the module docstring).

    Args:
        model: an MCModel; it is moved to ``device`` and put in eval mode (its mode is restored after).
        dataset_or_root: a CUB-layout directory, or a :class:`mcloss.data.CUBDataset` (any object with
            ``records`` having image_id, path, label and parts [P, 3] in original pixels, ``class_names``
            and ``part_names``).
        split: ``"test"``, ``"train"`` or ``"all"`` (only used with a directory).
        radius: hit radius as a fraction of the image size.
        size_reference: image size for the radius: ``"max"`` (max(w, h)), ``"sqrt-area"`` or ``"diagonal"``.
        topk_percent: top-k % of each channel's pixels for the overlap masks.
        steps: deletion/insertion steps.
        baseline: ``"blur"`` or ``"mean"``.
        faithfulness: compute deletion/insertion (the slow part).
        limit: evaluate only the first ``limit`` images.
        batch_size: images per explain pass.
        perturbation_batch: most step images per forward pass.
        device: where to run (default: the model's device).
        seed: seeds the random baseline (per image: ``(seed, image_id)``).
        progress: show a progress bar.

    Raises:
        ValueError: bad arguments, classes that do not match the model, no keypoints, no images.
    """
    _check_arguments(radius, size_reference, topk_percent, steps, baseline, limit, batch_size, seed)
    dataset = _open_dataset(dataset_or_root, split)
    mismatch = class_mismatch(getattr(dataset, "class_names", model.class_names), model.class_names)
    if mismatch:
        raise ValueError(mismatch)
    part_names = list(getattr(dataset, "part_names", []) or [])
    items = _items(dataset)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ValueError("no images to evaluate (empty split)")
    num_parts = len(part_names) or max(len(it.keypoints) for it in items)
    if num_parts == 0 or all(len(it.keypoints) == 0 for it in items):
        raise ValueError("the dataset has no part keypoints (parts/parts.txt, parts/part_locs.txt)")
    part_names = part_names or [f"part_{i}" for i in range(num_parts)]

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    amp = dev.type == "cuda"
    was_training = model.training
    model.to(dev).eval()
    rows: list[dict] = []
    scores: list[dict] = []
    skipped: list[dict] = []
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m: [] for m in METHODS}
    bar = tqdm(total=len(items), desc="parts", unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, len(items), batch_size):
            chunk, images = [], []
            for it in items[start : start + batch_size]:
                try:
                    images.append(load_image(it.path))
                    chunk.append(it)
                except ImageLoadError as exc:
                    skipped.append({"image_id": it.image_id, "path": str(it.path), "reason": str(exc)})
                    print(f"mcloss parts: skipped {exc}", file=sys.stderr)
            if not chunk:
                bar.update(len(items[start : start + batch_size]))
                continue
            explanations = explain(
                model, images, [it.label for it in chunk], labels=[it.label for it in chunk], gradcam=True, device=dev
            )
            for it, image, ex in zip(chunk, images, explanations, strict=True):
                row, score, curve = _evaluate_one(
                    model, it, image, ex, part_names, radius, size_reference, topk_percent, steps, baseline,
                    faithfulness, perturbation_batch, dev, amp, seed,
                )  # fmt: skip
                rows.append(row)
                scores.append(score)
                for method, pair in curve.items():
                    curves[method].append(pair)
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if not rows:
        raise ValueError(f"none of the {len(items)} images could be read")

    stacked = {m: (np.stack([c[0] for c in cs]), np.stack([c[1] for c in cs])) for m, cs in curves.items() if cs}
    config = {
        "split": split,
        "radius": radius,
        "size_reference": size_reference,
        "topk_percent": topk_percent,
        "steps": steps,
        "baseline": baseline,
        "faithfulness": faithfulness,
        "limit": limit,
        "seed": seed,
    }
    summary = _summarize(rows, scores, stacked, part_names, model, config, skipped)
    return PartsResult(summary, rows, stacked)


def _check_arguments(
    radius: float, size_reference: str, topk: float, steps: int, baseline: str, limit: int | None, batch: int, seed: int
) -> None:
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    if size_reference not in M.SIZE_REFERENCES:
        raise ValueError(f"size reference must be one of {', '.join(M.SIZE_REFERENCES)}, got {size_reference!r}")
    if not 0 < topk <= 100:
        raise ValueError(f"top-k percent must be in (0, 100], got {topk}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _evaluate_one(
    model: MCModel,
    item: _Item,
    image: Any,
    ex: Explanation,
    part_names: Sequence[str],
    radius: float,
    size_reference: str,
    topk_percent: float,
    steps: int,
    baseline: str,
    faithfulness: bool,
    perturbation_batch: int,
    dev: torch.device,
    amp: bool,
    seed: int,
) -> tuple[dict, dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    group = ex.groups[0]
    width, height = ex.image_size
    radius_px = M.hit_radius(width, height, radius, size_reference)
    rng = np.random.default_rng([seed, item.image_id])
    corners = ex.geometry.to_original(np.array([[0.0, 0.0], [ex.geometry.crop[2], ex.geometry.crop[3]]]))
    box = (max(0.0, corners[0, 0]), max(0.0, corners[0, 1]), min(width, corners[1, 0]), min(height, corners[1, 1]))
    xi = len(group.channels)
    random_xy = M.random_points(rng, xi, box)
    random_map = rng.random(ex.feature_hw)
    score = score_group(group, item.keypoints, radius_px, random_xy, topk_percent)
    visible = int((item.keypoints[:, 2] > 0).sum()) if len(item.keypoints) else 0
    score["scored"] = visible > 0
    score["xi"] = xi

    row: dict[str, Any] = {
        "image_id": item.image_id,
        "path": str(item.path),
        "label": item.label,
        "pred_fc": ex.prediction,
        "pred_mc": ex.prediction_mc,
        "prob_fc": float(ex.probs_fc[item.label]),
        "width": width,
        "height": height,
        "radius_px": radius_px,
        "visible_parts": visible,
        "channels": xi,
        "overlap": score["overlap"],
    }
    if visible:
        row.update(
            channel_hits=int(score["channel_hits"].sum()),
            channel_distinct=score["channel_distinct"],
            channel_separated=score["channel_separated"],
            channel_parts=";".join(_part_name(part_names, p) for p in score["channel_parts"]),
            channel_distances=";".join(format(d, ".4g") for d in score["channel_distances"]),
            gradcam_hit=int(score["gradcam_hit"]),
            gradcam_part=_part_name(part_names, score["gradcam_part"]),
            gradcam_distance=score["gradcam_distance"],
            random_hits=int(score["random_hits"].sum()),
            random_distinct=score["random_distinct"],
            random_separated=score["random_separated"],
        )
    curve: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if faithfulness:
        x = model.transform.apply(image, ex.geometry).to(dev)
        gradcam = group.gradcam if group.gradcam is not None else np.zeros(ex.feature_hw, np.float32)
        maps = {"channels": group.ccmp, "gradcam": gradcam, "random": random_map}
        deletion, insertion = perturbation_curves(
            model, x, item.label, list(maps.values()), steps=steps, baseline=baseline, rng=rng,
            max_batch=perturbation_batch, amp=amp,
        )  # fmt: skip
        fractions = M.step_fractions(steps)
        for i, method in enumerate(maps):
            curve[method] = (deletion[i], insertion[i])
            row[f"deletion_auc_{method}"] = M.trapezoid_auc(deletion[i], fractions)
            row[f"insertion_auc_{method}"] = M.trapezoid_auc(insertion[i], fractions)
    return row, score, curve


def _part_name(part_names: Sequence[str], index: int) -> str:
    return part_names[int(index)] if index >= 0 else "-"


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def _summarize(
    rows: list[dict],
    scores: list[dict],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    part_names: list[str],
    model: MCModel,
    config: dict,
    skipped: list[dict],
) -> dict:
    num_parts = len(part_names)
    scored = [s for s in scores if s["scored"]]
    xi_max = max(s["xi"] for s in scores)
    ch_hits = np.concatenate([s["channel_hits"] for s in scored]) if scored else np.zeros(0, bool)
    rnd_hits = np.concatenate([s["random_hits"] for s in scored]) if scored else np.zeros(0, bool)
    ch_parts = [s["channel_parts"] for s in scored]
    matrix = M.channel_part_matrix(ch_parts, num_parts, xi_max)
    matrix_hits = M.channel_part_matrix(
        [np.where(s["channel_hits"], s["channel_parts"], -1) for s in scored], num_parts, xi_max
    )
    gc_parts = np.array([s["gradcam_part"] for s in scored], dtype=np.int64)
    gc_hits = np.array([s["gradcam_hit"] for s in scored], dtype=bool)
    methods: dict[str, dict] = {
        "channels": {
            "peaks": int(ch_hits.size),
            "hit_rate": M.hit_rate(ch_hits),
            "distinct_parts": _nanmean([s["channel_distinct"] for s in scored]),
            "separated_parts": _nanmean([s["channel_separated"] for s in scored]),
            "overlap": _nanmean([s["overlap"] for s in scores]),
            "part_histogram": M.part_histogram(np.concatenate(ch_parts) if ch_parts else [], num_parts).tolist(),
        },
        "gradcam": {
            "peaks": int(gc_hits.size),
            "hit_rate": M.hit_rate(gc_hits),
            "distinct_parts": _nanmean([float(h) for h in gc_hits]),
            "separated_parts": _nanmean([float(h) for h in gc_hits]),
            "overlap": float("nan"),
            "part_histogram": M.part_histogram(gc_parts, num_parts).tolist(),
        },
        "random": {
            "peaks": int(rnd_hits.size),
            "hit_rate": M.hit_rate(rnd_hits),
            "distinct_parts": _nanmean([s["random_distinct"] for s in scored]),
            "separated_parts": _nanmean([s["random_separated"] for s in scored]),
            "overlap": float("nan"),
            "part_histogram": M.part_histogram(
                np.concatenate([s["random_parts"] for s in scored]) if scored else [], num_parts
            ).tolist(),
        },
    }
    fractions = M.step_fractions(config["steps"]).tolist()
    mean_curves: dict[str, dict] = {}
    for method in METHODS:
        if method in curves:
            methods[method]["deletion_auc"] = _nanmean([r[f"deletion_auc_{method}"] for r in rows])
            methods[method]["insertion_auc"] = _nanmean([r[f"insertion_auc_{method}"] for r in rows])
            mean_curves[method] = {
                "deletion": curves[method][0].mean(axis=0).tolist(),
                "insertion": curves[method][1].mean(axis=0).tolist(),
            }
        else:
            methods[method]["deletion_auc"] = float("nan")
            methods[method]["insertion_auc"] = float("nan")
    n = len(rows)
    summary = {
        "format": "mcloss-parts/1",
        "images": n,
        "scored_images": len(scored),
        "skipped_images": skipped,
        "classes": model.num_classes,
        "channels_per_group": sorted({s["xi"] for s in scores}),
        "part_names": part_names,
        "top1_fc": sum(r["pred_fc"] == r["label"] for r in rows) / n,
        "top1_mc": sum(r["pred_mc"] == r["label"] for r in rows) / n,
        "hit_radius": f"{config['radius']} × {_SIZE_TEXT[config['size_reference']]} of the original image",
        "methods": methods,
        "channel_part_matrix": matrix.tolist(),
        "channel_part_matrix_normalized": M.normalize_rows(matrix).tolist(),
        "channel_part_hits": matrix_hits.tolist(),
        "curves": {"fractions": fractions, **mean_curves} if mean_curves else {},
        "config": config,
    }
    return _json_safe(summary)


_SIZE_TEXT = {"max": "max(width, height)", "sqrt-area": "sqrt(width · height)", "diagonal": "the diagonal"}


def _json_safe(obj: Any) -> Any:
    """NaN → None, numpy scalars → Python, recursively."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


# --------------------------------------------------------------------------------------------- outputs


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def summary_table(summary: dict) -> str:
    """The markdown table: one row per method (channels, Grad-CAM, random), then both heads' top-1."""
    xi = "/".join(str(x) for x in summary["channels_per_group"])
    lines = [
        f"| maps | peaks | hit rate | distinct parts per group (of {xi}) | separated parts per group "
        "| overlap (top-k IoU) | deletion AUC ↓ | insertion AUC ↑ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        m = summary["methods"][method]
        lines.append(
            f"| {METHOD_LABELS[method]} | {m['peaks']} | {_fmt(m['hit_rate'])} | {_fmt(m['distinct_parts'], 2)} "
            f"| {_fmt(m.get('separated_parts'), 2)} | {_fmt(m['overlap'])} | {_fmt(m['deletion_auc'])} "
            f"| {_fmt(m['insertion_auc'])} |"
        )
    lines += [
        "",
        f"{summary['images']} images ({summary['scored_images']} with visible parts); "
        f"top-1 FC head {summary['top1_fc']:.3f}, MC head {summary['top1_mc']:.3f}; "
        f"hit radius {summary['hit_radius']}. Separated parts count hit parts whose keypoints are less than "
        "two hit radii apart (a peak between them could hit either) as one.",
    ]
    return "\n".join(lines)


def _csv_text(columns: Sequence[str], rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        out = []
        for c in columns:
            v = row.get(c)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                out.append("")
            elif isinstance(v, float):
                out.append(format(v, ".6g"))
            else:
                out.append(str(v))
        writer.writerow(out)
    return buf.getvalue()


def write_outputs(result: PartsResult, out_dir: str | Path, run_config: dict | None = None) -> list[Path]:
    """Write every output file of a parts run atomically into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary
    atomic_write_text(out / "per_image.csv", _csv_text(PER_IMAGE_COLUMNS, result.per_image))
    summary_rows = [{"method": m, **summary["methods"][m]} for m in METHODS]
    atomic_write_text(out / "summary.csv", _csv_text(SUMMARY_COLUMNS, summary_rows))
    atomic_write_text(out / "summary.md", "# Part localization and faithfulness\n\n" + summary_table(summary) + "\n")
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "config.json", run_config if run_config is not None else summary["config"])
    _plot_matrix(summary, out / "channel_part_matrix.png")
    _plot_hit_rate(summary, out / "hit_rate.png")
    _plot_curves(summary, out / "deletion_insertion.png")
    return [out / name for name in OUTPUT_FILES]


def _figure(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=100)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _plot_matrix(summary: dict, path: Path) -> None:
    counts = np.asarray(summary["channel_part_matrix"], dtype=np.int64)
    rows = np.asarray(summary["channel_part_matrix_normalized"], dtype=np.float64)
    parts = summary["part_names"]
    fig = _figure((max(5.0, 0.6 * len(parts) + 2.5), max(2.5, 0.45 * len(rows) + 1.8)))
    ax = fig.subplots()
    image = ax.imshow(rows, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    if rows.size and rows.size <= 400:
        for (i, j), c in np.ndenumerate(counts):
            ax.text(j, i, str(c), ha="center", va="center", fontsize=7, color="white" if rows[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(parts)), parts, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"ch {i}" for i in range(len(rows))], fontsize=8)
    ax.set_xlabel("nearest visible part")
    ax.set_ylabel("channel within the true class's group")
    ax.set_title("How often each channel's peak is nearest each part (row-normalized; counts)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    _save(fig, path)


def _plot_hit_rate(summary: dict, path: Path) -> None:
    fig = _figure((9.0, 3.6))
    ax_hit, ax_dist = fig.subplots(1, 2)
    labels = [METHOD_LABELS[m] for m in METHODS]
    colors = [METHOD_COLORS[m] for m in METHODS]
    methods = summary["methods"]
    hit = [np.nan if methods[m]["hit_rate"] is None else methods[m]["hit_rate"] for m in METHODS]
    ax_hit.bar(labels, hit, color=colors)
    if methods["random"]["hit_rate"] is not None:
        ax_hit.axhline(methods["random"]["hit_rate"], color="k", ls="--", lw=1, label="random (chance)")
        ax_hit.legend(fontsize=8)
    ax_hit.set_ylim(0, 1)
    ax_hit.set_ylabel("peaks within the hit radius")
    ax_hit.set_title(f"hit rate (radius {summary['hit_radius']})", fontsize=8)
    dist = [np.nan if methods[m]["distinct_parts"] is None else methods[m]["distinct_parts"] for m in ("channels", "random")]
    ax_dist.bar([labels[0], labels[2]], dist, color=[colors[0], colors[2]])
    ax_dist.set_ylim(0, max(summary["channels_per_group"]))
    ax_dist.set_ylabel("distinct parts hit per group")
    ax_dist.set_title("distinct parts per group", fontsize=8)
    for ax in (ax_hit, ax_dist):
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def _plot_curves(summary: dict, path: Path) -> None:
    fig = _figure((9.0, 3.6))
    axes = fig.subplots(1, 2)
    curves = summary.get("curves") or {}
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for method in METHODS:
            if method in curves:
                auc = summary["methods"][method][f"{kind}_auc"]
                ax.plot(
                    curves["fractions"], curves[method][kind], marker=".", color=METHOD_COLORS[method],
                    label=f"{METHOD_LABELS[method]} (AUC {_fmt(auc)})",
                )  # fmt: skip
        ax.set_xlabel(f"fraction of pixels {'deleted' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("true-class probability (FC head)")
        ax.set_ylim(0, 1)
        ax.set_title(f"{kind} ({'lower' if kind == 'deletion' else 'higher'} AUC = more faithful)", fontsize=8)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)


# ------------------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcloss parts",
        description="Part-localization (channel peaks vs part keypoints) and faithfulness (deletion/insertion) "
        "metrics of the true class's channel group, against Grad-CAM and a random baseline.",
    )
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help=f"mcloss checkpoint (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--data", required=True, help="CUB-layout dataset root with parts/part_locs.txt")
    p.add_argument("--split", default="test", choices=["test", "train", "all"])
    p.add_argument("--radius", type=float, default=0.12, help="hit radius as a fraction of the image size (default 0.12)")
    p.add_argument(
        "--size-reference",
        default="max",
        choices=list(M.SIZE_REFERENCES),
        help="image size for the radius: max(w, h) (default), sqrt(w·h) or the diagonal, of the original image",
    )
    p.add_argument("--topk-percent", type=float, default=10.0, help="top-k %% mask per channel for the overlap")
    p.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    p.add_argument("--baseline", default="blur", choices=list(BASELINES), help="deleted pixels become: blur (default) or mean")
    p.add_argument("--no-faithfulness", action="store_true", help="skip deletion/insertion (much faster on a CPU)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--batch-size", type=int, default=16, help="images per explain pass")
    p.add_argument("--perturbation-batch", type=int, default=128, help="most step images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", help="output directory (default runs/parts-<timestamp>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baselines")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier parts run in --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the part metrics on a checkpoint and a CUB-layout split; prints the markdown summary table."""
    args = _parser().parse_args(argv)
    out = Path(args.out) if args.out else Path("runs") / f"parts-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        print(f"mcloss parts: --out {out}: exists and is not a directory", file=sys.stderr)
        return 2
    if (out / "summary.json").exists() and not args.overwrite:
        print(f"mcloss parts: --out {out}: already holds a parts run; pass --overwrite or choose another --out", file=sys.stderr)
        return 2
    try:
        _check_arguments(
            args.radius, args.size_reference, args.topk_percent, args.steps, args.baseline, args.limit,
            args.batch_size, args.seed,
        )  # fmt: skip
        if args.perturbation_batch < 1:
            raise ValueError(f"perturbation batch must be >= 1, got {args.perturbation_batch}")
    except ValueError as exc:
        print(f"mcloss parts: {exc}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
        model = load_checkpoint(args.checkpoint, device)
        result = run_parts(
            model,
            args.data,
            split=args.split,
            radius=args.radius,
            size_reference=args.size_reference,
            topk_percent=args.topk_percent,
            steps=args.steps,
            baseline=args.baseline,
            faithfulness=not args.no_faithfulness,
            limit=args.limit,
            batch_size=args.batch_size,
            perturbation_batch=args.perturbation_batch,
            device=device,
            seed=args.seed,
            progress=sys.stderr.isatty(),
        )
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        message = str(exc)
        if not message.startswith((str(args.data), str(args.checkpoint), "--")):
            message = f"{args.data}: {message}"
        print(f"mcloss parts: {message}", file=sys.stderr)
        return 2
    run_config = {
        "command": "mcloss parts " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "data": str(Path(args.data).resolve()),
        "device": str(device),
        "batch_size": args.batch_size,
        "perturbation_batch": args.perturbation_batch,
        **result.summary["config"],
        "hit_radius": result.summary["hit_radius"],
    }
    try:
        write_outputs(result, out, run_config)
    except OSError as exc:
        print(f"mcloss parts: --out {out}: cannot write results ({exc})", file=sys.stderr)
        return 2
    print(summary_table(result.summary))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
