"""Issue 26 item 3: one live export per output folder (a lock naming its pid; a killed export's lock is taken
over; shards of one split side by side), removed however the export ends."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image

import mcloss
from mcloss.cli.export import main
from mcloss.core import lock as lockmod
from mcloss.core.errors import FolderBusyError, OutputError
from mcloss.core.lock import LockHolder, acquire_folder, hold_folder, lock_name
from mcloss.explainability import export as export_module
from mcloss.explainability.export import LOCK_STEM, ExportConfig, export

REPO = Path(__file__).resolve().parents[1]
#: A process that holds a folder as an export would, until it is killed (imports no torch: it starts fast).
HOLD = """
import sys, time
from mcloss.core.lock import hold_folder
shard = tuple(int(v) for v in sys.argv[3].split("/"))
with hold_folder(sys.argv[1], stem=sys.argv[2], shard=shard, what="export"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    mcloss.save_checkpoint(tiny_model(4, class_names=["ant", "bee", "cat", "dog"]), path)
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 50 + i, 3), dtype=np.uint8)).save(src / f"i{i}.png")
    return src


@contextlib.contextmanager
def _holder(out: Path, shard: str = "0/1") -> Iterator[subprocess.Popen]:
    """Another process holding ``out`` while the block runs (killed at the end if still alive)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out), LOCK_STEM, shard], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _listing(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _locks(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".mcloss-export*.lock"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _args(checkpoint: Path, src: Path, out: Path, *more: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--input", str(src), "--out", str(out), "--workers", "0", "--no-progress",
            "--tile-height", "48", *more]  # fmt: skip


# ------------------------------------------------------------------------------------------ the --out lock


def test_export_into_a_folder_a_live_export_holds_is_refused_in_one_line(tmp_path, checkpoint, images, capsys):
    out = tmp_path / "out"
    with _holder(out) as holder:
        before = _listing(out)
        assert list(before) == [".mcloss-export.lock"]
        record = json.loads((out / ".mcloss-export.lock").read_text())
        assert record["pid"] == holder.pid and record["what"] == "export" and record["started"]
        for extra in ([], ["--shard", "1/2"]):  # a whole export, and a shard (it overlaps the holder's whole)
            assert main(_args(checkpoint, images, out, *extra)) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert err.startswith(f"mcloss export: error: {out}: in use by a live export (pid {holder.pid}"), err
            assert _listing(out) == before  # nothing written, the holder's lock untouched
        assert main(["--merge", str(out)]) == 2  # a merge would read and write what the export is writing
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {holder.pid}" in err and str(out) in err, err
        # the library refuses the same way
        model = mcloss.load_checkpoint(checkpoint)
        config = ExportConfig(checkpoint=str(checkpoint), input=[str(images)], out=str(out), workers=0)
        with pytest.raises(FolderBusyError, match=f"pid {holder.pid}"):
            export(model, config, device=torch.device("cpu"))
        assert isinstance(FolderBusyError("x"), OutputError)
        assert _listing(out) == before
    # the holder was killed: its lock file stays, stale, and the next export takes it over (and says so)
    assert _locks(out) == [".mcloss-export.lock"]
    assert main(_args(checkpoint, images, out)) == 0
    err = capsys.readouterr().err
    assert f"{out}: took over the stale lock of export (pid {holder.pid}" in err and "no longer running" in err
    assert json.loads((out / "manifest.json").read_text())["counts"]["ok"] == 2
    assert _locks(out) == []


def test_shards_of_one_split_share_a_folder_and_others_are_refused(tmp_path, checkpoint, images, capsys):
    out = tmp_path / "out"
    with _holder(out, "0/2") as holder:
        assert main(_args(checkpoint, images, out, "--shard", "1/2")) == 0  # its own share, beside shard 0
        assert _locks(out) == [".mcloss-export.shard-0-of-2.lock"]
        capsys.readouterr()
        for shard in ("0/2", "0/3"):  # the same shard, or another split: overlapping shares
            assert main(_args(checkpoint, images, out, "--shard", shard)) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"pid {holder.pid}, shard 0 of 2" in err, err
        assert main(["--merge", str(out)]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    assert main(_args(checkpoint, images, out, "--shard", "0/2")) == 0  # takes the dead shard's lock over
    assert "took over the stale lock of export" in capsys.readouterr().err
    assert main(["--merge", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["ok"] == 2
    assert _locks(out) == [] and not (out / ".mcloss-export.lock").exists()


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, checkpoint, images, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    (out / ".mcloss-export.lock").write_text(json.dumps(LockHolder(dead, socket.gethostname(), "then", "export").to_json()))
    (out / ".mcloss-export.shard-1-of-2.lock").write_text("not json")  # a killed shard's, unreadable: stale too
    assert main(_args(checkpoint, images, out)) == 0
    err = capsys.readouterr().err
    assert f"took over the stale lock of export (pid {dead}, since then)" in err
    assert "unreadable lock file" in err
    assert _locks(out) == [] and (out / "manifest.json").is_file()


def test_without_flock_a_lock_is_judged_by_its_pid(tmp_path, monkeypatch):
    monkeypatch.setattr(lockmod, "fcntl", None)
    folder = tmp_path / "f"
    held = acquire_folder(folder, stem=".x", what="export")
    try:
        with pytest.raises(FolderBusyError, match=rf"{folder}: in use by a live export \(pid {os.getpid()}"):
            acquire_folder(folder, stem=".x")
    finally:
        held.release()
    assert not (folder / ".x.lock").exists()
    dead = _dead_pid()
    (folder / ".x.lock").write_text(json.dumps(LockHolder(dead, socket.gethostname()).to_json()))
    with hold_folder(folder, stem=".x") as lock:
        assert [h.pid for h in lock.taken_over] == [dead]
        assert json.loads((folder / ".x.lock").read_text())["pid"] == os.getpid()
    (folder / ".x.lock").write_text(json.dumps(LockHolder(dead, "another-host").to_json()))
    with pytest.raises(FolderBusyError, match=f"pid {dead} on another-host"):  # a pid elsewhere cannot be checked
        acquire_folder(folder, stem=".x")


def test_lock_files_and_clashes(tmp_path):
    assert lock_name(LOCK_STEM) == ".mcloss-export.lock"
    assert lock_name(LOCK_STEM, (1, 4)) == ".mcloss-export.shard-1-of-4.lock"
    folder = tmp_path / "f"
    with hold_folder(folder, stem=".x", shard=(0, 2)) as a, hold_folder(folder, stem=".x", shard=(1, 2)) as b:
        assert a.held and b.held and not a.taken_over
        for shard in ((0, 1), (0, 2), (2, 3)):
            with pytest.raises(FolderBusyError, match=f"pid {os.getpid()}, shard"):
                acquire_folder(folder, stem=".x", shard=shard)
        with hold_folder(folder, stem=".other"):  # another stem is another kind of lock
            pass
    assert sorted(p.name for p in folder.iterdir()) == []
    with hold_folder(folder, stem=".x") as whole:
        with pytest.raises(FolderBusyError):
            acquire_folder(folder, stem=".x", shard=(1, 2))
        whole.release()
        whole.release()  # idempotent
        with hold_folder(folder, stem=".x", shard=(1, 2)):
            pass


def test_lock_is_gone_after_success_and_after_an_error(tmp_path, checkpoint, images, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(_args(checkpoint, images, out)) == 0
    assert _locks(out) == []
    assert ".mcloss-export" not in (out / "index.csv").read_text() + (out / "manifest.json").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(export_module, "_finish", broken)
    assert main(_args(checkpoint, images, tmp_path / "o2")) == 1
    assert "disk on fire" in capsys.readouterr().err
    assert _locks(tmp_path / "o2") == []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_finish", interrupted)
    assert main(_args(checkpoint, images, tmp_path / "o3")) == 130
    assert _locks(tmp_path / "o3") == []
    model = mcloss.load_checkpoint(checkpoint)
    config = ExportConfig(checkpoint=str(checkpoint), input=[str(images)], out=str(tmp_path / "o4"), workers=0)
    with pytest.raises(KeyboardInterrupt):
        export(model, config, device=torch.device("cpu"))
    assert _locks(tmp_path / "o4") == []
    # an unusable option fails before the folder (and its lock) is made
    assert main(_args(checkpoint, images, tmp_path / "o5", "--target", "zebra")) == 2
    assert not (tmp_path / "o5").exists()


@pytest.mark.slow
def test_torchrun_export_into_a_held_folder_is_refused_by_rank_0_alone(tmp_path, checkpoint, images):
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mcloss", "export",
           *_args(checkpoint, images, out)]  # fmt: skip
    with _holder(out) as holder:
        before = _listing(out)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert proc.returncode != 0
        said = [line for line in proc.stderr.splitlines() if "in use by a live export" in line]
        assert len(said) == 1 and f"{out}: in use by a live export (pid {holder.pid}" in said[0], proc.stderr[-3000:]
        assert _listing(out) == before
