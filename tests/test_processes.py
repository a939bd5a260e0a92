"""Processes that die with their parent (issue 26 item 3): DataLoader workers with their export, torchrun ranks
with their launcher (the torchrun run itself is in test_hardening.py), by the kernel's parent-death signal or a
watching thread."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: A parent (argv[1]: "watch" or "signal") that starts a child which dies with it, writes the child's pid to
#: argv[2] once the child is armed, and sleeps until it is killed.
PARENT = """
import subprocess, sys, time
child = '''
import os, sys, time
from mcloss.core.processes import die_with_parent
die_with_parent(watch=sys.argv[1] == "watch")
open(sys.argv[2] + ".tmp", "w").write(str(os.getpid()))
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
time.sleep(120)
'''
subprocess.Popen([sys.executable, "-c", child, sys.argv[1], sys.argv[2]])
time.sleep(120)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["signal", "watch"])
def test_child_dies_when_its_parent_is_killed(tmp_path, how):
    pidfile = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, how, str(pidfile)], cwd=REPO)
    child = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not pidfile.exists():
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert _running(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _running(child):
            time.sleep(0.05)
        assert not _running(child), f"the child ({how}) outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        if child is not None:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)


def test_a_parent_that_died_before_the_request_is_noticed():
    code = "import os; from mcloss.core.processes import die_with_parent; die_with_parent(os.getppid() + 10**6)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("pidfd", [True, False])
def test_a_process_dies_with_one_that_is_not_its_parent(tmp_path, pidfd):
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    pidfile = tmp_path / "watcher.pid"
    code = (
        "import os, sys, time\n"
        "if sys.argv[3] == 'poll': del os.pidfd_open  # as where there is none\n"
        "from mcloss.core.processes import die_with\n"
        "die_with(int(sys.argv[1]))\n"
        "open(sys.argv[2] + '.tmp', 'w').write(str(os.getpid())); os.replace(sys.argv[2] + '.tmp', sys.argv[2])\n"
        "time.sleep(120)\n"
    )
    watcher = subprocess.Popen([sys.executable, "-c", code, str(watched.pid), str(pidfile), "pidfd" if pidfd else "poll"], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not pidfile.exists():
            time.sleep(0.05)
        assert _running(watcher.pid)
        watched.kill()  # not reaped yet: a zombie for a while, which is no longer running
        time.sleep(0.1)
        watched.wait()
        assert watcher.wait(timeout=20) == -signal.SIGKILL
    finally:
        for proc in (watched, watcher):
            proc.kill()
            proc.wait()


def test_a_watched_process_already_gone_ends_the_watcher_at_once():
    code = "import os, time; from mcloss.core.processes import die_with; die_with(2**22 + 12345); time.sleep(60)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60)
    assert proc.returncode == -signal.SIGKILL
