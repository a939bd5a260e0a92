"""A child process that dies with its parent: DataLoader decoding workers with their export, torchrun ranks
with their launcher; and one that dies with a given process (:func:`die_with`: an export's writer processes,
forked by whichever thread runs the export, while the kernel's parent-death signal follows the forking thread,
not the process). Also the CPUs this process may use (:func:`usable_cpus`).

On Linux the kernel delivers SIGKILL to the child when its parent dies, even by SIGKILL (the parent-death
signal of ``prctl``); elsewhere, or where that request fails, a daemon thread polls the parent's pid.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time

__all__ = ["WATCH_INTERVAL", "die_with", "die_with_parent", "usable_cpus"]

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


def die_with(pid: int) -> None:
    """Make this process die (SIGKILL) as soon as the process ``pid`` ends, whatever this process's parent.

    A daemon thread waits for it: on a Linux pid file descriptor (woken the moment it ends, zombie or not),
    elsewhere by looking every :data:`WATCH_INTERVAL` seconds. A ``pid`` already gone ends this process at
    once, from that thread.
    """
    threading.Thread(target=_wait_for, args=(pid,), name="mcloss-process-watch", daemon=True).start()


def _wait_for(pid: int) -> None:
    try:
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or already gone
        while _exists(pid):
            time.sleep(WATCH_INTERVAL)
    else:
        select.select([handle], [], [])  # readable once the process has ended
    _die()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system tells it, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
