"""``mcloss export --merge``: shards are checked against the digests they recorded when they finished, counts
come from the rows, and duplicated rows or outputs outside the export are refused."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model
from PIL import Image

import mcloss
from mcloss.cli.export import main
from mcloss.explainability.export import MergeError, merge_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """An export of 6 images and one unreadable file in two shards (not merged)."""
    root = tmp_path_factory.mktemp("merge")
    checkpoint = root / "tiny.safetensors"
    mcloss.save_checkpoint(tiny_model(4, class_names=["ant", "bee", "cat", "dog"]), checkpoint)
    src = root / "in"
    src.mkdir()
    for i in range(6):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (40, 50 + 3 * i, 3), dtype=np.uint8)).save(src / f"img{i}.png")
    (src / "text.png").write_text("not an image")
    out = root / "out"
    args = ["--checkpoint", str(checkpoint), "--input", str(src), "--out", str(out), "--workers", "0", "--no-progress",
            "--tile-height", "32", "--maps", "channels", "--no-montage"]  # fmt: skip
    for i in range(2):  # shards on other machines may write with other writers: their files are the same
        assert main([*args, "--shard", f"{i}/2", "--writers", str(2 * i)]) in (0, 1)
    return out


@pytest.fixture
def out(shards, tmp_path) -> Path:
    """A fresh copy of the shards (the inputs stay where the manifests say)."""
    copy = tmp_path / "out"
    shutil.copytree(shards, copy)
    return copy


def _rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))


def _write_rows(path: Path, rows: list[list[str]]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _reseal(out: Path, i: int, change=None) -> None:
    """Re-seal shard ``i``'s manifest (after ``change(manifest)``) with digests of its files as they are now,
    as someone editing the shard files with care would: only the checks on the rows are left to refuse them."""
    path = out / f"manifest.shard-{i}-of-2.json"
    manifest = json.loads(path.read_text())
    manifest.pop("digest")
    for name in manifest["files"]:
        manifest["files"][name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    if change is not None:
        change(manifest)
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    path.write_text(json.dumps(manifest | {"digest": hashlib.sha256(canonical).hexdigest()}, indent=2))


def _refused(out: Path, capsys, *says: str) -> str:
    capsys.readouterr()
    assert main(["--merge", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in says:
        assert text in err, err
    assert not any((out / name).exists() for name in ("manifest.json", "index.csv", "errors.csv"))
    return err


def test_untouched_shards_merge_with_their_counts(out, capsys):
    for i in range(2):
        manifest = json.loads((out / f"manifest.shard-{i}-of-2.json").read_text())
        assert len(manifest["digest"]) == 64 and set(manifest["files"]) == {f"index.shard-{i}-of-2.csv", f"errors.shard-{i}-of-2.csv"}
    assert main(["--merge", str(out)]) == 1  # text.png is rejected
    merged = json.loads((out / "manifest.json").read_text())
    assert merged["counts"] == {"inputs": 7, "ok": 6, "redone": 0, "failed": 1, "skipped": 0}
    assert len(_rows(out / "index.csv")) == 1 + 6 and len(_rows(out / "errors.csv")) == 1 + 1
    assert "6 merged, 0 already done, 1 rejected" in capsys.readouterr().err


def test_edited_counts_are_refused(out, capsys):
    path = out / "manifest.shard-0-of-2.json"
    manifest = json.loads(path.read_text())
    manifest["counts"]["ok"] = 10023
    path.write_text(json.dumps(manifest, indent=2))
    _refused(out, capsys, str(path), "does not match the digest written when the shard finished")
    # re-sealed with its edited counts: the rows still say otherwise
    _reseal(out, 0, lambda m: m["counts"].update(ok=10023))
    _refused(out, capsys, str(path), "counts say 10023 exported and", "hold 3 and")


def test_a_truncated_index_shard_is_refused_naming_it(out, capsys):
    path = out / "index.shard-0-of-2.csv"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(out, capsys, f"{path}: does not match the digest shard 0 of 2 recorded when it finished (truncated or edited?)")
    path.unlink()
    _refused(out, capsys, str(path), "unreadable shard file")


def test_duplicated_rows_are_refused(out, capsys):
    index0, index1 = out / "index.shard-0-of-2.csv", out / "index.shard-1-of-2.csv"
    rows = _rows(index1)
    _write_rows(index1, [*rows, rows[1]])  # a row twice in one shard
    _refused(out, capsys, str(index1), "does not match the digest")
    _reseal(out, 1, lambda m: m["counts"].update(ok=m["counts"]["ok"] + 1))
    _refused(out, capsys, "is listed twice (in the index of shard 1 and the index of shard 1)", rows[1][0])
    # a row of shard 0 copied into shard 1
    _write_rows(index1, [*rows, _rows(index0)[1]])
    _reseal(out, 1)
    _refused(out, capsys, "is listed twice (in the index of shard 0 and the index of shard 1)")


def test_an_output_outside_the_export_is_refused(out, capsys):
    index1 = out / "index.shard-1-of-2.csv"
    rows = _rows(index1)
    for bad in ("../../../../etc/passwd", "/etc/passwd", "img1.png.json;sub/../../x"):
        _write_rows(index1, [*rows, [str(out.parent / "in" / "extra.png"), bad, "ant", "0.5", "ant", "", ""]])
        _refused(out, capsys, "does not match the digest")
        _reseal(out, 1, lambda m: m["counts"].update(ok=len(rows)))  # one more row than it exported
        _refused(out, capsys, "the index of shard 1 names an output outside the export")


def test_a_shard_without_a_digest_or_under_another_name_is_refused(out, capsys):
    path = out / "manifest.shard-1-of-2.json"
    manifest = json.loads(path.read_text())
    shutil.copyfile(out / "manifest.shard-0-of-2.json", path)  # shard 0's manifest posing as shard 1
    _refused(out, capsys, f"{path}: its options say it is shard 0 of 2")
    del manifest["digest"]
    path.write_text(json.dumps(manifest))  # as an older mcloss wrote it
    _refused(out, capsys, f"{path}: has no digest")
    with pytest.raises(MergeError, match="has no digest"):
        merge_shards(out)


def test_an_output_gone_since_the_shard_finished_is_refused(out, capsys):
    """A later export into the folder replaced a shard's files (another format, say): merging its old index would
    list files that are not there, so the merge refuses and says to export again."""
    listed = _rows(out / "index.shard-0-of-2.csv")[1][1].split(";")
    (out / listed[0]).unlink()
    _refused(out, capsys, f"the index of shard 0 lists {listed[0]}, which is no longer there", "export again")


def test_outputs_rewritten_since_the_shard_finished_are_refused(out, capsys):
    """A later export into the folder under other options rewrote the same file names: they are all there, but
    their records hold the later options, so the merge refuses rather than index them as the shards'."""
    options = json.loads((out / "manifest.shard-0-of-2.json").read_text())["options"]
    args = ["--checkpoint", options["checkpoint"], "--input", *options["input"], "--out", str(out), "--workers", "0",
            "--no-progress", "--tile-height", "32", "--maps", "channels,gradcam", "--no-montage"]  # fmt: skip
    assert main(args) == 1  # text.png is rejected again
    later = {name: (out / name).read_bytes() for name in ("manifest.json", "index.csv", "errors.csv")}
    capsys.readouterr()
    assert main(["--merge", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the index of shard 0 lists in/img0.png.json, which a later export rewrote with other options" in err, err
    assert {name: (out / name).read_bytes() for name in later} == later  # the later export's own files stand


def test_a_merge_orders_the_rows_as_one_process_wherever_it_runs(tmp_path, monkeypatch):
    """Shards of an input typed relative to where they ran, merged from another folder, with a file name that is
    not UTF-8: index.csv lists the rows in the order one process writes them."""
    checkpoint = tmp_path / "tiny.safetensors"
    mcloss.save_checkpoint(tiny_model(4, class_names=["ant", "bee", "cat", "dog"]), checkpoint)
    work = tmp_path / "work"
    (work / "in").mkdir(parents=True)
    for i, name in enumerate([b"c.png", b"a\xff.png", b"b.png", b"d.png", b"e.png"]):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
        with open(os.path.join(os.fsencode(work / "in"), name), "wb") as f:
            f.write(buf.getvalue())
    monkeypatch.chdir(work)
    args = ["--checkpoint", str(checkpoint), "--input", "in", "--workers", "0", "--no-progress", "--no-montage"]
    assert main([*args, "--out", "single"]) == 0
    for i in range(2):
        assert main([*args, "--out", "sharded", "--shard", f"{i}/2"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["--merge", str(work / "sharded")]) == 0
    single, merged = (_rows(work / name / "index.csv") for name in ("single", "sharded"))
    assert [r[0] for r in merged] == [r[0] for r in single] and len(single) == 6
