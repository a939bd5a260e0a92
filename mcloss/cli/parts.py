"""``mcloss parts``: part-localization and faithfulness metrics of a checkpoint on a CUB-layout split."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from mcloss.cli._common import (
    add_checkpoint,
    add_device,
    add_no_progress,
    check_at_least,
    check_output,
    checkpoint_path,
    command_line,
    defaults_of,
    finite_float,
    progress_bar,
    run,
    say,
    seed_value,
    show_progress,
    writing_to,
)
from mcloss.core.checkpoint import load_checkpoint
from mcloss.core.device import resolve_device
from mcloss.core.errors import DatasetError, MclossError, ParameterError, Progress
from mcloss.core.files import atomic_write_json, atomic_write_text, json_safe
from mcloss.core.model import MCModel
from mcloss.evaluation.contrast import contrast_table, evaluate_contrast
from mcloss.evaluation.faithfulness import BASELINES
from mcloss.evaluation.parts import check_arguments, evaluate_parts
from mcloss.evaluation.parts_report import PartsResult, baseline_block, summary_table, write_outputs
from mcloss.metrics.localization import SIZE_REFERENCES

T = TypeVar("T")

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcloss parts",
        description="Part-localization (channel peaks vs part keypoints) and faithfulness (deletion/insertion) "
        "metrics of the true class's channel group, against Grad-CAM and a random baseline.",
    )
    default = defaults_of(evaluate_parts)
    add_checkpoint(p)
    p.add_argument("--data", required=True, help="CUB-layout dataset root with parts/part_locs.txt")
    p.add_argument("--split", default=default["split"], choices=["test", "train", "all"])
    p.add_argument(
        "--radius", type=finite_float, default=default["radius"],
        help=f"hit radius as a fraction of the image size (default {default['radius']})",
    )  # fmt: skip
    p.add_argument(
        "--size-reference",
        default=default["size_reference"],
        choices=list(SIZE_REFERENCES),
        help="image size for the radius: max(w, h) (default), sqrt(w·h) or the diagonal, of the original image",
    )
    p.add_argument(
        "--topk-percent", type=float, default=default["topk_percent"], help="top-k %% mask per channel for the overlap"
    )
    p.add_argument("--steps", type=int, default=default["steps"], help=f"deletion/insertion steps (default {default['steps']})")
    p.add_argument(
        "--deletion-fill", default=default["baseline"], choices=list(BASELINES),
        help=f"deleted pixels become: blur or mean (default {default['baseline']})",
    )  # fmt: skip
    p.add_argument(
        "--baseline", metavar="CHECKPOINT",
        help="a second checkpoint (e.g. a CE-only twin) scored the same way on the same images; its rows join the "
        "tables and its own outputs go to OUT/baseline/",
    )  # fmt: skip
    p.add_argument("--no-faithfulness", action="store_true", help="skip deletion/insertion (much faster on a CPU)")
    p.add_argument(
        "--contrast", action="store_true",
        help="also score the contrastive maps: on every pair of classes (A, B) that share a defining part and differ "
        "in one, mass per area on the parts that tell them apart ÷ on the parts they share, of Grad-CAM and CCMP of A, "
        "Finer-CAM (A vs B), the group contrast (A vs B), the plain CCMP difference and a random map "
        "(OUT/contrast.json, OUT/contrast.md)",
    )  # fmt: skip
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--batch-size", type=int, default=default["batch_size"], help="images per explain pass")
    p.add_argument(
        "--perturbation-batch", type=int, default=default["perturbation_batch"], help="most step images per forward pass"
    )
    add_device(p)
    add_no_progress(p)
    p.add_argument("--out", help="output directory (default runs/parts-<timestamp>)")
    p.add_argument("--seed", type=seed_value, default=default["seed"], help="seed of the random baselines")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier parts run in --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the part metrics on a checkpoint and a CUB-layout split; prints the markdown summary table.

    Returns 0, or 2 on bad arguments or unusable inputs (one line on stderr); unreadable images are
    skipped, one line each on stderr.
    """
    # the library's deletion fill is "baseline"; this command's --baseline is a second checkpoint
    return run("parts", build_parser(), argv, lambda args: _parts(args, argv), flags={"baseline": "--deletion-fill"})


def _parts(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    out = Path(args.out) if args.out else Path("runs") / f"parts-{time.strftime('%Y%m%d-%H%M%S')}"
    _check(args, out)
    checkpoint = checkpoint_path(args.checkpoint)  # its error names the path
    baseline = checkpoint_path(args.baseline) if args.baseline else None
    device = resolve_device(args.device)
    models = [(checkpoint, load_checkpoint(checkpoint, device))]
    if baseline is not None:
        models.append((baseline, load_checkpoint(baseline, device)))
    results = [_evaluate(args, model, path, device) for path, model in models]
    result = results[0]
    for skipped in result.summary["skipped_images"]:
        say("parts", f"skipped {skipped['reason']}")
    if baseline is not None:
        result.summary["baseline"] = baseline_block(results[1].summary, baseline)
    run_config = {
        "command": command_line("parts", argv),
        "checkpoint": str(checkpoint.resolve()),
        "data": str(Path(args.data).resolve()),
        "device": str(device),
        "batch_size": args.batch_size,
        "perturbation_batch": args.perturbation_batch,
        **result.summary["config"],
        "hit_radius": result.summary["hit_radius"],
    }
    contrasts = [_contrast(args, model, path, device) for path, model in models] if args.contrast else []
    with writing_to(out):
        write_outputs(result, out, run_config)
        if baseline is not None:
            write_outputs(results[1], out / "baseline", run_config | {"checkpoint": str(baseline.resolve())})
        if contrasts:
            atomic_write_json(out / "contrast.json", {str(path): json_safe(block) for (path, _), block in zip(models, contrasts, strict=True)})
            atomic_write_text(out / "contrast.md", _contrast_markdown(models, contrasts))
        else:  # an earlier run's (--overwrite): its numbers are not this run's
            for name in ("contrast.json", "contrast.md"):
                (out / name).unlink(missing_ok=True)
        if baseline is None and (out / "baseline" / "summary.json").is_file():
            shutil.rmtree(out / "baseline")
    print(summary_table(result.summary))
    if contrasts:
        print("\n" + _contrast_markdown(models, contrasts))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace, out: Path) -> None:
    """Refuse unusable options before any checkpoint is read."""
    check_output(out, "--out", folder=True)
    if (out / "summary.json").exists() and not args.overwrite:
        raise ParameterError(f"--out {out}: already holds a parts run; pass --overwrite or choose another --out")
    if args.baseline in BASELINES and not Path(args.baseline).exists():
        raise ParameterError(
            f"--baseline {args.baseline}: --baseline now names a baseline checkpoint; the deletion fill is "
            f"--deletion-fill {args.baseline}"
        )
    check_arguments(
        args.radius, args.size_reference, args.topk_percent, args.steps, args.deletion_fill, args.limit,
        args.batch_size, args.seed,
    )  # fmt: skip
    check_at_least(("perturbation_batch", args.perturbation_batch, 1))


def _evaluate(args: argparse.Namespace, model: MCModel, checkpoint: Path, device: torch.device) -> PartsResult:
    """:func:`evaluate_parts` of one checkpoint, with a progress bar; its errors name the data."""
    return _naming_errors(args, checkpoint, "parts", lambda progress: evaluate_parts(
        model, args.data, split=args.split, radius=args.radius, size_reference=args.size_reference,
        topk_percent=args.topk_percent, steps=args.steps, baseline=args.deletion_fill,
        faithfulness=not args.no_faithfulness, limit=args.limit, batch_size=args.batch_size,
        perturbation_batch=args.perturbation_batch, device=device, seed=args.seed, progress=progress,
    ))  # fmt: skip


def _contrast(args: argparse.Namespace, model: MCModel, checkpoint: Path, device: torch.device) -> dict:
    """:func:`evaluate_contrast` of one checkpoint, with a progress bar; its errors name the data."""
    return _naming_errors(args, checkpoint, "contrast", lambda progress: evaluate_contrast(
        model, args.data, split=args.split, radius=args.radius, size_reference=args.size_reference,
        limit=args.limit, batch_size=args.batch_size, device=device, seed=args.seed, progress=progress,
    ))  # fmt: skip


def _naming_errors(args: argparse.Namespace, checkpoint: Path, label: str, run: Callable[[Progress], T]) -> T:
    """``run(progress)`` under a progress bar titled ``label``; an mcloss error is raised again naming the data."""
    try:
        with progress_bar(label, show_progress(args), leave=False) as progress:
            return run(progress)
    except MclossError as exc:
        raise DatasetError(_naming_the_data(str(exc), args.data, checkpoint), parameter=exc.parameters) from exc


def _contrast_markdown(models: list[tuple[Path, MCModel]], blocks: list[dict]) -> str:
    """The contrast tables of each checkpoint, headed by its file name."""
    return "\n".join(
        contrast_table(block, f"## Contrastive maps: {path.name}\n") for (path, _), block in zip(models, blocks, strict=True)
    )


def _naming_the_data(message: str, data: str, checkpoint: Path) -> str:
    """``message``, prefixed with the data path unless it already names the data, the checkpoint or a flag."""
    return message if message.startswith((str(data), str(checkpoint), "--")) else f"{data}: {message}"
