"""``mcloss synth``: write the synthetic fine-grained bird-parts dataset."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mcloss.cli._common import run
from mcloss.data.synth import DESIGNS, generate_dataset
from mcloss.data.synth.design import JPEG_QUALITY

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcloss synth",
        description="Write a synthetic fine-grained bird-parts dataset in CUB_200_2011 layout. "
        "Classes depend on --classes only; --seed draws new instances of the same classes.",
    )
    p.add_argument("--out", required=True, help="output directory (new, empty, or a previous synth output)")
    p.add_argument("--classes", type=int, required=True, help="number of classes N (>= 2)")
    p.add_argument("--per-class", type=int, required=True, help="images per class M")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--seed", type=int, default=0, help="instance seed (default 0)")
    p.add_argument("--test-fraction", type=float, default=0.5, help="share of each class in the test split (default 0.5)")
    p.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY, help=f"JPEG quality (default {JPEG_QUALITY})")
    p.add_argument("--workers", type=int, default=1, help="rendering threads (default 1; output is identical)")
    p.add_argument("--object-scale", type=float, default=1.0, help="bird size relative to the image (default 1.0)")
    p.add_argument(
        "--design", choices=DESIGNS, default="single",
        help="single: each class changes one part of a base bird (default); combo: each class is a combination "
        "of part states, any two differ in >= 2 parts; varied: combo's classes with every part a class does not "
        "change varying per instance, so only the defining parts carry class information",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dataset and print what was written; 2 on bad arguments or an unusable --out."""
    return run("synth", build_parser(), argv, _synth)


def _synth(args: argparse.Namespace) -> int:
    summary = generate_dataset(
        args.out, args.classes, args.per_class, args.size, args.seed,
        test_fraction=args.test_fraction, jpeg_quality=args.jpeg_quality, workers=args.workers,
        object_scale=args.object_scale, design=args.design,
    )
    print(
        f"wrote {summary['images']} images ({summary['train']} train / {summary['test']} test) of "
        f"{summary['classes']} classes at {summary['size']} px to {summary['out']} in {summary['seconds']:.1f} s "
        f"({summary['images_per_second']:.0f} images/s)"
    )
    return 0
