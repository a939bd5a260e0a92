"""One writer per output folder: a lock file in the folder names the live process that writes there.

A process holds ``<folder>/<stem>.lock`` while it writes into the folder; shard ``i`` of ``n`` holds
``<stem>.shard-i-of-n.lock`` instead, because the shards of one split write their shares of one folder side
by side. Two holders clash unless they are different shards of one split; the second is refused with a
:class:`~mcloss.core.errors.FolderBusyError` naming the folder and the first one's pid, before it writes
anything.

The lock file is made with ``O_CREAT | O_EXCL`` and holds JSON: pid, host, start time, command and shard. Its
holder keeps an advisory ``flock`` on it for as long as it lives; the kernel drops that when the holder dies,
however it dies. So a lock file whose ``flock`` is free is stale: its holder was killed before it could remove
the file, and the next process takes it over (and says whose it was, :attr:`FolderLock.taken_over`). Where
``flock`` is missing (not POSIX) or refused (some network file systems), a lock is stale when it names this
host and a pid that is not running. While a process reads the locks and makes its own, it holds a ``flock``
on the folder itself, so that two starting at once cannot both win.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mcloss.core.errors import FolderBusyError
from mcloss.core.files import default_mode

try:
    import fcntl
except ImportError:  # not POSIX: locks are judged by their pid alone
    fcntl = None  # type: ignore[assignment]

__all__ = ["GATE_WAIT", "FolderLock", "LockHolder", "acquire_folder", "hold_folder", "lock_name"]

#: Seconds a process waits for another that is reading the locks of the same folder (a moment's work).
GATE_WAIT = 10.0


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a folder: what a lock file records.

    Attributes:
        pid: the holder's process id (None: the lock file was unreadable).
        host: the machine it runs on.
        started: when it took the lock (local time, ISO 8601).
        what: what it does there (``export``, ``merge``).
        command: its command line.
        shard: (i, n): the share of the folder it writes ((0, 1): all of it).
    """

    pid: int | None
    host: str = ""
    started: str = ""
    what: str = "process"
    command: str = ""
    shard: tuple[int, int] = (0, 1)

    def describe(self) -> str:
        """``export (pid 123 on host, shard 1 of 2, since 2026-01-02T03:04:05+0000)``; the host only when it is
        another one."""
        who = f"pid {self.pid}" if self.pid is not None else "unknown pid: unreadable lock file"
        where = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        share = f", shard {self.shard[0]} of {self.shard[1]}" if self.shard[1] > 1 else ""
        since = f", since {self.started}" if self.started else ""
        return f"{self.what} ({who}{where}{share}{since})"

    def to_json(self) -> dict:
        return {
            "pid": self.pid, "host": self.host, "started": self.started, "what": self.what, "command": self.command,
            "shard": list(self.shard),
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: object) -> LockHolder:
        """The holder a lock file's JSON names (pid None when it names none)."""
        if not isinstance(data, dict):
            return cls(None)
        pid, shard = data.get("pid"), data.get("shard")
        ok_shard = isinstance(shard, list) and len(shard) == 2 and all(isinstance(v, int) for v in shard)
        return cls(
            pid if isinstance(pid, int) and pid > 0 else None, str(data.get("host", "")), str(data.get("started", "")),
            str(data.get("what", "process")), str(data.get("command", "")), tuple(shard) if ok_shard else (0, 1),
        )  # fmt: skip


@dataclass
class FolderLock:
    """A folder this process holds (:func:`acquire_folder`) until :meth:`release`.

    Attributes:
        folder: the folder.
        path: the lock file.
        holder: what the lock file records about this process.
        taken_over: the stale locks (their holders dead) this one replaced or removed.
    """

    folder: Path
    path: Path
    holder: LockHolder
    taken_over: tuple[LockHolder, ...] = ()
    _fd: int | None = field(default=None, repr=False)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the ``flock`` (idempotent; a forked child never removes its parent's)."""
        fd, self._fd = self._fd, None
        if fd is None or os.getpid() != self.holder.pid:
            return
        try:
            if _same_file(self.path, fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def lock_name(stem: str, shard: tuple[int, int] = (0, 1)) -> str:
    """The lock file's name: ``<stem>.lock``, or ``<stem>.shard-i-of-n.lock`` for shard i of n."""
    i, n = shard
    return f"{stem}.lock" if n == 1 else f"{stem}.shard-{i}-of-{n}.lock"


def acquire_folder(
    folder: str | os.PathLike, *, stem: str, shard: tuple[int, int] = (0, 1), what: str = "process",
    command: str | None = None,
) -> FolderLock:  # fmt: skip
    """Hold ``folder`` (made if missing) for this process; release it with :meth:`FolderLock.release`.

    Args:
        folder: the folder to write into.
        stem: the lock files' name without ``.lock`` (e.g. ``.mcloss-export``).
        shard: (i, n): this process writes shard i of n (other shards of the same split may write beside it).
        what: what this process does there, for the message another one gets (``export``).
        command: its command line (default: this process's arguments).

    Raises:
        FolderBusyError: a live process holds the folder (or a shard that overlaps this one).
        OSError: the folder or its lock file cannot be made.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    own = folder / lock_name(stem, shard)
    taken: list[LockHolder] = []
    me = LockHolder(
        os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%S%z"), what,
        shlex.join(sys.argv) if command is None else command, tuple(shard),
    )  # fmt: skip
    with _gate(folder):
        for path, other in _lock_files(folder, stem):
            if path != own and not _clash(tuple(shard), other):
                continue
            live, holder = _probe(path)
            if live:
                raise FolderBusyError(_busy(folder, holder))
            if holder is not None:
                taken.append(holder)
        fd = _create(own, me, folder)
    return FolderLock(folder, own, me, tuple(taken), fd)


@contextlib.contextmanager
def hold_folder(
    folder: str | os.PathLike, *, stem: str, shard: tuple[int, int] = (0, 1), what: str = "process",
    command: str | None = None,
) -> Iterator[FolderLock]:  # fmt: skip
    """Hold ``folder`` while the block runs (:func:`acquire_folder`); released however the block ends."""
    lock = acquire_folder(folder, stem=stem, shard=shard, what=what, command=command)
    try:
        yield lock
    finally:
        lock.release()


def _busy(folder: Path, holder: LockHolder) -> str:
    return f"{folder}: in use by a live {holder.describe()}; wait for it to finish or stop it"


def _clash(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether two holders' shares of a folder overlap: they do unless they are different shards of one split."""
    return not (a[1] == b[1] > 1 and a[0] != b[0])


def _lock_files(folder: Path, stem: str) -> list[tuple[Path, tuple[int, int]]]:
    """The lock files in ``folder`` with their shards."""
    pattern = re.compile(re.escape(stem) + r"(?:\.shard-(\d+)-of-(\d+))?\.lock")
    found = []
    for entry in os.scandir(folder):
        match = pattern.fullmatch(entry.name)
        if match:
            shard = (int(match.group(1)), int(match.group(2))) if match.group(2) else (0, 1)
            found.append((Path(entry.path), shard))
    return sorted(found)


def _probe(path: Path) -> tuple[bool, LockHolder | None]:
    """(live, holder) of a lock file; a stale one is removed. holder None: the file is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False, None
    try:
        holder = _read(fd)
        if _live(fd, holder):
            return True, holder
        if not _same_file(path, fd):  # removed (and perhaps made anew) meanwhile: judge that one
            return _probe(path)
        path.unlink(missing_ok=True)  # stale: its flock is ours now
        return False, holder
    finally:
        os.close(fd)


def _live(fd: int, holder: LockHolder) -> bool:
    """Whether the lock file open at ``fd`` has a live holder: its ``flock`` is taken (then this process takes it),
    or, without ``flock``, it names a running pid of this host (or another host's, which cannot be checked)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # no flock on this file system: judge by the pid
            pass
        else:
            return False
    if holder.pid is None:
        return False
    if holder.host and holder.host != socket.gethostname():
        return True
    return _pid_running(holder.pid)


def _pid_running(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would signal it: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(fd: int) -> LockHolder:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    try:
        return LockHolder.from_json(json.loads(b"".join(chunks).decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return LockHolder(None)


def _create(path: Path, me: LockHolder, folder: Path) -> int:
    """Make the lock file ``path`` (it must not exist), take its ``flock`` and write ``me`` into it; its fd."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, default_mode())
    except FileExistsError:  # made by a process that did not wait at the gate (no flock on the folder)
        live, holder = _probe(path)
        if live:
            raise FolderBusyError(_busy(folder, holder)) from None
        return _create(path, me, folder)  # it was stale (now removed) or is gone
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):  # no flock here: the pid tells (see _live)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        data = (json.dumps(me.to_json()) + "\n").encode("utf-8")
        while data:
            data = data[os.write(fd, data) :]
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open at ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


@contextlib.contextmanager
def _gate(folder: Path) -> Iterator[None]:
    """Hold a ``flock`` on the folder itself while the block runs (waiting up to :data:`GATE_WAIT` seconds for
    another process at the gate); where that is impossible the block runs anyway."""
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY)
        deadline = time.monotonic() + GATE_WAIT
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    fd = None
                else:
                    time.sleep(0.01)
            except OSError:
                os.close(fd)
                fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)
