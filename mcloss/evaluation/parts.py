"""Do a class's channels land on distinct object parts, and are the maps faithful? (``mcloss parts``)

For every image of a CUB-layout split with part keypoints, the TRUE class's channel group is scored:

* **Localization.** Each channel's peak (argmax cell centre, in original pixels) is matched to its nearest
  visible keypoint; it *hits* when within ``radius × max(width, height)`` of the original image (the
  reference size is configurable, see :mod:`mcloss.metrics.localization`). Reported: hit rate over all peaks,
  distinct parts hit per group (0..ξ), separated parts per group (the same, with parts whose keypoints are
  less than two radii apart merged: head, crest and beak are often one location at this radius), the
  channel × part matrix of nearest-part assignments, and the mean pairwise IoU of the channels' top-k %
  masks (at feature resolution). The same is done for the Grad-CAM peak (one per image) and for a chance
  baseline of ξ uniform random points in the part of the image the network sees, seeded per image. A
  channel (or Grad-CAM map) that is zero everywhere has no peak and counts as a miss. Images without any
  visible keypoint count for accuracy and faithfulness only.
* **Faithfulness.** Deletion and insertion curves (:mod:`mcloss.evaluation.faithfulness`) for the CCMP
  map, the Grad-CAM map and a random map (uniform noise at feature resolution, seeded); the curve is the
  FC-head softmax probability of the true class, and its area by the trapezoid rule over the
  deleted/inserted fraction [0, 1] is the AUC: lower deletion AUC and higher insertion AUC mean a more
  faithful map.

* **Defining parts.** When the classes' defining parts are known (the dataset's ``synth.json`` or CUB
  attribute files, else the checkpoint's card), every map of the true class — each channel, the CCMP map,
  Grad-CAM and a random map — is compared with them on the original image
  (:mod:`mcloss.metrics.mass`): the share of peaks on a part that are on a defining part, next to its
  chance level (the defining parts' share of the visible part area); the geometric mean of the mass per
  area on the defining parts ÷ that on the other visible parts (1.0 = no preference); and, where the
  dataset has part masks, the energy-based pointing game (mass inside the object and inside each part)
  and the relevance rank accuracy of the defining parts. Regions come from the part masks when there are
  any, else from the keypoints (each pixel within the hit radius of a visible keypoint belongs to the
  nearest one), both limited to the part of the image the network sees. Peaks here are the argmax of the
  map upsampled onto the original image. Classes without defining parts (the base bird) are not scored.
* **Distinct parts, counted** (``summary["defining"]["coverage"]``, :mod:`mcloss.metrics.coverage`). On the
  same images, each channel's part is the most frequent region of its peaks over the images of its class
  (background and body = no part; a tie = no part); reported per class: whether the channels' parts cover
  every defining part, how many they cover, distinct parts and the channels sharing a part, each with its
  chance (each part-holding channel's part drawn from the class's visible part-area shares).

The result and its output files are described in :mod:`mcloss.evaluation.parts_report`; images that cannot
be read are skipped and listed in the summary's ``skipped_images``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mcloss.core.errors import DatasetError, ParameterError, Progress, check_callback
from mcloss.core.files import json_safe
from mcloss.core.model import MCModel, model_guard
from mcloss.data.io import ImageLoadError, load_image
from mcloss.evaluation.annotated import AnnotatedItem, annotation, open_parts_dataset, scorable_items
from mcloss.evaluation.faithfulness import BASELINES, baseline_input, perturbation_curves
from mcloss.evaluation.parts_report import (
    METHOD_LABELS,
    METHODS,
    OUTPUT_FILES,
    PER_IMAGE_COLUMNS,
    SUMMARY_COLUMNS,
    PartsResult,
    summary_table,
    write_outputs,
)
from mcloss.explainability.defining import crop_regions
from mcloss.explainability.explanation import Explanation, GroupMaps, explain
from mcloss.explainability.geometry import to_original
from mcloss.metrics import coverage as C
from mcloss.metrics import localization as M
from mcloss.metrics import mass as W

__all__ = [
    "DEFINING_MAPS",
    "METHODS",
    "METHOD_LABELS",
    "BASELINES",
    "PER_IMAGE_COLUMNS",
    "SUMMARY_COLUMNS",
    "OUTPUT_FILES",
    "PartsResult",
    "check_arguments",
    "evaluate_parts",
    "score_group",
    "perturbation_curves",
    "baseline_input",
    "summary_table",
    "write_outputs",
]


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


# ------------------------------------------------------------------------------------------------ defining parts


#: The maps compared with the defining parts: each channel of the true class, its CCMP map, Grad-CAM, random.
DEFINING_MAPS = ("channels", "ccmp", "gradcam", "random")


def resolve_defining(
    dataset: Any, model: MCModel, part_names: Sequence[str], defining: dict[str, Sequence[str]] | None = None
) -> tuple[dict[int, list[int]], dict[str, list[str]], str | None]:
    """The defining parts of each class: the argument, else the dataset's, else the checkpoint card's.

    Returns:
        (label → 0-based part indices, class name → region names, where they came from or None).
    """
    from mcloss.data.defining import defining_indices, defining_parts

    source = "argument" if defining is not None else None
    if defining is None and getattr(dataset, "root", None) is not None:
        defining = defining_parts(dataset.root)
        source = "dataset" if defining is not None else None
    if defining is None and isinstance(model.card, dict) and isinstance(model.card.get("defining_parts"), dict):
        defining, source = model.card["defining_parts"], "checkpoint card"
    if not defining:
        return {}, {}, None
    names = {str(k): [str(r) for r in v] for k, v in defining.items()}
    by_label = {label: defining_indices(names.get(name, []), part_names) for label, name in enumerate(model.class_names)}
    return by_label, names, source


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_parts(
    model: MCModel,
    dataset_or_root: Any,
    *,
    split: str = "test",
    radius: float = M.DEFAULT_HIT_RADIUS,
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
    progress: Progress | None = None,
    defining: dict[str, Sequence[str]] | None = None,
) -> PartsResult:
    """Score the true class's channel group of every image (see the module docstring).

    Args:
        model: an MCModel; it is moved to ``device`` and put in eval mode (its mode is restored after).
        dataset_or_root: a CUB-layout directory, or a :class:`mcloss.data.cub.CUBDataset` (any object with
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
        progress: called as ``(images done, images in total)``, skipped ones included.
        defining: class name → defining regions (part names); default the dataset's, else the card's.

    Returns:
        The result: its ``summary`` is JSON-friendly (rows ``channels``/``gradcam``/``random`` with hit rate,
        distinct parts, overlap and deletion/insertion AUC, the channel × part matrix, part histograms, mean
        curves, both heads' top-1 and the defining-part block; undefined values, e.g. the overlap of Grad-CAM
        or AUCs without ``faithfulness``, are None). Images that could not be read are skipped, not raised,
        and listed (image_id, path, reason) in ``summary["skipped_images"]``.

    Raises:
        ParameterError: a bad argument (named).
        DatasetError: classes that do not match the model, no images or keypoints, no readable images.
    """
    check_arguments(radius, size_reference, topk_percent, steps, baseline, limit, batch_size, seed)
    check_callback(progress)
    dataset = open_parts_dataset(dataset_or_root, split)
    items, part_names = scorable_items(dataset, model, limit)
    defining_by_label, defining_names, defining_source = resolve_defining(dataset, model, part_names, defining)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    options = _Options(radius, size_reference, topk_percent, steps, baseline, faithfulness, perturbation_batch, seed, dev)
    tally = _Tally(len(items), progress)
    with model_guard(model):
        for start in range(0, len(items), batch_size):
            _score_batch(model, items[start : start + batch_size], dataset, part_names, defining_by_label, options, tally)
    if not tally.rows:
        raise DatasetError(f"none of the {len(items)} images could be read")
    stacked = tally.stacked_curves()
    config = {"split": split, "radius": radius, "size_reference": size_reference, "topk_percent": topk_percent,
              "steps": steps, "baseline": baseline, "faithfulness": faithfulness, "limit": limit, "seed": seed}  # fmt: skip
    summary = _summarize(tally.rows, tally.scores, stacked, part_names, model, config, tally.skipped)
    summary["defining"] = json_safe(
        _summarize_defining(tally.scores, model.class_names, part_names, defining_names, defining_source, len(items))
    )
    return PartsResult(summary, tally.rows, stacked)


def check_arguments(
    radius: float,
    size_reference: str,
    topk_percent: float,
    steps: int,
    baseline: str,
    limit: int | None,
    batch_size: int,
    seed: int,
) -> None:
    """Check :func:`evaluate_parts`'s arguments before any work is done.

    Raises:
        ParameterError: the first bad argument, named, with its value.
    """
    checks = (
        (radius > 0, "radius", f"must be > 0, got {radius}"),
        (size_reference in M.SIZE_REFERENCES, "size_reference",
         f"must be one of {', '.join(M.SIZE_REFERENCES)}, got {size_reference!r}"),
        (0 < topk_percent <= 100, "topk_percent", f"must be in (0, 100], got {topk_percent}"),
        (steps >= 1, "steps", f"must be >= 1, got {steps}"),
        (baseline in BASELINES, "baseline", f"must be one of {', '.join(BASELINES)}, got {baseline!r}"),
        (limit is None or limit >= 1, "limit", f"must be >= 1, got {limit}"),
        (batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}"),
        (seed >= 0, "seed", f"must be >= 0, got {seed}"),
    )  # fmt: skip
    for ok, name, rule in checks:
        if not ok:
            raise ParameterError(f"{name} {rule}", parameter=name)


@dataclass(frozen=True)
class _Options:
    """How each image is scored: :func:`evaluate_parts`'s arguments and the device."""

    radius: float
    size_reference: str
    topk_percent: float
    steps: int
    baseline: str
    faithfulness: bool
    perturbation_batch: int
    seed: int
    device: torch.device

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class _Tally:
    """What the images gave so far (rows, scores, curves per method, skipped images); reports the progress
    (0 done when made, then one more per image scored or skipped)."""

    total: int
    progress: Progress | None = None
    done: int = 0
    rows: list[dict] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=lambda: {m: [] for m in METHODS})

    def __post_init__(self) -> None:
        if self.progress is not None:
            self.progress(0, self.total)

    def add(self, row: dict, score: dict, curve: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.rows.append(row)
        self.scores.append(score)
        for method, pair in curve.items():
            self.curves[method].append(pair)
        self._tick()

    def skip(self, item: AnnotatedItem, reason: Exception) -> None:
        self.skipped.append({"image_id": item.image_id, "path": str(item.path), "reason": str(reason)})
        self._tick()

    def _tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def stacked_curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Method → (deletion [N, steps+1], insertion [N, steps+1]), for the methods with curves."""
        return {m: (np.stack([c[0] for c in cs]), np.stack([c[1] for c in cs])) for m, cs in self.curves.items() if cs}


def _score_batch(
    model: MCModel,
    chunk: Sequence[AnnotatedItem],
    dataset: Any,
    part_names: Sequence[str],
    defining_by_label: dict[int, list[int]],
    options: _Options,
    tally: _Tally,
) -> None:
    """Explain a batch of images for their true classes and score each; unreadable images are skipped."""
    items, images = [], []
    for it in chunk:
        try:
            images.append(load_image(it.path))
            items.append(it)
        except ImageLoadError as exc:
            tally.skip(it, exc)
    if not items:
        return
    explanations = explain(
        model, images, [it.label for it in items], labels=[it.label for it in items],
        maps=("channels", "gradcam"), device=options.device,
    )  # fmt: skip
    for it, image, ex in zip(items, images, explanations, strict=True):
        tally.add(*_evaluate_one(model, it, image, ex, part_names, defining_by_label.get(it.label, []), dataset, options))


def _evaluate_one(
    model: MCModel,
    item: AnnotatedItem,
    image: Any,
    ex: Explanation,
    part_names: Sequence[str],
    defining: Sequence[int],
    dataset: Any,
    options: _Options,
) -> tuple[dict, dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """One image's per-image row, its scores and its deletion/insertion curves (by method)."""
    group = ex.groups[0]
    width, height = ex.image_size
    radius_px = M.hit_radius(width, height, options.radius, options.size_reference)
    rng = np.random.default_rng([options.seed, item.image_id])
    xi = len(group.channels)
    random_xy = M.random_points(rng, xi, _seen_box(ex))
    random_map = rng.random(ex.feature_hw)
    score = score_group(group, item.keypoints, radius_px, random_xy, options.topk_percent)
    visible = int((item.keypoints[:, 2] > 0).sum()) if len(item.keypoints) else 0
    score["scored"] = visible > 0
    score["xi"] = xi
    score["label"] = item.label
    row = _image_row(item, ex, score, part_names, radius_px, visible)
    maps = {"ccmp": group.ccmp, "gradcam": group.gradcam, "random": random_map}
    score["defining"] = _score_defining(group, maps, ex, item, defining, len(part_names), radius_px, random_xy, dataset)
    row.update(_defining_row(score["defining"], part_names, defining))
    curve: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if options.faithfulness:
        curve = _curves(model, image, ex, item.label, random_map, rng, options)
        fractions = M.step_fractions(options.steps)
        for method, (deletion, insertion) in curve.items():
            row[f"deletion_auc_{method}"] = M.trapezoid_auc(deletion, fractions)
            row[f"insertion_auc_{method}"] = M.trapezoid_auc(insertion, fractions)
    return row, score, curve


def _seen_box(ex: Explanation) -> tuple[float, float, float, float]:
    """The part of the original image the network sees (its crop), clipped to the image: (x0, y0, x1, y1)."""
    width, height = ex.image_size
    corners = ex.geometry.to_original(np.array([[0.0, 0.0], [ex.geometry.crop[2], ex.geometry.crop[3]]]))
    return max(0.0, corners[0, 0]), max(0.0, corners[0, 1]), min(width, corners[1, 0]), min(height, corners[1, 1])


def _image_row(item: AnnotatedItem, ex: Explanation, score: dict, part_names: Sequence[str], radius_px: float, visible: int) -> dict:
    """The per-image CSV columns of the predictions and the peak-based localization scores."""
    width, height = ex.image_size
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
        "channels": score["xi"],
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
    return row


def _curves(
    model: MCModel,
    image: Any,
    ex: Explanation,
    target: int,
    random_map: np.ndarray,
    rng: np.random.Generator,
    options: _Options,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Deletion and insertion curves of the CCMP map, Grad-CAM and the random map (method → the pair)."""
    group = ex.groups[0]
    x = model.transform.apply(image, ex.geometry).to(options.device)
    gradcam = group.gradcam if group.gradcam is not None else np.zeros(ex.feature_hw, np.float32)
    maps = {"channels": group.ccmp, "gradcam": gradcam, "random": random_map}
    deletion, insertion = perturbation_curves(
        model, x, target, list(maps.values()), steps=options.steps, baseline=options.baseline, rng=rng,
        max_batch=options.perturbation_batch, amp=options.amp,
    )  # fmt: skip
    return {method: (deletion[i], insertion[i]) for i, method in enumerate(maps)}


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
    ch_parts = [s["channel_parts"] for s in scored]
    matrix = M.channel_part_matrix(ch_parts, num_parts, xi_max)
    matrix_hits = M.channel_part_matrix(
        [np.where(s["channel_hits"], s["channel_parts"], -1) for s in scored], num_parts, xi_max
    )
    methods = _peak_methods(scores, scored, num_parts)
    mean_curves = _faithfulness_methods(methods, rows, curves)
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
        "curves": {"fractions": M.step_fractions(config["steps"]).tolist(), **mean_curves} if mean_curves else {},
        "config": config,
    }
    return json_safe(summary)


def _peak_methods(scores: list[dict], scored: list[dict], num_parts: int) -> dict[str, dict]:
    """The peak-based rows of the summary: the channels, Grad-CAM and the random points."""
    ch_hits = np.concatenate([s["channel_hits"] for s in scored]) if scored else np.zeros(0, bool)
    rnd_hits = np.concatenate([s["random_hits"] for s in scored]) if scored else np.zeros(0, bool)
    ch_parts = [s["channel_parts"] for s in scored]
    gc_parts = np.array([s["gradcam_part"] for s in scored], dtype=np.int64)
    gc_hits = np.array([s["gradcam_hit"] for s in scored], dtype=bool)
    return {
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


def _faithfulness_methods(
    methods: dict[str, dict], rows: list[dict], curves: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, dict]:
    """Add each method's mean deletion/insertion AUC (NaN without curves) to ``methods``; the mean curves."""
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
    return mean_curves


_SIZE_TEXT = {"max": "max(width, height)", "sqrt-area": "sqrt(width · height)", "diagonal": "the diagonal"}


# ------------------------------------------------------------------------------------- defining parts


def _score_defining(
    group: GroupMaps,
    maps: dict[str, np.ndarray | None],
    ex: Explanation,
    item: AnnotatedItem,
    defining: Sequence[int],
    num_parts: int,
    radius_px: float,
    random_xy: np.ndarray,
    dataset: Any,
) -> dict:
    """Every map of the true class against the class's defining parts (see the module docstring)."""
    if not defining:
        return {"scored": False}
    labels = annotation(dataset, "part_labels", item)
    try:
        regions = crop_regions(labels, item.keypoints, ex.geometry, radius_px)
    except ValueError as exc:
        raise DatasetError(f"{item.path}: {exc}") from None
    from_masks = labels is not None
    if regions is None:
        return {"scored": False}
    area = W.region_areas(regions, num_parts)
    is_def = np.zeros(num_parts, bool)
    is_def[list(defining)] = True
    if area[is_def].sum() == 0 or area[~is_def].sum() == 0:
        return {"scored": False}
    silhouette = annotation(dataset, "silhouette", item) if from_masks else None
    target = np.isin(regions, np.flatnonzero(is_def) + 1)
    originals = {f"channels/{c}": to_original(m, ex.geometry) for c, m in enumerate(group.channels)}
    originals |= {kind: to_original(m, ex.geometry) for kind, m in maps.items() if m is not None}
    out: dict[str, Any] = {
        "scored": True,
        "defining": [int(d) for d in defining],
        "masks": from_masks,
        "chance": W.defining_chance(regions, defining, num_parts),
        "part_area": area.tolist(),
        "rank_chance": float(target.sum() / target.size),
        "ratios": {}, "peaks": {}, "rank": {}, "energy_object": {}, "energy_defining": {}, "energy_parts": {},
    }  # fmt: skip
    for key, values in originals.items():
        kind = key.split("/")[0]
        out["ratios"].setdefault(kind, []).append(W.mass_ratio(values, regions, defining, num_parts))
        if kind != "random":
            y, x = np.unravel_index(int(np.argmax(values)), values.shape)
            out["peaks"].setdefault(kind, []).append(W.peak_region((x + 0.5, y + 0.5), regions) if values.max() > 0 else 0)
        if from_masks:
            out["rank"].setdefault(kind, []).append(W.rank_accuracy(values, target))
            energy = W.energy_shares(values, regions, num_parts, silhouette)
            out["energy_object"].setdefault(kind, []).append(energy["object"])
            out["energy_defining"].setdefault(kind, []).append(float(np.sum(energy["parts"][is_def])))
            out["energy_parts"].setdefault(kind, []).append(energy["parts"])
    out["peaks"]["random"] = [W.peak_region(xy, regions) for xy in random_xy]
    return out


def _defining_row(score: dict, part_names: Sequence[str], defining: Sequence[int]) -> dict:
    """The per-image CSV columns of the defining-part scores."""
    if not score.get("scored"):
        return {}
    row: dict[str, Any] = {"defining_parts": ";".join(part_names[i] for i in defining), "defining_chance": score["chance"]}
    for kind in DEFINING_MAPS:
        if kind in score["ratios"]:
            row[f"mass_ratio_{kind}"] = W.geometric_mean(score["ratios"][kind])
    return row


def _versus_gradcam(scored: list[dict], methods: dict[str, dict]) -> dict[str, dict]:
    """The group's maps against Grad-CAM of the same model, on the same images: the quotient of their mass
    ratios (> 1: the group's map prefers the defining parts more) with its paired bootstrap interval."""
    if "gradcam" not in methods:
        return {}
    cam = [s["ratios"].get("gradcam", []) for s in scored]
    out = {}
    for kind in ("ccmp", "channels"):
        if kind in methods:
            mine = [s["ratios"].get(kind, []) for s in scored]
            out[kind] = {
                "quotient": W.paired_quotient(mine, cam),
                "ci": list(W.geometric_mean_ci(mine, cam)),
            }
    return out


def _summarize_defining(
    scores: list[dict],
    class_names: list[str],
    part_names: list[str],
    classes: dict[str, list[str]],
    source: str | None,
    images: int,
) -> dict:
    """The defining-part block of the summary (``summary["defining"]``)."""
    scored = [s["defining"] for s in scores if s.get("defining", {}).get("scored")]
    masks = any(s["masks"] for s in scored)
    labelled = [(s["label"], s["defining"]) for s in scores if s.get("defining", {}).get("scored")]
    num_parts = len(part_names)
    block: dict[str, Any] = {
        "source": source,
        "classes": classes,
        "regions": "part masks" if masks else "keypoints within the hit radius",
        "images": len(scored),
        "of_images": images,
        "methods": {},
    }
    if source is not None:
        counted = _coverage(labelled, class_names, part_names, classes)
        block["coverage"] = {"regions": block["regions"], **counted}
    if not scored:
        return block
    for kind in DEFINING_MAPS:
        block["methods"][kind] = _defining_entry(scored, kind, num_parts, masks)
    block["versus_gradcam"] = _versus_gradcam(scored, block["methods"])
    per_class: dict[str, dict] = {}
    for label in sorted({lab for lab, _ in labelled}):
        mine = [d for lab, d in labelled if lab == label]
        per_class[class_names[label]] = {
            "images": len(mine),
            **{f"mass_ratio_{k}": W.geometric_mean(r for d in mine for r in d["ratios"].get(k, [])) for k in DEFINING_MAPS},
        }
    block["per_class"] = per_class
    return block


def _coverage(
    labelled: list[tuple[int, dict]],
    class_names: list[str],
    part_names: list[str],
    classes: dict[str, list[str]],
) -> dict:
    """The "distinct parts" count (:mod:`mcloss.metrics.coverage`) over the scored images: each channel's peak
    region (0 / body = no part), the classes' defining parts (a region covers its parts) and the visible
    part-area shares for the chance."""
    from mcloss.data.defining import region_part_indices

    num_parts = len(part_names)
    peaks: dict[str, list[list[int]]] = {}
    shares: dict[str, list[np.ndarray]] = {}
    for label, d in labelled:
        name = class_names[label]
        on_part = [lab - 1 if 1 <= lab <= num_parts else C.NO_PART for lab in d["peaks"]["channels"]]
        peaks.setdefault(name, []).append(on_part)
        area = np.asarray(d["part_area"], dtype=np.float64)
        shares.setdefault(name, []).append(area / area.sum())
    defining = {cls: {r: region_part_indices(r, part_names) for r in rs} for cls, rs in classes.items()}
    mean_shares = {cls: np.mean(v, axis=0).tolist() for cls, v in shares.items()}
    return C.class_coverage(peaks, defining, part_names, mean_shares)


def _defining_entry(scored: list[dict], kind: str, num_parts: int, masks: bool) -> dict[str, Any]:
    """One map kind's row of the defining-part block: peaks on a defining part (and chance), mass ratio, and
    with part masks the rank accuracy and energies."""
    on_part = on_defining = 0
    chance = 0.0
    for s in scored:
        for label in s["peaks"].get(kind, []):
            if 1 <= label <= num_parts:
                on_part += 1
                on_defining += int(label - 1 in s["defining"])
                chance += s["chance"]
    peaks = sum(len(s["peaks"].get(kind, [])) for s in scored)
    per_image = [s["ratios"].get(kind, []) for s in scored]
    ratios = [r for values in per_image for r in values]
    entry: dict[str, Any] = {
        "peaks": peaks,
        "peaks_on_parts": on_part,
        "peak_share": on_defining / on_part if on_part else float("nan"),
        # Quantus's PointingGame on the defining-part mask: the share of all peaks that land on a defining part
        "pointing_game": on_defining / peaks if peaks else float("nan"),
        "peak_chance": chance / on_part if on_part else float("nan"),
        "mass_ratio": W.geometric_mean(ratios),
        "mass_ratio_ci": list(W.geometric_mean_ci(per_image)),
        "mass_ratios": sum(1 for r in ratios if np.isfinite(r)),
    }
    if masks:
        entry["rank_accuracy"] = _nanmean([r for s in scored for r in s["rank"].get(kind, [])])
        entry["rank_chance"] = _nanmean([s["rank_chance"] for s in scored if s["rank"]])
        entry["energy_object"] = _nanmean([e for s in scored for e in s["energy_object"].get(kind, [])])
        entry["energy_defining"] = _nanmean([e for s in scored for e in s["energy_defining"].get(kind, [])])
        parts = [p for s in scored for p in s["energy_parts"].get(kind, [])]
        entry["energy_parts"] = np.nanmean(np.stack(parts), axis=0).tolist() if parts else []
    return entry
