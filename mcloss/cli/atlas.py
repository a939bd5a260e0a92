"""``mcloss atlas``: each channel's top patches across a dataset, its part and purity, consistency, stability."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mcloss.cli._common import (
    EXIT_INTERRUPTED,
    add_checkpoint,
    add_device,
    check_at_least,
    checkpoint_path,
    command_line,
    defaults_of,
    finite_float,
    progress_bar,
    run,
    say,
    writing_to,
)
from mcloss.core.checkpoint import load_checkpoint
from mcloss.core.device import resolve_device
from mcloss.core.errors import DatasetError, ParameterError
from mcloss.core.files import atomic_write_bytes, atomic_write_json, atomic_write_text, file_sha256, printable
from mcloss.data.cub import CUBDataset
from mcloss.data.datasets import check_classes
from mcloss.data.files import unique_file_stems
from mcloss.data.io import encode_image
from mcloss.evaluation.parts_report import coverage_markdown
from mcloss.explainability.atlas import AtlasInputs, build_atlas, contact_sheet

__all__ = ["build_parser", "main", "summary_markdown"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcloss atlas",
        description="For every channel of the chosen classes: the N image patches where it fires most across a "
        "CUB-layout dataset (one forward pass per batch, a running top-k on the device), the part its top "
        "activations land on and its purity, part consistency and stability under input noise.",
    )
    default = defaults_of(build_atlas)
    add_checkpoint(p)
    p.add_argument("--data", required=True, help="CUB-layout dataset root (part keypoints label the channels)")
    p.add_argument("--split", default="test", choices=["test", "train", "all"])
    p.add_argument("--out", required=True, help="output directory (a rerun with the same options resumes)")
    p.add_argument("--top", type=int, default=default["top"], help=f"patches per channel (default {default['top']})")
    p.add_argument("--classes", nargs="+", help="class names or 0-based indices (default all)")
    p.add_argument("--batch-size", type=int, default=default["batch_size"])
    p.add_argument("--workers", type=int, default=2, help="DataLoader decoding workers (0 = in process)")
    p.add_argument(
        "--noise", type=finite_float, default=default["noise"], help="std of the Gaussian input noise for stability"
    )
    p.add_argument("--no-stability", action="store_true", help="skip the noisy second pass")
    p.add_argument(
        "--radius", type=finite_float, default=default["radius"], help="hit radius as a fraction of max(width, height)"
    )
    p.add_argument(
        "--patch", type=float, default=default["patch"], help="patch side as a fraction of max(width, height)"
    )
    add_device(p)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Build the atlas and write its files; 0, or 2 on a usage error, 130 when interrupted (resumable)."""
    return run("atlas", build_parser(), argv, lambda args: _atlas(args, argv))


def summary_markdown(summary: dict, title: str) -> str:
    """The atlas in words: the skipped images, consistency and stability (or that there are no keypoints),
    the "distinct parts" count, then one line per channel."""
    c, s = summary["consistency"], summary["stability"]
    lines = [f"# Channel atlas: {title}", "", f"{summary['images']} images, top {summary['top']} patches per channel.", ""]
    skipped = summary["skipped"]
    if skipped:
        lines.append(f"Skipped {len(skipped)} unreadable {'image' if len(skipped) == 1 else 'images'}:")
        lines += [f"- {printable(skipped[k])}" for k in sorted(skipped, key=int)]
        lines.append("")
    if not summary["has_parts"]:
        lines += ["- Part consistency and stability: no keypoints (no image has a visible part keypoint; a CUB "
                  "layout keeps them in parts/part_locs.txt), so neither was measured.", ""]  # fmt: skip
    else:
        if c["share"] is None:
            lines.append(f"- Part consistency: not measured (none of the {c['channels']} channels' classes has a scored image).")
        else:
            lines.append(f"- Part consistency: {c['consistent_channels']} of {c['measured']} measured channels ({c['share']:.3f}) hit "
                         f"one part in ≥ {c['threshold']:.0%} of their class's images where it is visible.")  # fmt: skip
        if s["share"] is not None:
            lines.append(f"- Stability: {s['stable']} of {s['pairs']} (channel, image) pairs ({s['share']:.3f}) keep "
                         "their hit part under input noise.")  # fmt: skip
        lines.append("")
    if summary.get("coverage") is not None:
        lines += [coverage_markdown([(title, summary["coverage"])]), ""]
    for name, group in summary["classes"].items():
        for row in group["channels"]:
            what = "no part labels" if row["part"] is None else f"{row['part']}, {round(row['purity'] * len(row['top']))} of its top {len(row['top'])}"
            cons = row["consistency"]
            extra = "" if cons["share"] is None else f"; consistency {cons['share']:.2f} on {cons['part']}"
            lines.append(f"- channel {row['position']} of {name}: {what}{extra}")
    return "\n".join(lines) + "\n"


def _atlas(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    check_at_least(("top", args.top, 1), ("batch_size", args.batch_size, 1))
    if args.workers < 0 or args.noise < 0:
        raise ParameterError("workers and noise must be >= 0", parameter=("workers", "noise"))
    if not args.radius > 0 or not 0 < args.patch <= 1:
        raise ParameterError(
            f"radius must be > 0 and patch in (0, 1], got {args.radius} and {args.patch}", parameter=("radius", "patch")
        )
    checkpoint = checkpoint_path(args.checkpoint)
    if not Path(args.data).is_dir():
        raise DatasetError(f"{args.data}: dataset directory not found")
    device = resolve_device(args.device)
    model = load_checkpoint(checkpoint, device)
    inputs = AtlasInputs.from_cub(CUBDataset(args.data, args.split))
    check_classes(args.data, inputs.class_names, model.class_names)
    if not inputs.paths:
        raise DatasetError(f"{args.data}: the {args.split} split has no images")
    classes = None
    if args.classes:
        classes = [int(c) if c.isdigit() else c for c in args.classes]
    out = Path(args.out)
    with writing_to(out):
        out.mkdir(parents=True, exist_ok=True)
    try:
        with progress_bar("atlas", not args.no_progress) as progress:
            summary = build_atlas(
                model, inputs, classes=classes, top=args.top, batch_size=args.batch_size, workers=args.workers,
                device=device, noise=None if args.no_stability else args.noise, radius=args.radius,
                patch=args.patch, state=out / "atlas-state.safetensors", progress=progress,
                model_id=file_sha256(checkpoint),
            )  # fmt: skip
    except KeyboardInterrupt:
        print(f"mcloss atlas: interrupted; the pass so far is saved in {out}, run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    summary["config"] = {"command": command_line("atlas", argv), "checkpoint": str(checkpoint.resolve()),
                         "data": str(Path(args.data).resolve()), "split": args.split}  # fmt: skip
    for k in sorted(summary["skipped"], key=int):
        say("atlas", f"skipped {printable(summary['skipped'][k])}")
    text = summary_markdown(summary, checkpoint.name)
    with writing_to(out):
        sheets = []
        for name, stem in zip(summary["classes"], unique_file_stems(summary["classes"]), strict=True):
            sheets.append(out / "sheets" / f"{stem}.png")
            atomic_write_bytes(sheets[-1], encode_image(contact_sheet(summary, name)))
        for old in (out / "sheets").glob("*.png"):  # an earlier run's classes that this one did not draw
            if old not in sheets:
                old.unlink()
        atomic_write_json(out / "atlas.json", summary)
        atomic_write_text(out / "summary.md", text)
    print(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0
