"""The errors mcloss raises on purpose, the progress convention, and the one-line reason of an exception.

Every error the library raises on purpose derives from :class:`MclossError`; its message names the file or
the parameter (``lr``, not a command-line flag) and the reason, on one line. The ``mcloss`` command turns
exactly these into exit code 2; anything else is a fault and exits 1. Most also derive from the built-in
type a caller would expect (``ValueError`` for a bad value), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["first_line", "MclossError", "ParameterError", "DatasetError", "Progress"]

#: Progress callbacks: called as ``progress(done, total)``; the library never draws a bar itself.
Progress = Callable[[int, int], None]


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters; None: all), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class MclossError(Exception):
    """Base of every error mcloss raises on purpose: an input or a parameter it cannot use."""


class ParameterError(MclossError, ValueError):
    """A parameter's value cannot be used; the message names the parameter and what it accepts."""


class DatasetError(MclossError, ValueError):
    """A dataset root is missing or malformed; the message names the path and what was expected."""
