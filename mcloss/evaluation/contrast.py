"""Do contrastive maps point at what tells two classes apart? (``mcloss parts --contrast``)

Ground truth comes from the classes' defining parts (``synth.json``, CUB attributes or the card, as for the
defining-part block of ``mcloss parts``). Every ordered pair (A, B) of classes that share at least one defining
part and differ in at least one is scored on the images of A: a map's mass per area on the parts that tell A
from B (defining for exactly one of the two) ÷ its mass per area on the parts they share
(:func:`mcloss.metrics.mass.mass_ratio` with ``others``). An image-pair counts when both kinds of part are
visible in the crop the network sees.

The maps, all of class A and from one explain pass per class B (targets A and B, ``contrast=B``):

- ``gradcam``: plain Grad-CAM of A; ``ccmp``: A's CCMP;
- ``finer``: Finer-CAM of A with B as its one reference; ``contrast``: the group contrast of A's group
  against B's (:mod:`mcloss.explainability.contrast`);
- ``difference``: the baseline, A's CCMP minus B's, each over its maximum, clipped at 0;
- ``random``: uniform noise at feature resolution, seeded per (seed, image, B).

Each map's ratio is a geometric mean over the image-pairs with a 95 % percentile-bootstrap interval over the
image-pairs, and its quotient against Grad-CAM of A (and the contrast's against the baseline) a paired one
(:func:`mcloss.metrics.mass.geometric_mean_ci`), as for the defining-part ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mcloss.core.errors import DatasetError, Progress, check_callback
from mcloss.core.model import MCModel, model_guard
from mcloss.data.io import ImageLoadError, load_image
from mcloss.evaluation.annotated import AnnotatedItem, annotation, open_parts_dataset, scorable_items
from mcloss.evaluation.parts import resolve_defining
from mcloss.explainability.contrast import CONTRAST_DESIGNS, ccmp_difference
from mcloss.explainability.defining import crop_regions
from mcloss.explainability.explanation import explain
from mcloss.explainability.geometry import to_original
from mcloss.metrics import localization as M
from mcloss.metrics import mass as W

__all__ = ["CONTRAST_GOALS", "CONTRAST_MAPS", "contrast_pairs", "contrast_table", "evaluate_contrast"]

#: The maps scored, in table order.
CONTRAST_MAPS = ("gradcam", "ccmp", "finer", "contrast", "difference", "random")

#: What each map is, for tables.
MAP_LABELS = {
    "gradcam": "Grad-CAM of A",
    "ccmp": "CCMP of A",
    "finer": "Finer-CAM, A vs B",
    "contrast": "group contrast, A vs B",
    "difference": "baseline: CCMP_A − CCMP_B (each ÷ max, clipped at 0)",
    "random": "random map",
}

#: The issue's goals: (map, least ratio, least quotient against Grad-CAM of A).
CONTRAST_GOALS = (("contrast", 8.0, 10.0), ("finer", 2.0, 2.0))


def contrast_pairs(defining: dict[int, list[int]]) -> list[tuple[int, int, list[int], list[int]]]:
    """Every ordered pair (A, B) of classes sharing ≥ 1 defining part and differing in ≥ 1, with (shared,
    differing) part indices, in class order."""
    out = []
    for a, parts_a in sorted(defining.items()):
        for b, parts_b in sorted(defining.items()):
            shared = sorted(set(parts_a) & set(parts_b))
            differing = sorted(set(parts_a) ^ set(parts_b))
            if a != b and parts_a and parts_b and shared and differing:
                out.append((a, b, shared, differing))
    return out


def evaluate_contrast(
    model: MCModel,
    dataset_or_root: Any,
    *,
    split: str = "test",
    radius: float = M.DEFAULT_HIT_RADIUS,
    size_reference: str = "max",
    limit: int | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    seed: int = 0,
    designs: bool = False,
    progress: Progress | None = None,
    defining: dict[str, Sequence[str]] | None = None,
) -> dict:
    """Score the contrastive maps on every pair of classes (see the module docstring).

    Args:
        model: an MCModel (its mode is restored after).
        dataset_or_root: a CUB-layout directory or dataset, as for :func:`mcloss.evaluation.parts.evaluate_parts`.
        split, radius, size_reference, limit, batch_size, device, seed: as there.
        designs: also score every group-contrast design of
            :data:`mcloss.explainability.contrast.CONTRAST_DESIGNS` (as ``design_<name>``).
        progress: called as ``(classes B done, classes B in total)``.
        defining: class name → defining regions (part names); default the dataset's, else the card's.

    Returns:
        A JSON-friendly block: ``pairs`` (per ordered pair: classes, shared and differing parts, image-pairs
        scored, each map's geometric mean), ``methods`` (per map: ``mass_ratio``, ``mass_ratio_ci``,
        ``image_pairs``, and against Grad-CAM of A ``quotient``/``quotient_ci``), ``versus_difference`` (the
        contrast ÷ the baseline, paired), ``goals`` and ``skipped_images``.

    Raises:
        DatasetError: classes that do not match, no part annotations, no defining parts or no pair.
    """
    check_callback(progress)
    dataset = open_parts_dataset(dataset_or_root, split)
    items, part_names = scorable_items(dataset, model, limit)
    by_label, _, source = resolve_defining(dataset, model, part_names, defining)
    pairs = contrast_pairs(by_label)
    if not pairs:
        raise DatasetError("no pair of classes shares a defining part and differs in one (or no defining parts are known)")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    kinds = [*CONTRAST_MAPS, *(f"design_{d}" for d in CONTRAST_DESIGNS)] if designs else list(CONTRAST_MAPS)
    scores: dict[tuple[int, int], dict[str, list[float]]] = {(a, b): {k: [] for k in kinds} for a, b, _, _ in pairs}
    shares: dict[tuple[int, int], dict[str, list[float]]] = {(a, b): {k: [] for k in kinds} for a, b, _, _ in pairs}
    skipped: dict[str, str] = {}
    others = sorted({b for _, b, _, _ in pairs})
    with model_guard(model):
        for done, b in enumerate(others):
            wanted = {a: (shared, differing) for a, bb, shared, differing in pairs if bb == b}
            mine = [it for it in items if it.label in wanted]
            for start in range(0, len(mine), batch_size):
                chunk = mine[start : start + batch_size]
                _score_chunk(
                    model, chunk, b, wanted, dataset, part_names, (radius, size_reference, seed), dev,
                    (scores, shares, skipped), designs,
                )  # fmt: skip
            if progress is not None:
                progress(done + 1, len(others))
    return _summary(pairs, scores, shares, kinds, model.class_names, part_names, source, skipped)


def _score_chunk(model, chunk: Sequence[AnnotatedItem], b: int, wanted, dataset, part_names, opts, dev, tally, designs) -> None:
    """Explain a chunk of images of classes paired with ``b`` (targets A and B, contrast B) and score each."""
    radius, size_reference, seed = opts
    scores, shares, skipped = tally
    loaded, images = [], []
    for it in chunk:
        try:
            images.append(load_image(it.path))
            loaded.append(it)
        except ImageLoadError as exc:
            skipped[str(it.path)] = str(exc)
    if not loaded:
        return
    explanations = explain(
        model, images, [[it.label, b] for it in loaded], maps=("channels", "gradcam"), contrast=b, device=dev,
    )  # fmt: skip
    for it, ex in zip(loaded, explanations, strict=True):
        shared, differing = wanted[it.label]
        labels = annotation(dataset, "part_labels", it)
        width, height = ex.image_size
        regions = crop_regions(labels, it.keypoints, ex.geometry, M.hit_radius(width, height, radius, size_reference))
        if regions is None:
            continue
        mine, other = ex.groups
        rng = np.random.default_rng([seed, it.image_id, b])
        a_group, b_group = torch.from_numpy(mine.channels), torch.from_numpy(other.channels)
        maps = {
            "gradcam": mine.gradcam, "ccmp": mine.ccmp, "finer": mine.finer, "contrast": mine.contrast,
            "difference": ccmp_difference(a_group, b_group).numpy(), "random": rng.random(ex.feature_hw),
        }  # fmt: skip
        if designs:
            maps |= {f"design_{name}": fn(a_group, b_group).numpy() for name, fn in CONTRAST_DESIGNS.items()}
        is_differing = np.isin(regions, np.asarray(differing) + 1)
        for kind, m in maps.items():
            values = np.clip(to_original(m, ex.geometry), 0, None)
            ratio = W.mass_ratio(values, regions, differing, len(part_names), others=shared)
            total = float(values.sum())
            scores[(it.label, b)][kind].append(ratio)
            shares[(it.label, b)][kind].append(float(values[is_differing].sum()) / total if total > 0 else float("nan"))


def _summary(pairs, scores, shares, kinds, class_names, part_names, source, skipped) -> dict:
    """The JSON block (see :func:`evaluate_contrast`)."""
    # one value per image-pair, in a fixed order, so that paired intervals line up
    per_kind = {k: [[v] for a, b, _, _ in pairs for v in scores[(a, b)][k]] for k in kinds}
    methods: dict[str, dict] = {}
    for k in kinds:
        values = per_kind[k]
        methods[k] = {
            "label": MAP_LABELS.get(k, k.removeprefix("design_") + " (group-contrast design)"),
            "mass_ratio": W.geometric_mean(v for vs in values for v in vs),
            "mass_ratio_ci": list(W.geometric_mean_ci(values)),
            "image_pairs": sum(1 for vs in values if np.isfinite(vs[0])),
            # how many image-pairs had no mass on the shared parts (their ratio is the clip)
            "at_clip": sum(1 for vs in values if vs[0] >= W.RATIO_CLIP),
            # the share of the map's whole mass (background included) that lies on the differing parts
            "mass_on_differing": _nanmean([v for a, b, _, _ in pairs for v in shares[(a, b)][k]]),
        }
        if k != "gradcam":
            methods[k]["quotient"] = W.paired_quotient(values, per_kind["gradcam"])
            methods[k]["quotient_ci"] = list(W.geometric_mean_ci(values, per_kind["gradcam"]))
    versus = {
        "quotient": W.paired_quotient(per_kind["contrast"], per_kind["difference"]),
        "ci": list(W.geometric_mean_ci(per_kind["contrast"], per_kind["difference"])),
    }
    rows = []
    for a, b, shared, differing in pairs:
        s = scores[(a, b)]
        rows.append({
            "a": class_names[a], "b": class_names[b],
            "shared": [part_names[i] for i in shared], "differing": [part_names[i] for i in differing],
            "image_pairs": sum(1 for v in s["gradcam"] if np.isfinite(v)),
            **{k: W.geometric_mean(s[k]) for k in CONTRAST_MAPS},
        })  # fmt: skip
    return {
        "source": source,
        "pairs": rows,
        "image_pairs": sum(r["image_pairs"] for r in rows),
        "methods": methods,
        "versus_difference": versus,
        "goals": _goals(methods, versus),
        "skipped_images": [{"path": p, "reason": r} for p, r in skipped.items()],
    }


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray(values, np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def _goals(methods: dict[str, dict], versus: dict) -> list[dict]:
    """Each goal with its measured value and whether it holds: ``met`` at the point estimate, ``clear``
    when the whole interval holds it too."""
    out = []
    for kind, least, times in CONTRAST_GOALS:
        m = methods[kind]
        out.append(_goal(f"{kind} ≥ {least:g}", m["mass_ratio"], m["mass_ratio_ci"], least))
        out.append(_goal(f"{kind} ≥ {times:g}× Grad-CAM of A (paired)", m["quotient"], m["quotient_ci"], times))
    out.append(_goal("contrast above the baseline difference (paired)", versus["quotient"], versus["ci"], 1.0, strict=True))
    rnd = methods["random"]
    out.append({"goal": "random ≈ 1", "value": rnd["mass_ratio"], "ci": rnd["mass_ratio_ci"],
                "met": bool(rnd["mass_ratio_ci"][0] <= 1.0 <= rnd["mass_ratio_ci"][1] or abs(rnd["mass_ratio"] - 1) < 0.1),
                "clear": bool(rnd["mass_ratio_ci"][0] <= 1.0 <= rnd["mass_ratio_ci"][1])})  # fmt: skip
    return out


def _goal(name: str, value: float, ci: Sequence[float], least: float, *, strict: bool = False) -> dict:
    above = (lambda v: v > least) if strict else (lambda v: v >= least)
    return {"goal": name, "value": value, "ci": list(ci), "met": bool(above(value)), "clear": bool(above(ci[0]))}


def contrast_table(block: dict, title: str = "") -> str:
    """Markdown: the maps' ratios with intervals and paired quotients, then the goals, then the pairs."""
    from mcloss.evaluation.parts_report import ratio_with_ci

    lines = [title] if title else []
    lines += [
        f"{block['image_pairs']} image-pairs over {len(block['pairs'])} ordered class pairs; mass per area on the parts "
        "that tell A from B ÷ on the parts they share (1 = no preference), geometric mean with a 95 % bootstrap interval.",
        "",
        "| map (of A, on images of A) | differing ÷ shared parts | ÷ Grad-CAM of A (paired) | no mass on shared parts "
        "(ratio at the clip) | share of all its mass on the differing parts |",
        "|---|---|---|---|---|",
    ]
    for m in block["methods"].values():
        quotient = ratio_with_ci(m["quotient"], m["quotient_ci"]) if "quotient" in m else "1"
        lines.append(
            f"| {m['label']} | {ratio_with_ci(m['mass_ratio'], m['mass_ratio_ci'])} | {quotient} | "
            f"{m['at_clip']} of {m['image_pairs']} | {m['mass_on_differing']:.2f} |"
        )
    v = block["versus_difference"]
    lines += ["", f"Group contrast ÷ the baseline difference (paired): {ratio_with_ci(v['quotient'], v['ci'])}.", ""]
    lines += ["| goal | measured | met (point) | met (whole interval) |", "|---|---|---|---|"]
    for g in block["goals"]:
        lines.append(f"| {g['goal']} | {ratio_with_ci(g['value'], g['ci'])} | {'yes' if g['met'] else 'no'} | {'yes' if g['clear'] else 'no'} |")
    lines += ["", "| A | B | shared | differing | image-pairs | Grad-CAM | CCMP | Finer-CAM | contrast | baseline | random |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in block["pairs"]:
        cells = " | ".join(f"{r[k]:.2f}" if np.isfinite(r[k]) else "–" for k in CONTRAST_MAPS)
        lines.append(f"| {r['a']} | {r['b']} | {', '.join(r['shared'])} | {', '.join(r['differing'])} | {r['image_pairs']} | {cells} |")
    return "\n".join(lines) + "\n"
