"""Ctrl-C / SIGTERM handling: both become KeyboardInterrupt, deferred while files are being written."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["InterruptGuard"]


class InterruptGuard:
    """While active, SIGINT and SIGTERM raise KeyboardInterrupt, except inside :meth:`critical` sections,
    where the signal is remembered and raised when the section ends.

    Handlers are only installed from the main thread (elsewhere the guard is a no-op besides
    :meth:`critical`); previous handlers are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._depth = 0
        self.pending: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._depth > 0:
            self.pending = signum
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Run the body to completion even if Ctrl-C / SIGTERM arrives; then raise KeyboardInterrupt."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            raise KeyboardInterrupt(signal.Signals(signum).name)
