"""``mcloss domain``: fit a checkpoint's domain check (is an image inside what the model knows?) and write the
checkpoint with it; optionally measure it against out-of-domain images."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mcloss.cli._common import (
    add_checkpoint,
    add_device,
    add_no_progress,
    check_output,
    checkpoint_path,
    finite_float,
    model_splits,
    progress_bar,
    run,
    say,
    seed_value,
    show_progress,
    writing_to,
)
from mcloss.core.checkpoint import load_checkpoint, save_checkpoint
from mcloss.core.device import resolve_device
from mcloss.core.domain import DOMAIN_K, DOMAIN_QUANTILE
from mcloss.core.errors import DatasetError, MclossError, ParameterError
from mcloss.core.files import printable
from mcloss.data.datasets import DATASET_KINDS
from mcloss.data.files import collect_inputs
from mcloss.evaluation.domain import DOMAIN_BANK, domain_auroc, fit_domain, image_scores, split_scores

__all__ = ["build_parser", "main", "ood_inputs", "ood_report"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcloss domain",
        description="Fit the domain check (a k-nearest-neighbour distance of F's pooled channels to the training "
        "images) on the train split, set its threshold so that --quantile of the test split passes, and write the "
        "checkpoint with it (the weights are unchanged). The app warns, and export and eval report, from it.",
    )
    add_checkpoint(p, required=True)
    p.add_argument("--data", required=True, help="the model's training data (its train and test splits)")
    p.add_argument("--dataset", default="auto", choices=list(DATASET_KINDS), help="dataset layout")
    p.add_argument("--out", required=True, help="the checkpoint to write (may be --checkpoint itself)")
    p.add_argument("--k", type=int, default=DOMAIN_K, help=f"the neighbour whose distance is the score (default {DOMAIN_K})")
    p.add_argument("--quantile", type=finite_float, default=DOMAIN_QUANTILE, help="share of the test split that passes")
    p.add_argument("--bank-size", type=int, default=DOMAIN_BANK, help="most training images kept (seeded sample)")
    p.add_argument("--ood", metavar="DIR", nargs="+", help="out-of-domain images (folders, files, globs): report the AUROC")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--seed", type=seed_value, default=0, help="the bank's sample")
    add_device(p)
    add_no_progress(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Fit and calibrate the domain check, write the checkpoint; prints the calibration (and AUROCs).

    Returns 0, or 2 on bad arguments or unusable inputs (one line on stderr).
    """
    return run("domain", build_parser(), argv, _domain)


def _domain(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 0:
        raise ParameterError("batch_size must be >= 1 and workers >= 0", parameter=("batch_size", "workers"))
    if Path(args.out).suffix != ".safetensors":
        raise ParameterError(f"--out {args.out}: must end in .safetensors")
    check_output(args.out, "--out", folder=False)  # before the fit, not after it
    device = resolve_device(args.device)
    source = checkpoint_path(args.checkpoint)
    model = load_checkpoint(source, device)
    train, test = model_splits(model, args.data, args.dataset)
    ood = ood_inputs("domain", args.ood) if args.ood else None
    try:
        with progress_bar("domain", show_progress(args), leave=False) as progress:
            calibration = fit_domain(
                model, train, test, k=args.k, quantile=args.quantile, bank_size=args.bank_size,
                batch_size=args.batch_size, workers=args.workers, seed=args.seed, device=device, progress=progress,
                source=str(Path(args.data).resolve()),
            )  # fmt: skip
    except MclossError as exc:
        raise DatasetError(f"{args.data}: {exc}", parameter=exc.parameters) from exc
    check = model.domain
    model.card["domain"] = {"threshold": check.threshold, "k": check.k, "pool_share": check.pool_share, **calibration}
    print(f"domain check: threshold {check.threshold:.4f} (k = {check.k}, {calibration['bank_images']} "
          f"training images); {calibration['held_out_pass']:.1%} of {calibration['held_out_images']} held-out "
          "in-domain images pass")  # fmt: skip
    if ood is not None:
        inside = split_scores(model, test, batch_size=args.batch_size, workers=args.workers, device=device)
        model.card["domain"]["ood"] = ood_report("domain", model, inside, ood, args.ood, "the test split")
    with writing_to(args.out, "--out"):
        save_checkpoint(model, args.out)
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def ood_inputs(command: str, ood: Sequence[str]) -> list[str]:
    """The out-of-domain image files of ``--ood`` (folders, files, globs), collected before the long work:
    an input that gives no file is a warning, and no file at all an error naming them."""
    found = collect_inputs(list(ood))
    files, problems = [], list(found.problems)
    for f in found.files:  # a path that names nothing is collected as a file
        if Path(f.source).exists():
            files.append(f.source)
        else:
            problems.append((f.source, "file not found"))
    if not files:
        reasons = "; ".join(f"{printable(source)}: {reason}" for source, reason in problems)
        raise DatasetError(f"ood: no out-of-domain image ({reasons or 'no image files'})", parameter="ood")
    for source, reason in problems:
        say(command, f"--ood {printable(source)}: {reason}")
    return files


def ood_report(command: str, model, inside, files: Sequence[str], ood: Sequence[str], inside_name: str) -> dict:
    """Score the out-of-domain ``files`` (of :func:`ood_inputs`), print the AUROC line and return its record
    (skipped files on stderr)."""
    outside, skipped = image_scores(model, files)
    for _, reason in skipped:  # the reason names the file
        say(command, f"skipped {printable(reason)}")
    if not len(outside):
        raise DatasetError("ood: no readable out-of-domain image", parameter="ood")
    result = domain_auroc(inside, outside, model.domain.threshold)
    lo, hi = result["auroc_ci"]
    print(f"AUROC of {len(outside)} out-of-domain images against {len(inside)} images of {inside_name}: "
          f"{result['auroc']:.4f} ({lo:.4f}–{hi:.4f}); flagged {result['outside_flagged']:.1%}, "
          f"{result['inside_pass']:.1%} of {inside_name} pass")  # fmt: skip
    return result | {"ood": [str(Path(o)) for o in ood]}
