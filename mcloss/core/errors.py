"""The one-line reason of an exception, and the error types that several packages raise."""

from __future__ import annotations

__all__ = ["first_line", "DatasetError"]


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters; None: all), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class DatasetError(ValueError):
    """A dataset root is missing or malformed; the message names the path and what was expected."""
