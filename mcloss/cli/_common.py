"""What every ``mcloss`` command shares: common arguments, the default checkpoint, errors → exit codes."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from mcloss.core.checkpoint import CHECKPOINT_ENV, default_checkpoint
from mcloss.core.errors import first_line

__all__ = [
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "USAGE_ERRORS",
    "add_checkpoint",
    "check_at_least",
    "progress_bar",
    "add_device",
    "checkpoint_path",
    "command_line",
    "fail",
    "run",
    "say",
]

EXIT_OK = 0
#: Some inputs were rejected (the rest was done).
EXIT_REJECTED = 1
#: Bad arguments or unusable inputs: nothing (more) was done.
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Exceptions that mean "this input or argument cannot be used", reported as one line with exit 2.
USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, IndexError, RuntimeError, OSError)


def say(command: str, message: str) -> None:
    """Print ``mcloss <command>: <message>`` on stderr."""
    print(f"mcloss {command}: {message}", file=sys.stderr)


def fail(command: str, exc: BaseException) -> int:
    """Report an exception as one line (``mcloss <command>: error: <reason>``); returns :data:`EXIT_USAGE`."""
    reason = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else first_line(exc, limit=None)
    say(command, f"error: {reason}")
    return EXIT_USAGE


def run(
    command: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    body: Callable[[argparse.Namespace], int | None],
    errors: tuple[type[BaseException], ...] = USAGE_ERRORS,
) -> int:
    """Parse ``argv`` and run a command's body; returns the exit code.

    ``--help`` gives 0 and a usage error 2 (one line on stderr says why); any of ``errors`` raised by the body
    becomes one line on stderr (:func:`fail`) and exit code 2.
    """
    def one_line(message: str) -> None:  # argparse's usage block would bury the reason
        print(f"mcloss {command}: error: {message} (see mcloss {command} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    parser.error = one_line
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(body(args) or 0)
    except errors as exc:
        return fail(command, exc)


def command_line(command: str, argv: Sequence[str] | None) -> str:
    """The command as a user would type it (recorded next to outputs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["mcloss", command, *args])


def add_device(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: str | None = "auto") -> None:
    """``--device auto|cpu|cuda[:N]``."""
    parser.add_argument(
        "--device", default=default, help=f"auto, cpu or cuda (default {default or 'auto'}; auto picks CUDA when present)"
    )


def add_checkpoint(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--checkpoint``; when optional, it defaults to :func:`mcloss.core.checkpoint.default_checkpoint`."""
    if required:
        parser.add_argument("--checkpoint", required=True, help="an mcloss *.safetensors checkpoint")
        return
    parser.add_argument(
        "--checkpoint",
        default=None,
        help=f"mcloss checkpoint (default: ${CHECKPOINT_ENV}, else the project's checkpoints/default.safetensors)",
    )


def checkpoint_path(given: str | None) -> Path:
    """The checkpoint to use: the one given, else the default; a missing file is an error naming the path."""
    path = Path(given) if given else default_checkpoint()
    if not path.is_file():
        if given:
            hint = ""
        elif os.environ.get(CHECKPOINT_ENV):
            hint = f" (named by ${CHECKPOINT_ENV})"
        else:
            hint = f" (the default; set {CHECKPOINT_ENV}, train one, or pass --checkpoint)"
        raise ValueError(f"{path}: checkpoint not found{hint}")
    return path


def check_at_least(*checks: tuple[str, float, float]) -> None:
    """Raise ValueError naming the first ``(flag, value, least)`` whose value is below its least."""
    for flag, value, least in checks:
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")


@contextlib.contextmanager
def progress_bar(desc: str, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr (None when not ``enabled``). The bar
    is made on the first report, when the total is known, starting at ``done``, and closed on exit."""
    if not enabled:
        yield None
        return
    bars = []

    def report(done: int, total: int) -> None:
        if not bars:
            from tqdm import tqdm

            bars.append(tqdm(total=total, initial=done, unit="img", desc=desc, file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        yield report
    finally:
        for bar in bars:
            bar.close()
