"""What a ``mcloss parts`` run produces: the result object, its tables and the files it is saved as.

Files (see :data:`OUTPUT_FILES`): per_image.csv, summary.csv, summary.md, summary.json, config.json,
channel_part_matrix.png, hit_rate.png, deletion_insertion.png.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mcloss.core.files import atomic_write_json, atomic_write_text, csv_text, new_figure, save_figure
from mcloss.metrics.mass import BOOTSTRAP_RESAMPLES, CI_LEVEL

__all__ = [
    "DEFINING_LABELS",
    "baseline_block",
    "coverage_markdown",
    "coverage_table",
    "defining_table",
    "METHODS",
    "METHOD_LABELS",
    "PER_IMAGE_COLUMNS",
    "SUMMARY_COLUMNS",
    "OUTPUT_FILES",
    "PartsResult",
    "summary_table",
    "write_outputs",
]

#: The rows of the summary: the true class's channels (CCMP map for faithfulness), Grad-CAM, random.
METHODS = ("channels", "gradcam", "random")
METHOD_LABELS = {"channels": "channels (CCMP)", "gradcam": "Grad-CAM", "random": "random"}
_METHOD_COLORS = {"channels": "tab:blue", "gradcam": "tab:orange", "random": "tab:gray"}
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
    "defining_parts",
    "defining_chance",
    "mass_ratio_channels",
    "mass_ratio_ccmp",
    "mass_ratio_gradcam",
    "mass_ratio_random",
)
SUMMARY_COLUMNS = (
    "method", "peaks", "hit_rate", "distinct_parts", "separated_parts", "overlap", "deletion_auc", "insertion_auc"
)


@dataclass
class PartsResult:
    """What :func:`mcloss.evaluation.parts.evaluate_parts` measured.

    Attributes:
        summary: the aggregate numbers (JSON-friendly). Images that could
            not be read are listed in ``summary["skipped_images"]`` (image_id, path, reason).
        per_image: one row per evaluated image (keys :data:`PER_IMAGE_COLUMNS`).
        curves: method → (deletion [N, steps+1], insertion [N, steps+1]) probabilities, or empty.
    """

    summary: dict
    per_image: list[dict] = field(default_factory=list)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        """``result["methods"]`` reads the summary, as the dict that ``evaluate_parts`` returned before."""
        return self.summary[key]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


#: Row labels of the defining-part table.
DEFINING_LABELS = {"channels": "each channel", "ccmp": "CCMP", "gradcam": "Grad-CAM (FC head)", "random": "random map"}


def defining_table(summary: dict) -> str:
    """The defining-part markdown table (empty when the classes' defining parts are unknown).

    One row per map of the true class (each channel, CCMP, Grad-CAM, random), and the same rows for the
    baseline checkpoint when the summary has one (``summary["baseline"]``).
    """
    block = summary.get("defining") or {}
    if not block.get("methods"):
        return ""
    masks = block.get("regions") == "part masks"
    head = (
        "| model | map of the true class | peaks on a defining part (of peaks on a part) | chance | pointing game "
        f"| mass ratio defining ÷ other parts ({CI_LEVEL * 100:g} % CI) |"
    )
    rule = "|---|---|---|---|---|---|"
    if masks:
        head += " rank accuracy (chance) | mass in the object | mass on defining parts |"
        rule += "---|---|---|"
    lines = [head, rule]
    models = [("this", block)]
    if isinstance(summary.get("baseline"), dict) and (summary["baseline"].get("defining") or {}).get("methods"):
        models.append(("baseline", summary["baseline"]["defining"]))
    for name, part in models:
        for kind, m in part["methods"].items():
            line = (
                f"| {name} | {DEFINING_LABELS.get(kind, kind)} | {_fmt(m['peak_share'])} | {_fmt(m['peak_chance'])} "
                f"| {_fmt(m.get('pointing_game'))} "
                f"| {ratio_with_ci(m['mass_ratio'], m.get('mass_ratio_ci'))} |"
            )
            if masks:
                line += (
                    f" {_fmt(m.get('rank_accuracy'))} ({_fmt(m.get('rank_chance'))}) | {_fmt(m.get('energy_object'))} "
                    f"| {_fmt(m.get('energy_defining'))} |"
                )
            lines.append(line)
    lines += [
        "",
        f"{block['images']} of {block['of_images']} images scored (true class with a visible defining part and "
        f"another visible part); defining parts from the {block['source']}; regions from {block['regions']}. "
        "Mass ratio: mass per area on the defining parts ÷ mass per area on the other visible parts, geometric "
        "mean over images (and channels); 1× = no preference. Chance: the defining parts' share of the visible "
        "part area. Pointing game: the share of all peaks on a defining part (Quantus's PointingGame on the "
        "defining-part mask).",
    ]
    versus = [
        f"{DEFINING_LABELS[kind]} ÷ Grad-CAM {ratio_with_ci(v['quotient'], v['ci'])}"
        for kind, v in (block.get("versus_gradcam") or {}).items()
    ]
    if versus:
        lines.append(
            "Against Grad-CAM of the same model, on the same images (quotient of the mass ratios; > 1: the group's "
            f"map prefers the defining parts more): {'; '.join(versus)}. Intervals: {CI_LEVEL * 100:g} % percentile bootstrap "
            f"over the images ({BOOTSTRAP_RESAMPLES:,} resamples, an image's channels together; paired for the quotients)."
        )
    if len(models) > 1:
        base = summary["baseline"]
        lines.append(
            f"Baseline: {base.get('checkpoint', '?')} on the same images (top-1 FC {_fmt(base.get('top1_fc'))})."
        )
    return "\n".join(lines)


def coverage_table(summary: dict) -> str:
    """The "distinct parts" count of a parts run (this model, and the baseline when there is one), or ""
    when the run has no defining-part block or was scored before the count existed (a block that knows its
    defining parts but has no ``coverage``, as in a checkpoint card written then)."""
    block = summary.get("defining")
    if not isinstance(block, dict):
        return ""
    models = [("this model", block.get("coverage"))]
    base = summary.get("baseline")
    if isinstance(base, dict) and isinstance(base.get("defining"), dict):
        models.append(("baseline model", base["defining"].get("coverage")))
    if block.get("source") is not None and all(c is None for _, c in models):
        return ""
    return coverage_markdown(models)


def _with_chance(text: str, chance: dict | None, key: str, digits: int) -> str:
    value = None if chance is None else chance.get(key)
    return text if value is None else f"{text} (chance {_fmt(value, digits)})"


def _channel_text(part: str | None, share: float | None, status: str) -> str:
    if part is not None:
        return f"{part} ({_fmt(share, 2)})"
    return {"tie": "tie", "none": "no part", "no peaks": "no peaks"}.get(status, "no part")


def coverage_markdown(models: Sequence[tuple[str, dict | None]]) -> str:
    """The "distinct parts" count in markdown: one summary row per model, then one row per class.

    Args:
        models: (model label, coverage block of :func:`mcloss.metrics.coverage.class_coverage`; None, or a
            block whose ``source`` is None, when no defining parts are known).
    """
    lines = ["**Distinct parts, counted.**", ""]
    known = [(name, c) for name, c in models if isinstance(c, dict) and c.get("summary")]
    if not known:
        unknown = all(c is None or c.get("source", "") is None for _, c in models)
        lines.append("No defining parts known: coverage not counted." if unknown else
                     "No image of a class with defining parts was scored: coverage not counted.")  # fmt: skip
        return "\n".join(lines)
    lines += [
        "| model | classes fully covered | defining parts covered | distinct parts per group | duplicates "
        "| channels on a shared part | channels with a part |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in known:
        t, ch = c["summary"], c["summary"].get("chance")
        full = f"{t['fully_covered']} of {t['classes']}"
        covered = f"{t['defining_covered']} of {t['defining_parts']} = {_fmt(t['defining_covered_share'])}"
        shared = f"{t['channels_on_shared_part']} of {t['channels']}"
        lines.append(
            f"| {name} | {_with_chance(full, ch, 'fully_covered', 1)} "
            f"| {_with_chance(covered, ch, 'defining_covered_share', 3)} "
            f"| {_with_chance(_fmt(t['distinct_parts_mean'], 2), ch, 'distinct_parts_mean', 2)} "
            f"| {_with_chance(str(t['duplicates']), ch, 'duplicates', 1)} "
            f"| {_with_chance(shared, ch, 'channels_on_shared_part', 1)} | {t['channels_with_part']} of {t['channels']} |"
        )
    classes = list(dict.fromkeys(cls for _, c in known for cls in c["per_class"]))
    columns = "".join(f" {n}: each channel's part (share of its peaks) | covered |" for n, _ in known)
    head = "| class | defining parts |" + columns
    lines += ["", head, "|---|---|" + "---|---|" * len(known)]
    for cls in classes:
        rows = [c["per_class"].get(cls) for _, c in known]
        first = next(r for r in rows if r is not None)
        line = f"| {cls} | {', '.join(first['defining'])} |"
        for r in rows:
            if r is None:
                line += " — | — |"
                continue
            each = zip(r["channel_parts"], r["channel_shares"], r["channel_status"], strict=True)
            parts = "; ".join(f"{k + 1}: {_channel_text(p, sh, st)}" for k, (p, sh, st) in enumerate(each))
            missed = f" (missed {', '.join(r['missed'])})" if r["missed"] else ""
            line += f" {parts} | {r['covered_count']} of {r['defining_count']}{missed} |"
        lines.append(line)
    lines += ["", str(known[0][1].get("definition", ""))]
    if known[0][1].get("regions"):
        lines[-1] += f" Peaks' parts from {known[0][1]['regions']}."
    return "\n".join(lines)


def ratio_with_ci(value: float, ci: Sequence[float] | None, unit: str = "×") -> str:
    """``5.98× (5.41–6.60)``: a ratio and its interval (the ratio alone when there is none)."""
    text = f"{_fmt(value, 2)}{unit}"
    if ci is not None and len(ci) == 2 and all(isinstance(v, float) and math.isfinite(v) for v in ci):
        text += f" ({ci[0]:.2f}–{ci[1]:.2f})"
    return text


def baseline_block(summary: dict, checkpoint: str | Path) -> dict:
    """The part of a baseline checkpoint's summary that joins the main summary (``summary["baseline"]``)."""
    keep = ("images", "top1_fc", "top1_mc", "methods", "defining")
    return {"checkpoint": str(checkpoint), **{k: summary[k] for k in keep if k in summary}}


def summary_table(summary: dict) -> str:
    """The markdown tables: defining parts first (when known), then peaks and faithfulness per method."""
    defining = defining_table(summary)
    coverage = coverage_table(summary)
    xi = "/".join(str(x) for x in summary["channels_per_group"])
    lines = ([defining, ""] if defining else []) + ([coverage, ""] if coverage else [])
    lines += [
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
    # a checkpoint card written before it kept the count of scored images has none
    scored = f" ({summary['scored_images']} with visible parts)" if "scored_images" in summary else ""
    lines += [
        "",
        f"{summary['images']} images{scored}; "
        f"top-1 FC head {summary['top1_fc']:.3f}, MC head {summary['top1_mc']:.3f}; "
        f"hit radius {summary['hit_radius']}. Separated parts count hit parts whose keypoints are less than "
        "two hit radii apart (a peak between them could hit either) as one.",
    ]
    return "\n".join(lines)


def write_outputs(result: PartsResult, out_dir: str | Path, run_config: dict | None = None) -> list[Path]:
    """Write every output file of a parts run atomically into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary
    atomic_write_text(out / "per_image.csv", csv_text(PER_IMAGE_COLUMNS, result.per_image))
    summary_rows = [{"method": m, **summary["methods"][m]} for m in METHODS]
    atomic_write_text(out / "summary.csv", csv_text(SUMMARY_COLUMNS, summary_rows))
    atomic_write_text(out / "summary.md", "# Part localization and faithfulness\n\n" + summary_table(summary) + "\n")
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "config.json", run_config if run_config is not None else summary["config"])
    _plot_matrix(summary, out / "channel_part_matrix.png")
    _plot_hit_rate(summary, out / "hit_rate.png")
    _plot_curves(summary, out / "deletion_insertion.png")
    return [out / name for name in OUTPUT_FILES]


# ----------------------------------------------------------------------------------------------- plots


def _plot_matrix(summary: dict, path: Path) -> None:
    counts = np.asarray(summary["channel_part_matrix"], dtype=np.int64)
    rows = np.asarray(summary["channel_part_matrix_normalized"], dtype=np.float64)
    parts = summary["part_names"]
    fig = new_figure((max(5.0, 0.6 * len(parts) + 2.5), max(2.5, 0.45 * len(rows) + 1.8)))
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
    save_figure(fig, path)


def _plot_hit_rate(summary: dict, path: Path) -> None:
    fig = new_figure((9.0, 3.6))
    ax_hit, ax_dist = fig.subplots(1, 2)
    labels = [METHOD_LABELS[m] for m in METHODS]
    colors = [_METHOD_COLORS[m] for m in METHODS]
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
    save_figure(fig, path)


def _plot_curves(summary: dict, path: Path) -> None:
    fig = new_figure((9.0, 3.6))
    axes = fig.subplots(1, 2)
    curves = summary.get("curves") or {}
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for method in METHODS:
            if method in curves:
                auc = summary["methods"][method][f"{kind}_auc"]
                ax.plot(
                    curves["fractions"], curves[method][kind], marker=".", color=_METHOD_COLORS[method],
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
    save_figure(fig, path)
