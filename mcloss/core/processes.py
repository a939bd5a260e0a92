"""A child process that dies with its parent: DataLoader decoding workers with their export, torchrun ranks
with their launcher.

On Linux the kernel delivers SIGKILL to the child when its parent dies, even by SIGKILL (the parent-death
signal of ``prctl``); elsewhere, or where that request fails, a daemon thread polls the parent's pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["WATCH_INTERVAL", "die_with_parent"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: Seconds between two looks at the parent's pid, where the parent is watched by a thread.
WATCH_INTERVAL = 0.5


def die_with_parent(parent: int | None = None, *, watch: bool = False) -> None:
    """Make this process die (SIGKILL) as soon as its parent ``parent`` (a pid; default: the current parent)
    dies, instead of lingering, re-parented, with its memory and its open files.

    Pass the parent's pid when it was read before this process started (a forked worker): a parent that
    died before the request took effect is noticed, and this process exits at once.

    Args:
        parent: the parent's pid.
        watch: poll the parent from a daemon thread every :data:`WATCH_INTERVAL` seconds even where the
            kernel could signal the death (the fallback elsewhere).
    """
    parent = os.getppid() if parent is None else parent
    signalled = not watch and _request_death_signal()
    if os.getppid() != parent:  # the parent died before the request took effect
        _die()
    if not signalled:
        threading.Thread(target=_watch, args=(parent,), name="mcloss-parent-watch", daemon=True).start()


def _request_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; whether the request was accepted."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc, or no prctl in it
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL)
    _die()


def _die() -> None:
    """End this process at once, as the parent-death signal would."""
    kill = getattr(signal, "SIGKILL", None)
    if kill is not None:
        os.kill(os.getpid(), kill)
    os._exit(1)
