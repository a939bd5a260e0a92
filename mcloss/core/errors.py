"""The errors mcloss raises on purpose, the progress convention, and the one-line reason of an exception.

Every error the library raises on purpose derives from :class:`MclossError`; its message names the file or
the parameter (``lr``, not a command-line flag) and the reason, on one line. The ``mcloss`` command turns
exactly these into exit code 2; anything else is a fault and exits 1. Most also derive from the built-in
type a caller would expect (``ValueError`` for a bad value), so ``except ValueError`` keeps working.

An error about parameters lists them in :attr:`MclossError.parameters`, spelled as in Python
(``batch_size``), and its message mentions each of them, the first mention being the parameter's name
itself: ``ParameterError("lr must be > 0, got -1.0", parameter="lr")``. The command line writes that first
mention as the command's flag (``--lr must be > 0, got -1.0``), so the library never spells a flag.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

__all__ = [
    "check_callback",
    "first_line",
    "MclossError",
    "ParameterError",
    "DatasetError",
    "OutputError",
    "FolderBusyError",
    "UnknownClassError",
    "OutOfRangeError",
    "Progress",
]

#: Progress callbacks: called as ``progress(done, total)``; the library never draws a bar itself.
Progress = Callable[[int, int], None]


#: How torch re-raises an error from a DataLoader worker process (or its pin-memory thread): the same type,
#: its message replaced by "Caught <Type> in <where>." and the original traceback, whose last line is
#: "<module>.<Type>: <the original message>".
_WRAPPED = re.compile(r"Caught (\w+) in [^\n]*\.\nOriginal Traceback \(most recent call last\):\n")


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters; None: all), or its type's name.

    For an error torch re-raised from a DataLoader worker, the original error's message: the file and the
    reason, where the re-raised message's first line says only in which worker it happened.
    """
    text = str(exc).strip()
    wrapped = _WRAPPED.match(text)
    if wrapped is not None:
        for line in reversed(text.splitlines()):
            head, colon, message = line.partition(": ")
            if colon and not line[:1].isspace() and head.rsplit(".", 1)[-1] == wrapped.group(1):
                text = message.strip()
                break
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class MclossError(Exception):
    """Base of every error mcloss raises on purpose: an input or a parameter it cannot use.

    Args:
        *args: the message (one line), as for any exception.
        parameter: the parameter (or parameters) the message names, spelled as in Python; the first mention
            of each in the message is its name (see the module docstring).
    """

    def __init__(self, *args: object, parameter: str | Sequence[str] | None = None) -> None:
        super().__init__(*args)
        #: The parameters the message names, in Python spelling (empty when it names none).
        self.parameters: tuple[str, ...] = (parameter,) if isinstance(parameter, str) else tuple(parameter or ())

    @property
    def parameter(self) -> str | None:
        """The first parameter the message names, or None."""
        return self.parameters[0] if self.parameters else None


class ParameterError(MclossError, ValueError):
    """A parameter's value cannot be used; the message names the parameter and what it accepts."""


class DatasetError(MclossError, ValueError):
    """A dataset root is missing or malformed; the message names the path and what was expected."""


class OutputError(MclossError, OSError):
    """An output path cannot be written (or its folder made); the message names the path and the reason."""


class FolderBusyError(OutputError):
    """An output folder that another live process is writing (:mod:`mcloss.core.lock`); the message names the
    folder and that process's pid."""


class UnknownClassError(MclossError, KeyError):
    """A class name the model does not have."""

    def __str__(self) -> str:  # the message, not KeyError's quoted repr of it
        return Exception.__str__(self)


class OutOfRangeError(MclossError, IndexError):
    """An index outside its range (a class index, a channel of a group); the message gives the range."""


def check_callback(value: object, parameter: str = "progress") -> None:
    """Refuse a ``progress`` (or other callback) parameter that is neither None nor callable (e.g. the
    ``progress=True`` of older versions), before any work is done.

    Raises:
        ParameterError: naming ``parameter``.
    """
    if value is not None and not callable(value):
        raise ParameterError(
            f"{parameter} must be a callable or None, got {type(value).__name__} {value!r}", parameter=parameter
        )
