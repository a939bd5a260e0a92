"""What every ``mcloss`` command shares: common arguments, the default checkpoint, errors → exit codes.

Exit codes: 0 done; 2 bad arguments or unusable inputs (argparse's usage errors and every
:class:`~mcloss.core.errors.MclossError`, one line on stderr, its parameters written as the command's flags);
1 a fault (any other exception: one line ``error: <Type>: <reason>``, and the traceback with ``--debug`` or
``MCLOSS_DEBUG=1``), or, for ``mcloss export``, some inputs rejected; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import re
import shlex
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from mcloss.core.checkpoint import CHECKPOINT_ENV, default_checkpoint
from mcloss.core.errors import MclossError, OutputError, ParameterError, Progress, first_line

__all__ = [
    "DEBUG_ENV",
    "EXIT_OK",
    "EXIT_FAULT",
    "EXIT_REJECTED",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "add_checkpoint",
    "add_no_progress",
    "check_at_least",
    "check_output",
    "finite_float",
    "seed_value",
    "SEED_MAX",
    "defaults_of",
    "debug_mode",
    "debugging",
    "progress_bar",
    "progress_bars",
    "add_device",
    "checkpoint_path",
    "command_line",
    "crash",
    "fail",
    "flag_table",
    "naming_flags",
    "run",
    "say",
    "show_progress",
    "writing_to",
]

EXIT_OK = 0
#: An unexpected error (a fault, not the user's input): one line, the traceback with ``--debug``.
EXIT_FAULT = 1
#: Some inputs were rejected (the rest was done).
EXIT_REJECTED = 1
#: Bad arguments or unusable inputs: nothing (more) was done.
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Set to 1 to show the traceback of an error (as ``--debug`` does).
DEBUG_ENV = "MCLOSS_DEBUG"
_DEBUG: ContextVar[bool] = ContextVar("mcloss_debug", default=False)


def say(command: str, message: str) -> None:
    """Print ``mcloss <command>: <message>`` on stderr."""
    print(f"mcloss {command}: {message}", file=sys.stderr)


@contextlib.contextmanager
def debug_mode(on: bool = True) -> Iterator[None]:
    """While active, commands show tracebacks as with ``--debug`` (``mcloss --debug COMMAND``)."""
    token = _DEBUG.set(on)
    try:
        yield
    finally:
        _DEBUG.reset(token)


def debugging() -> bool:
    """Whether errors show their traceback: ``--debug`` before the command, or ``MCLOSS_DEBUG`` set (not 0)."""
    return _DEBUG.get() or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def flag_table(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's destination → its long flag (``batch_size`` → ``--batch-size``), from the parser's options."""
    table = {}
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest not in table:
            table[action.dest] = longs[0]
    return table


def naming_flags(message: str, parameters: Sequence[str], flags: Mapping[str, str]) -> str:
    """``message`` with the first mention of each of ``parameters`` written as its flag in ``flags``.

    A mention ``name=True`` becomes the flag alone (``download=True`` → ``--download``). A parameter without
    a flag stays as it is; one with a flag that the message does not mention puts the flag in front
    (``--lr: ...``).
    """
    for name in parameters:
        flag = flags.get(name)
        if flag is None:
            continue
        mention = re.compile(rf"(?<![\w./\\-]){re.escape(name)}(?:=True\b)?(?![\w/\\-]|\.\w)")
        message, found = mention.subn(lambda _, flag=flag: flag, message, count=1)
        if not found:
            message = f"{flag}: {message}"
    return message


def fail(command: str, exc: BaseException, flags: Mapping[str, str] | None = None) -> int:
    """Report an exception as one line (``mcloss <command>: error: <reason>``); returns :data:`EXIT_USAGE`.

    The parameters a :class:`~mcloss.core.errors.MclossError` names are written as their ``flags``.
    """
    reason = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else first_line(exc, limit=None)
    if isinstance(exc, MclossError) and flags:
        reason = naming_flags(reason, exc.parameters, flags)
    say(command, f"error: {reason}")
    return EXIT_USAGE


def crash(command: str, exc: BaseException, debug: bool = False) -> int:
    """Report an unexpected exception: its traceback when ``debug``, then one line
    (``mcloss <command>: error: <Type>: <reason>``); returns :data:`EXIT_FAULT`."""
    if debug:
        _print_traceback(exc)
    say(command, f"error: {type(exc).__name__}: {first_line(exc, limit=None)}")
    return EXIT_FAULT


def _print_traceback(exc: BaseException) -> None:
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


#: Pillow's DecompressionBombWarning, matched by its text (this module does not import Pillow).
_PILLOW_BOMB_WARNING = r"Image size \(\d+ pixels\) exceeds limit of \d+ pixels"
#: torch.load's warning before it refuses a TorchScript archive under weights_only.
_TORCHSCRIPT_WARNING = r"'torch.load' received a zip file that looks like a TorchScript archive"


def run(
    command: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    body: Callable[[argparse.Namespace], int | None],
    *,
    flags: Mapping[str, str] | None = None,
) -> int:
    """Parse ``argv`` and run a command's body; returns the exit code.

    ``--help`` gives 0 and a usage error 2 (one line on stderr says why). A
    :class:`~mcloss.core.errors.MclossError` raised by the body becomes one line on stderr (:func:`fail`),
    its parameters written as the parser's flags (``flags`` adds or overrides parameter → flag), and exit
    code 2; Ctrl-C exits 130; any other exception is a fault (:func:`crash`, exit 1). The parser gains
    ``--debug``, which (like ``MCLOSS_DEBUG=1``) shows the traceback of an error.
    """
    def one_line(message: str) -> None:  # argparse's usage block would bury the reason
        print(f"mcloss {command}: error: {message} (see mcloss {command} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    if "--debug" not in parser._option_string_actions:
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show the traceback of an error")  # fmt: skip
    parser.error = one_line
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    debug = bool(vars(args).pop("debug", False)) or debugging()
    try:
        with warnings.catch_warnings():  # mcloss limits images itself (max_pixels, named in its own errors):
            warnings.filterwarnings("ignore", message=_PILLOW_BOMB_WARNING)  # Pillow's from 89 MP is noise here
            warnings.filterwarnings("ignore", message=_TORCHSCRIPT_WARNING)  # the import refuses it in one line
            return int(body(args) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except MclossError as exc:
        if debug:
            _print_traceback(exc)
        return fail(command, exc, flag_table(parser) | dict(flags or {}))
    except KeyboardInterrupt as exc:
        if debug:
            _print_traceback(exc)
        print(file=sys.stderr)
        say(command, "interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        return crash(command, exc, debug)


@contextlib.contextmanager
def writing_to(path: str | os.PathLike, flag: str = "--out") -> Iterator[None]:
    """Turn an OSError while writing a command's outputs into an OutputError naming ``flag`` and ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write results ({exc})") from exc


def command_line(command: str, argv: Sequence[str] | None) -> str:
    """The command as a user would type it (recorded next to outputs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["mcloss", command, *args])


def add_device(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: str | None = "auto") -> None:
    """``--device auto|cpu|cuda[:N]``."""
    parser.add_argument(
        "--device", default=default, help=f"auto, cpu or cuda (default {default or 'auto'}; auto picks CUDA when present)"
    )


def add_no_progress(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--no-progress`` for a command whose bars are drawn only when stderr is a terminal (:func:`show_progress`)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only when stderr is a terminal)")


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars: stderr is a terminal and ``--no-progress`` was not given."""
    return sys.stderr.isatty() and not args.no_progress


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
        what = "is a directory, not a checkpoint file" if path.is_dir() else "checkpoint not found"
        raise ParameterError(f"{path}: {what}{hint}")
    return path


def defaults_of(function: Callable[..., Any]) -> dict[str, Any]:
    """The keyword defaults of a library function, so that its command's flags default to the same values
    without writing them again."""
    return {
        name: param.default
        for name, param in inspect.signature(function).parameters.items()
        if param.default is not inspect.Parameter.empty
    }


def check_at_least(*checks: tuple[str, float, float]) -> None:
    """Raise a ParameterError naming the first ``(parameter, value, least)`` whose value is below its least (or
    not a finite number: NaN passes every comparison)."""
    for name, value, least in checks:
        if not math.isfinite(value) or value < least:
            raise ParameterError(f"{name} must be >= {least}, got {value}", parameter=name)


#: The largest seed every generator mcloss seeds takes (numpy's legacy one stops at 2**32 - 1).
SEED_MAX = 2**32 - 1


def seed_value(text: str) -> int:
    """argparse type of a ``--seed``: an integer in 0..:data:`SEED_MAX`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{SEED_MAX}, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{SEED_MAX}, got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse type of a number that must be finite (``nan`` and ``inf`` parse as floats)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def check_output(path: str | os.PathLike, flag: str, *, folder: bool) -> None:
    """Refuse, before any work, an output that cannot be written: a ``folder`` that is a file, a file that is a
    folder, or one under a file or a folder this process may not write into."""
    target = Path(path)
    if target.exists() and target.is_dir() != folder:
        raise OutputError(f"{flag} {path}: {'is a file, not a folder' if folder else 'is a folder, not a file'}")
    above = target.parent if not target.exists() or not folder else target
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise OutputError(f"{flag} {path}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: {above} is not writable")


def model_splits(model, data: str, dataset: str = "auto", *, download: bool = False) -> tuple[Any, Any]:
    """The (train, test) splits of ``data`` read with the model's eval transform; their classes must be the
    model's (else a DatasetError naming ``data``)."""
    from mcloss.data.datasets import build_datasets, check_classes

    train, test, class_names = build_datasets(data, dataset, model.transform, model.transform, download=download)
    check_classes(data, class_names, model.class_names)
    return train, test


@contextlib.contextmanager
def progress_bar(
    desc: str, enabled: bool = True, *, unit: str = "img", leave: bool = True
) -> Iterator[Progress | None]:
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr (None when not ``enabled``). The bar
    is made on the first report, when the total is known, starting at ``done``, and closed on exit
    (``leave=False``: and cleared)."""
    with progress_bars(enabled, unit=unit, leave=leave) as bars:
        yield None if bars is None else bars(desc)


@contextlib.contextmanager
def progress_bars(
    enabled: bool = True, *, unit: str = "it", leave: bool = False
) -> Iterator[Callable[[str], Progress] | None]:
    """Progress bars for a run of passes, one after another: ``bars(desc)`` closes the previous pass's bar and
    returns the new pass's ``progress(done, total)`` callback (see :func:`progress_bar`); None when not
    ``enabled``. Every bar is closed on exit."""
    if not enabled:
        yield None
        return
    shown: list[Any] = []

    def start(desc: str) -> Progress:
        for bar in shown:
            bar.close()
        shown.clear()
        mine: list[Any] = []

        def report(done: int, total: int) -> None:
            if not mine:
                from tqdm import tqdm

                mine.append(tqdm(total=total, initial=done, unit=unit, desc=desc, leave=leave, file=sys.stderr))
                shown.append(mine[0])
            mine[0].update(done - mine[0].n)

        return report

    try:
        yield start
    finally:
        for bar in shown:
            bar.close()
