"""The files of ``mcloss sanity``: CSV, JSON, the cascade and knockout figures, and ``summary.md``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mcloss.core.files import atomic_write_json, atomic_write_text, csv_text, new_figure, save_figure
from mcloss.evaluation.sanity import SANITY_MAPS

__all__ = ["summary_markdown", "write_sanity"]

_MEASURES = ("spearman", "ssim")


def summary_markdown(summary: dict, title: str) -> str:
    """One line per check (passed or not, with its number), then the cascade table."""
    lines = [f"# Sanity checks: {title}", "", f"{summary['images']} images, each explained for its true class.", ""]
    for c in summary["checks"]:
        status = "no verdict" if c["passed"] is None else "passed" if c["passed"] else "FAILED"
        lines.append(f"- **{status}** — {c['check']}: {c['line']}")
    lines += ["", "## Cascading randomization (mean over images; step 0 is the trained model)", ""]
    head = " | ".join(f"{k} {m}" for k in SANITY_MAPS for m in _MEASURES)
    lines += [f"| step | re-initialized | {head} |", "|---|---|" + "---|" * (len(SANITY_MAPS) * len(_MEASURES))]
    for r in summary["cascade"]:
        cells = " | ".join(f"{r[f'{k}_{m}']['mean']:.3f}" for k in SANITY_MAPS for m in _MEASURES)
        lines.append(f"| {r['step']} | {r['randomized']} | {cells} |")
    lines += ["", "## Group knockout per class (logit drop, mean ± std over the class's images)", ""]
    lines += ["| class | images | FC: own group | FC: random channels | MC: own group | MC: random channels |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in summary["knockout"]["per_class"].items():
        cells = " | ".join(f"{row[k]['mean']:.3g} ± {row[k]['std']:.2g}" for k in ("fc_own", "fc_random", "mc_own", "mc_random"))
        lines.append(f"| {name} | {row['fc_own']['n']} | {cells} |")
    rl = summary["random_logit"]
    lines += [
        "",
        "Random logit: the class's maps against another class's on the same image, mean Spearman "
        + ", ".join(f"{k} {rl[f'{k}_spearman']['mean']:.3f}" for k in SANITY_MAPS)
        + "; SSIM "
        + ", ".join(f"{k} {rl[f'{k}_ssim']['mean']:.3f}" for k in SANITY_MAPS)
        + ".",
        "",
    ]
    return "\n".join(lines)


def _cascade_figure(summary: dict, path: Path) -> None:
    fig = new_figure((8.0, 3.4))
    steps = [r["randomized"] for r in summary["cascade"]]
    for ax, measure in zip(fig.subplots(1, 2, sharey=True), _MEASURES, strict=True):
        for kind in SANITY_MAPS:
            mean = np.array([r[f"{kind}_{measure}"]["mean"] for r in summary["cascade"]])
            std = np.array([r[f"{kind}_{measure}"]["std"] for r in summary["cascade"]])
            ax.plot(range(len(steps)), mean, marker="o", label=kind)
            ax.fill_between(range(len(steps)), mean - std, mean + std, alpha=0.15)
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_xticks(range(len(steps)), steps, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{measure} with the trained model's maps", fontsize=9)
        ax.set_ylim(-1.05, 1.05)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("cascading randomization, from the FC head down", fontsize=9)
    save_figure(fig, path)


def _knockout_figure(summary: dict, path: Path) -> None:
    per_class = summary["knockout"]["per_class"]
    names = list(per_class)
    fig = new_figure((max(6.0, 0.5 * len(names) + 2), 3.4))
    x = np.arange(len(names))
    for ax, head in zip(fig.subplots(1, 2), ("fc", "mc"), strict=True):
        for off, key, label in ((-0.2, f"{head}_own", "own group"), (0.2, f"{head}_random", "random channels")):
            ax.bar(x + off, [per_class[n][key]["mean"] for n in names], 0.4, yerr=[per_class[n][key]["std"] for n in names],
                   label=label, capsize=2)  # fmt: skip
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=6)
        ax.set_title(f"{head.upper()} head: drop of the class's logit", fontsize=9)
        ax.axhline(0.0, color="0.6", lw=0.8)
    fig.axes[0].legend(fontsize=7)
    save_figure(fig, path)


def write_sanity(summary: dict, out: str | Path, title: str) -> list[Path]:
    """Write every output of a sanity run to ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cascade_rows = [
        {"step": r["step"], "randomized": r["randomized"],
         **{f"{k}_{m}_{s}": r[f"{k}_{m}"][s] for k in SANITY_MAPS for m in _MEASURES for s in ("mean", "std")}}
        for r in summary["cascade"]
    ]  # fmt: skip
    knock = summary["knockout"]["per_image"]
    knock_rows = [{"image": i, "target": knock["target"][i], **{k: knock[k][i] for k in ("fc_own", "fc_random", "mc_own", "mc_random")}}
                  for i in range(len(knock["target"]))]  # fmt: skip
    rl = summary["random_logit"]
    random_rows = [{"image": i, "other": rl["other"][i], **{f"{k}_{m}": rl["per_image"][k][m][i] for k in SANITY_MAPS for m in _MEASURES}}
                   for i in range(len(rl["other"]))]  # fmt: skip
    files = {
        "cascade.csv": csv_text(list(cascade_rows[0]), cascade_rows),
        "knockout.csv": csv_text(list(knock_rows[0]) if knock_rows else ["image"], knock_rows),
        "random_logit.csv": csv_text(list(random_rows[0]) if random_rows else ["image"], random_rows),
        "summary.md": summary_markdown(summary, title),
    }
    paths = []
    for name, text in files.items():
        atomic_write_text(out / name, text)
        paths.append(out / name)
    atomic_write_json(out / "sanity.json", {k: v for k, v in summary.items() if k != "cascade_per_image"})
    _cascade_figure(summary, out / "cascade.png")
    _knockout_figure(summary, out / "knockout.png")
    return [*paths, out / "sanity.json", out / "cascade.png", out / "knockout.png"]
