"""``mcloss train``: train an MC-Loss (or CE-only) model with the official recipes; resumable, 1..N processes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
from collections.abc import Iterator, Sequence

from mcloss.cli._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    add_no_progress,
    command_line,
    fail,
    progress_bars,
    run,
    say,
    seed_value,
    show_progress,
)
from mcloss.core.device import resolve_device
from mcloss.core.errors import ParameterError
from mcloss.core.transforms import NORMALIZATIONS
from mcloss.data.datasets import DATASET_KINDS
from mcloss.training.config import (
    LOSSES,
    OPTIMIZERS,
    RECIPES,
    SCHEDULES,
    config_for_resume,
    make_config,
)
from mcloss.training.loop import train

__all__ = ["build_parser", "main"]

COMMAND = "train"


def _xi(text: str) -> int | str:
    if text.lower() in ("auto", "none"):
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcloss train",
        description="Train an MC-Loss (or CE-only) model. Unset options take the --recipe's values (the official "
        "recipes: README.md, \"Training\").",
    )
    _data_and_model_options(p)
    _loss_options(p)
    _optimization_options(p)
    _run_options(p)
    return p


def _data_and_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", help="dataset root (required unless --resume)")
    g.add_argument("--dataset", choices=DATASET_KINDS, help="dataset layout (default auto)")
    g.add_argument("--download", action="store_const", const=True, help="download torchvision datasets that support it")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", help="vgg16, resnet18, resnet50, ... (official-pretrained: resnet50)")
    g.add_argument("--pretrained", help="torchvision weights name (IMAGENET1K_V1), a local weights file, or none")
    g.add_argument(
        "--last-stage", type=int, choices=(2, 3, 4),
        help="ResNets: the stage widened to K at stride 1 that gives F (default 4, official); 3 or 2 drop the "
        "later stages for finer maps from a smaller receptive field",
    )  # fmt: skip
    g.add_argument("--xi", type=_xi, help="channels per class, or 'auto' for the uneven split of the native width")


def _loss_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=LOSSES, help="mc: CE + α·L_dis + β·L_div (default); ce: CE only; dis: CE + α·L_dis")
    g.add_argument("--alpha", type=float, help="weight of L_dis (scratch 1.5, pretrained 0.0005)")
    g.add_argument("--beta", type=float, help="weight of L_div (scratch 20, pretrained 0.005)")
    g.add_argument(
        "--div-warmup", type=float,
        help="ramp β linearly from 0 over the first N epochs (default 0: the official constant β)",
    )  # fmt: skip
    g.add_argument(
        "--dis-topk", type=float, metavar="SHARE",
        help="L_dis logit = mean of the largest SHARE of each CCMP map's positions (default 1: the official "
        "spatial mean; 1/(H·W): the spatial max)",
    )  # fmt: skip
    g.add_argument(
        "--dis-topk-from", type=float, metavar="SHARE",
        help="start L_dis's pool at SHARE (1: the spatial mean) and narrow it geometrically to --dis-topk over the "
        "first half of the epochs (default: --dis-topk throughout)",
    )  # fmt: skip
    g.add_argument("--drop", type=int, help="channels masked per group in L_dis (default: 1 of 3, 4 of 10/11)")


def _optimization_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimization")
    g.add_argument("--recipe", choices=list(RECIPES), help="official-scratch (default) or official-pretrained (default with --pretrained)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="total batch per step (split over DDP ranks)")
    g.add_argument("--img-size", type=int, help="network input side S")
    g.add_argument("--lr", type=float, help="learning rate of the head and new layers")
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=SCHEDULES, help="step: /10 at 50%% and 75%% of the epochs; cosine")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="sgd (official, with --momentum) or adamw")
    g.add_argument("--backbone-lr-factor", type=float, help="pretrained backbone lr = lr × this (pretrained recipe 0.1)")
    g.add_argument("--normalization", choices=list(NORMALIZATIONS), help="half (0.5/0.5) or imagenet")


def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (default 2)")
    g.add_argument("--seed", type=seed_value, help="random seed (default 0)")
    g.add_argument("--device", help="auto, cpu or cuda (default auto)")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    g.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="no bf16 autocast on CUDA")
    g.add_argument(
        "--cpu-bf16", action=argparse.BooleanOptionalAction, default=None,
        help="bf16 autocast of the training step on the CPU too: about 2x faster on CPUs with native bf16 "
        "(AVX512-BF16, AMX), slower elsewhere; evaluation stays fp32 (default off)",
    )  # fmt: skip
    g.add_argument("--limit-batches", type=int, help="at most N train and N test batches per epoch (for tests)")
    add_no_progress(g)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mcloss train``; returns 0 when done, 2 on bad input, 130 when interrupted."""
    parser = build_parser()
    return run(COMMAND, parser, argv, lambda args: _train(parser, args, command_line(COMMAND, argv)))


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int:
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("out", "resume", "recipe", "no_progress")}
    given["command"] = command
    try:
        if args.resume:
            if args.recipe is not None:
                given["recipe"] = args.recipe
            config = config_for_resume(args.out, given)
        else:
            if "data" not in given:
                parser.print_usage(sys.stderr)
                return fail(COMMAND, ParameterError("--data is required (unless --resume)"))
            pretrained = given.get("pretrained")
            recipe = args.recipe or (
                "official-pretrained" if pretrained and str(pretrained).lower() != "none" else "official-scratch"
            )
            config = make_config(recipe, out=args.out, **given)
        resolve_device(config.device)  # CUDA asked for but absent: fails before the run directory is touched
        with _show_run_messages(), progress_bars(show_progress(args)) as bars:
            summary = train(config, progress=bars)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        say(COMMAND, "interrupted before an epoch completed; nothing was written")
        return EXIT_INTERRUPTED
    if summary["status"] == "interrupted":
        if summary["rank"] == 0:
            done = summary["epochs_completed"]
            if done:
                message = (
                    f"interrupted; kept epoch {done} in {summary['out']}. "
                    f"Continue with: mcloss train --out {shlex.quote(summary['out'])} --resume"
                )
            else:
                message = "interrupted before the first epoch completed; nothing was saved"
            print(file=sys.stderr)
            say(COMMAND, message)
        return EXIT_INTERRUPTED
    if summary["rank"] == 0 and summary["best_epoch"]:
        print(f"best test FC top-1 {100 * summary['best_test_acc_fc']:.2f}% at epoch {summary['best_epoch']}; run in {summary['out']}")
    return EXIT_OK


class _RunMessages(logging.Formatter):
    """The library's run messages as ``mcloss train`` shows them: notes as ``note: ...``, warnings prefixed."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if getattr(record, "note", False):
            return f"note: {message}"
        if record.levelno >= logging.WARNING:
            return f"mcloss {COMMAND}: warning: {message}"
        return message


@contextlib.contextmanager
def _show_run_messages() -> Iterator[None]:
    """While training, show the ``mcloss.training`` log: progress on stdout, notes and warnings on stderr."""
    logger = logging.getLogger("mcloss.training")
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    notices = logging.StreamHandler(sys.stderr)
    notices.setLevel(logging.WARNING)
    for handler in (progress, notices):
        handler.setFormatter(_RunMessages())
        logger.addHandler(handler)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # shown once, whatever the root logger does
    try:
        yield
    finally:
        for handler in (progress, notices):
            logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
