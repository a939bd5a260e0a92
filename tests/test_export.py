"""Batch export: outputs, broken inputs, mirroring, collisions, escapes, resume after SIGKILL, CLI."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image

import mcloss
from mcloss.cli import main as cli_main
from mcloss.cli.export import main
from mcloss.data.cub import cub_label
from mcloss.data.files import collect_inputs, sanitize_component
from mcloss.explainability.export import ExportConfig, cpu_lanes, export
from mcloss.explainability.render import Style

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = tiny_model(4, class_names=["ant", "bee", "cat", "dog"])
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    mcloss.save_checkpoint(model, path)
    return path


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _write_good_images(root: Path) -> dict[str, tuple[int, int]]:
    """Every decodable mode, with the (width, height) expected after EXIF."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub" / "deeper").mkdir(parents=True)
    sizes = {}
    _rgb(80, 50, 1).save(root / "a.jpg")
    sizes["a.jpg"] = (80, 50)
    _rgb(40, 60, 2).save(root / "a.png")  # same stem as a.jpg
    sizes["a.png"] = (40, 60)
    rgba = np.zeros((30, 50, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :25, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    sizes["rgba.png"] = (50, 30)
    _rgb(45, 45, 3).convert("P").save(root / "palette.png")
    sizes["palette.png"] = (45, 45)
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(root / "deep16.png")
    sizes["deep16.png"] = (64, 48)
    _rgb(50, 70, 4).convert("CMYK").save(root / "sub" / "cmyk.jpg")
    sizes["sub/cmyk.jpg"] = (50, 70)
    frames = [_rgb(36, 52, s) for s in (5, 6)]
    frames[0].save(root / "sub" / "multi.tiff", save_all=True, append_images=frames[1:])
    sizes["sub/multi.tiff"] = (36, 52)
    frames[0].save(root / "sub" / "deeper" / "anim.gif", save_all=True, append_images=frames[1:])
    sizes["sub/deeper/anim.gif"] = (36, 52)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: a 90×40 file is shown 40×90
    _rgb(90, 40, 7).save(root / "sub" / "rotated.jpg", exif=exif)
    sizes["sub/rotated.jpg"] = (40, 90)
    return sizes


def _write_bad_images(root: Path) -> list[str]:
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not an image")
    buf = (root / "a.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(buf[: len(buf) // 3])
    Image.new("1", (20000, 10000)).save(root / "sub" / "bomb.png")  # 200 MP in a small file
    return ["empty.jpg", "text.png", "truncated.jpg", "sub/bomb.png"]


def _check_image_outputs(base: Path, size: tuple[int, int], xi: int = 3) -> dict:
    rec = json.loads(base.with_name(base.name + ".json").read_text())
    assert rec["image_size"] == list(size)
    with np.load(base.with_name(base.name + ".npz")) as z:
        assert z["channels"].shape == (xi, 4, 4) and z["channels"].dtype == np.float32
        assert z["gradcam"].shape == (4, 4) and (z["gradcam"] >= 0).all()
        assert z["probs"].shape == (4,) and abs(float(z["probs"].sum()) - 1) < 1e-5
        assert z["probs_mc"].shape == (4,) and int(z["target"]) == rec["target"]["index"]
        assert rec["prediction"]["index"] == int(np.argmax(z["probs"]))
    png = np.asarray(Image.open(base.with_name(base.name + ".png")))
    assert png.ndim == 3 and png.shape[2] == 3 and png.dtype == np.uint8
    assert rec["target"]["index"] == rec["prediction"]["index"]
    assert [c["channel"] for c in rec["channels"]] == list(range(xi))
    for c in rec["channels"]:
        x, y = c["peak_xy"]
        assert 0 <= x < size[0] and 0 <= y < size[1]
    assert len(rec["gradcam"]["peak_xy"]) == 2 and len(rec["topk"]) == 4
    return rec


def test_folder_of_good_and_broken_files(tmp_path, checkpoint, capsys):
    src = tmp_path / "in"
    sizes = _write_good_images(src)
    bad = _write_bad_images(src)
    missing = str(tmp_path / "nowhere.jpg")
    out = tmp_path / "out"
    code = main(
        ["--checkpoint", str(checkpoint), "--input", str(src), "--out", str(out), "--workers", "2",
         "--batch-size", "3", "--tile-height", "48", "--no-progress"]
    )
    assert code == 1
    for rel, size in sizes.items():
        _check_image_outputs(out / "in" / rel, size)
    with open(out / "errors.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["file"]).relative_to(src).as_posix() for r in rows) == sorted(bad)
    reasons = {Path(r["file"]).name: r["reason"] for r in rows}
    assert "empty" in reasons["empty.jpg"] and "not a recognized image" in reasons["text.png"]
    assert "too large" in reasons["bomb.png"] and "truncated" in reasons["truncated.jpg"]
    for rel in bad:
        assert not list((out / "in" / rel).parent.glob(Path(rel).name + ".*"))
    with open(out / "index.csv") as f:
        index = list(csv.DictReader(f))
    assert len(index) == len(sizes)
    assert all((out / o).is_file() for row in index for o in row["outputs"].split(";"))
    manifest = json.loads((out / "manifest.json").read_text())
    want = {"inputs": len(sizes) + len(bad), "ok": len(sizes), "redone": 0, "failed": len(bad), "skipped": 0}
    assert manifest["counts"] == want
    assert len(manifest["checkpoint"]["sha256"]) == 64 and manifest["versions"]["captum"]
    assert manifest["options"]["tile_height"] == 48
    # the rerun skips everything finished and still reports the broken files
    code = main(["--checkpoint", str(checkpoint), "--input", str(src), missing, "--out", str(out), "--workers", "0",
                 "--tile-height", "48", "--no-progress"])
    assert code == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["ok"] == 0 and manifest["counts"]["failed"] == len(bad) + 1
    assert "file not found" in capsys.readouterr().err


def test_topk_targets_and_extra_maps(tmp_path, checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    _rgb(70, 40).save(src / "x.png")
    out = tmp_path / "out"
    code = main(["--checkpoint", str(checkpoint), "--input", str(src / "x.png"), "--out", str(out), "--target", "top2",
                 "--maps", "channels,gradcam,channel_gradcam,guided", "--workers", "0", "--no-progress",
                 "--shared-scale", "--colormap", "viridis", "--alpha", "0.3"])
    assert code == 0
    rec = json.loads((out / "x.png.json").read_text())
    assert [t["rank"] for t in rec["targets"]] == [1, 2]
    assert [t["index"] for t in rec["targets"]] == [t["index"] for t in rec["topk"][:2]]
    assert rec["outputs"] == ["x.png.png", "x.png.r2.png", "x.png.npz", "x.png.json"]
    with np.load(out / "x.png.npz") as z:
        assert z["channel_gradcam_r2"].shape == (3, 4, 4) and z["guided"].shape == (64, 64)
        assert z["targets"].tolist() == [t["index"] for t in rec["targets"]]
    assert (out / "x.png.r2.png").is_file()
    code = main(["--checkpoint", str(checkpoint), "--input", str(src / "x.png"), "--out", str(tmp_path / "o2"),
                 "--target", "cat", "--workers", "0", "--no-progress", "--method", "captum"])
    assert code == 0 and json.loads((tmp_path / "o2" / "x.png.json").read_text())["target"]["name"] == "cat"


def test_label_target_from_cub_layout(tmp_path, checkpoint):
    """Labels come from the CUB reader: class ids 1, 3, 7, 9 are ranked 0..3 (not id − 1)."""
    root = tmp_path / "cub"
    (root / "images" / "001.Ant").mkdir(parents=True)
    (root / "images" / "007.Cat").mkdir(parents=True)
    _rgb(50, 40, 1).save(root / "images" / "001.Ant" / "one.jpg")
    _rgb(50, 40, 2).save(root / "images" / "007.Cat" / "two.jpg")
    (root / "images.txt").write_text("1 001.Ant/one.jpg\n2 007.Cat/two.jpg\n")
    (root / "classes.txt").write_text("9 009.Dog\n1 001.Ant\n3 003.Bee\n7 007.Cat\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 7\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n")
    assert cub_label(root / "images" / "007.Cat" / "two.jpg") == 2
    assert mcloss.CUBDataset(root, "test").records[0].label == 2
    assert cub_label(tmp_path / "elsewhere.jpg") is None
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--input", str(root / "images"), "--out", str(out),
                 "--target", "label", "--workers", "0", "--no-progress"]) == 0
    assert json.loads((out / "images" / "001.Ant" / "one.jpg.json").read_text())["target"]["name"] == "ant"
    rec = json.loads((out / "images" / "007.Cat" / "two.jpg.json").read_text())
    assert rec["target"]["name"] == "cat" and rec["label"] == {"index": 2, "name": "cat"}
    stray = tmp_path / "stray.jpg"
    _rgb(30, 30).save(stray)
    assert main(["--checkpoint", str(checkpoint), "--input", str(stray), "--out", str(out), "--target", "label",
                 "--workers", "0", "--no-progress"]) == 1
    assert "no label" in (out / "errors.csv").read_text()


def test_names_stay_inside_out_and_do_not_collide(tmp_path, checkpoint, monkeypatch):
    for d in ("d1/imgs", "d2/imgs", "work"):
        (tmp_path / d).mkdir(parents=True)
    _rgb(30, 30, 1).save(tmp_path / "d1" / "imgs" / "p.png")
    _rgb(30, 30, 2).save(tmp_path / "d2" / "imgs" / "p.png")
    _rgb(30, 30, 3).save(tmp_path / "..hidden.png")
    monkeypatch.chdir(tmp_path / "work")
    before = sorted(p.name for p in tmp_path.iterdir())
    inputs = ["../d1/imgs", "../d2/imgs", str(tmp_path / "..hidden.png"), "../d1/imgs/p.png"]
    keys = [f.key for f in collect_inputs(inputs).files]
    assert keys == ["imgs/p.png", "imgs/p.png~2", "hidden.png"]  # the repeated file is exported once
    assert main(["--checkpoint", str(checkpoint), "--input", *inputs, "--out", "o", "--workers", "0",
                 "--no-progress"]) == 0
    out = tmp_path / "work" / "o"
    for key in keys:
        assert (out / (key + ".json")).is_file()
    a = json.loads((out / "imgs" / "p.png.json").read_text())["file"]
    b = json.loads((out / "imgs" / "p.png~2.json").read_text())["file"]
    assert {a, b} == {"../d1/imgs/p.png", "../d2/imgs/p.png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert sanitize_component("..") == "_" and sanitize_component("a/../b") == "a_.._b"
    assert "/" not in sanitize_component("x\\..\\y") and sanitize_component(".env") == "env"


def test_cli_paths(tmp_path, checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _rgb(30, 20).save(tmp_path / "i.png")
    monkeypatch.setenv("MCLOSS_CHECKPOINT", str(tmp_path / "gone.safetensors"))
    assert cli_main(["export", "--input", "i.png", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcloss export: error: ") and "gone.safetensors: checkpoint not found" in err
    assert cli_main(["export", "--checkpoint", str(tmp_path), "--input", "i.png", "--out", "o"]) == 2
    assert capsys.readouterr().err.strip() == f"mcloss export: error: {tmp_path}: is a directory, not a checkpoint file"
    assert cli_main(["export", "--merge", "gone"]) == 2
    assert capsys.readouterr().err.strip() == "mcloss export: error: gone: folder not found"
    classes = mcloss.load_checkpoint(checkpoint).num_classes
    for flag, value, reason in (("--target", "NoSuch", "unknown class 'NoSuch'"),
                                ("--target", "99", f"class index 99 out of range [0, {classes})"),
                                ("--contrast", "NoSuch", "unknown class 'NoSuch'")):  # fmt: skip
        assert cli_main(["export", "--checkpoint", str(checkpoint), "--input", "i.png", "--out", "o", flag, value]) == 2
        assert capsys.readouterr().err.strip() == f"mcloss export: error: {flag}: {reason}"
    base = ["export", "--checkpoint", str(checkpoint), "--input", "i.png", "--out", "o", "--workers", "0"]
    assert cli_main([*base, "--maps", "channels,xray"]) == 2
    assert "xray" in capsys.readouterr().err
    assert cli_main([*base, "--target", "zebra"]) == 2
    assert "zebra" in capsys.readouterr().err
    assert cli_main([*base, "--shard", "2/2"]) == 2
    assert "--shard" in capsys.readouterr().err
    # bad counts and sizes: exit 2, one line naming the flag, before anything is written
    bad = {("--topk", "-3"): "--topk", ("--batch-size", "0"): "--batch-size", ("--tile-height", "0"): "--tile-height",
           ("--target", "99"): "class index 99"}  # fmt: skip
    for (flag, value), says in bad.items():
        assert cli_main([*base, flag, value]) == 2, flag
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
        assert not (tmp_path / "o").exists()
    (tmp_path / "bad.safetensors").write_bytes(b"garbage!" * 4)
    assert cli_main(["export", "--checkpoint", "bad.safetensors", "--input", "i.png", "--out", "o"]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    assert cli_main([*base, "--shard", "0/2", "--no-progress"]) == 0
    assert (tmp_path / "o" / "manifest.shard-0-of-2.json").is_file() and (tmp_path / "o" / "i.png.json").is_file()
    assert cli_main([*base, "--shard", "1/2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.shard-1-of-2.json").read_text())["counts"]["inputs"] == 0


def test_no_montage_writes_the_same_maps_and_json_without_pngs(tmp_path, checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _rgb(40 + i, 30, i).save(src / f"img{i}.png")
    base = ["--checkpoint", str(checkpoint), "--input", str(src), "--workers", "0", "--no-progress", "--target", "top2"]
    assert main([*base, "--out", str(tmp_path / "full")]) == 0
    assert main([*base, "--out", str(tmp_path / "data"), "--no-montage"]) == 0
    full, data = tmp_path / "full" / "in", tmp_path / "data" / "in"
    assert not list(data.glob("*.png")) and len(list(full.glob("*.png"))) == 6  # 2 targets x 3 images
    for i in range(3):
        name = f"img{i}.png"
        with np.load(full / f"{name}.npz") as a, np.load(data / f"{name}.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
        rec_full, rec_data = (json.loads((d / f"{name}.json").read_text()) for d in (full, data))
        assert [t["png"] for t in rec_data["targets"]] == [None, None]
        assert [t["montage"] for t in rec_data["targets"]] == [None, None]
        assert [t["montage"] for t in rec_full["targets"]] == [t["png"] for t in rec_full["targets"]]
        assert rec_data["outputs"] == [f"{name}.npz", f"{name}.json"]
        drawing = {"colormap", "alpha", "shared_scale", "tile_height"}
        assert "montage" not in rec_full["options"] and drawing <= rec_full["options"].keys()  # as before the flag
        kept = {k: v for k, v in rec_full["options"].items() if k not in drawing}
        assert rec_data["options"] == {**kept, "montage": False}
        for rec in (rec_full, rec_data):
            for t in rec["targets"]:
                t.pop("png"), t.pop("montage")
            rec.pop("outputs"), rec.pop("options")
        assert rec_data == rec_full
    rows = list(csv.reader((tmp_path / "data" / "index.csv").open()))
    assert len(rows) == 4 and not [o for r in rows[1:] for o in r[1].split(";") if o.endswith(".png")]
    # switching an export folder between the two redoes every image and leaves no file of the other kind
    assert main([*base, "--out", str(tmp_path / "full"), "--no-montage"]) == 0
    assert not list(full.glob("*.png"))
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["counts"]["redone"] == 3 and manifest["options"]["montage"] is False
    # a run killed while switching (the json gone, the montages still there) leaves no montage behind either
    (full / "img0.png.json").unlink()
    for name in ("img0.png.png", "img0.png.r2.png", "img0.png.r2.png.png"):  # the last: another image's name
        (full / name).write_bytes(b"left by a killed run")
    assert main([*base, "--out", str(tmp_path / "full"), "--no-montage"]) == 0
    assert [p.name for p in full.glob("*.png")] == ["img0.png.r2.png.png"]
    (full / "img0.png.r2.png.png").unlink()
    # without montages the drawing settings change no file: a re-run with another colormap skips every image
    assert main([*base, "--out", str(tmp_path / "full"), "--no-montage", "--colormap", "inferno"]) == 0
    assert json.loads((tmp_path / "full" / "manifest.json").read_text())["counts"]["skipped"] == 3


@pytest.mark.slow
def test_kill_and_rerun_ends_complete(tmp_path, checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    n = 48  # enough that the run is still going when the third json lands, on a fast machine too
    for i in range(n):
        _rgb(60 + i, 50, i).save(src / f"img{i:02d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mcloss", "export", "--checkpoint", str(checkpoint), "--input", str(src),
           "--out", str(out), "--batch-size", "1", "--workers", "0", "--no-progress", "--tile-height", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def finished() -> int:
        """Per-image records written in full: a record being written is a hidden ``.img….tmp.json``."""
        return len(list(out.glob("in/img*.json")))

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and finished() < 3:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = finished()
    assert 3 <= done < n, "the run must be killed mid-way"
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == done and manifest["counts"]["ok"] == n - done
    for i in range(n):
        _check_image_outputs(out / "in" / f"img{i:02d}.png", (60 + i, 50))
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_default_checkpoint_resolves_from_any_directory(tmp_path, monkeypatch):
    """Without MCLOSS_CHECKPOINT the project's own copy is used, wherever the command runs."""
    monkeypatch.delenv("MCLOSS_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    default = mcloss.default_checkpoint()
    assert default == REPO / "checkpoints" / "default.safetensors" and default.is_file()
    _rgb(40, 30).save(tmp_path / "i.png")
    assert main(["--input", "i.png", "--out", "o", "--workers", "0", "--no-progress", "--tile-height", "64"]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["checkpoint"]["path"] == str(default.resolve())


def _same_outputs(a: Path, b: Path) -> None:
    """Every output of the single-process run ``a`` is in ``b`` with the same content (NPZ by its arrays:
    the zip entries carry their write time)."""
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and not p.name.startswith("manifest"))
    assert names
    for rel in names:
        if rel.suffix == ".npz":
            with np.load(a / rel) as x, np.load(b / rel) as y:
                assert sorted(x.files) == sorted(y.files)
                for key in x.files:
                    np.testing.assert_array_equal(x[key], y[key])
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_match_one_process_and_merge(tmp_path, checkpoint, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        _rgb(60 + 7 * i, 50, i).save(src / f"img{i}.png")
    (src / "text.png").write_text("not an image")
    args = ["--checkpoint", str(checkpoint), "--input", str(src), "--batch-size", "1", "--workers", "0",
            "--tile-height", "48", "--no-progress"]  # fmt: skip
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread in every process: the same float sums
    proc = subprocess.run([sys.executable, "-m", "mcloss", "export", *args, "--out", str(single)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]  # text.png is rejected
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mcloss", "export", *args, "--out", str(ranks)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    for i in range(2):
        assert (ranks / f"manifest.shard-{i}-of-2.json").is_file() and (ranks / f"index.shard-{i}-of-2.csv").is_file()
    assert not list(ranks.glob(".mcloss-export*")), "rank 0's lock on --out outlived the export"
    _same_outputs(single, ranks)  # per-image outputs, index.csv and errors.csv
    merged = json.loads((ranks / "manifest.json").read_text())
    one = json.loads((single / "manifest.json").read_text())
    assert merged["counts"] == one["counts"]
    assert {**merged["options"], "out": None} == {**one["options"], "out": None}
    assert [s["shard"] for s in merged["shards"]] == [[0, 2], [1, 2]]
    # --merge does the same for shards written by separate jobs
    for name in ("manifest.json", "index.csv", "errors.csv"):
        (ranks / name).unlink()
    assert main(["--merge", str(ranks)]) == 1
    _same_outputs(single, ranks)
    (ranks / "manifest.shard-1-of-2.json").unlink()
    capsys.readouterr()
    assert main(["--merge", str(ranks)]) == 2
    assert "missing shard 1 of 2" in capsys.readouterr().err
    assert main(["--merge", str(ranks), "--input", str(src)]) == 2


def test_compare_draws_two_models_on_one_scale_and_records_both(tmp_path, checkpoint, capsys):
    from dataclasses import replace

    from mcloss.explainability import render

    other = tmp_path / "other.safetensors"
    mcloss.save_checkpoint(tiny_model(4, class_names=["ant", "bee", "cat", "dog"], seed=7), other)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _rgb(50 + 5 * i, 40, i).save(src / f"i{i}.png")
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--input", str(src), "--out", str(out), "--workers", "0", "--no-progress",
            "--tile-height", "48", "--shared-scale", "--target", "top2"]  # fmt: skip
    assert main([*args, "--compare", str(other)]) == 0
    rec = json.loads((out / "in" / "i0.png.json").read_text())
    cmp = rec["compare"]
    assert cmp["checkpoint"] == "other.safetensors" and len(cmp["sha256"]) == 64
    assert [t["index"] for t in cmp["targets"]] == [t["index"] for t in rec["targets"]]  # the same classes
    assert rec["options"]["compare_sha256"] == cmp["sha256"]
    # the second model's maps are its own explanation of the image, for those classes
    a, b = mcloss.load_checkpoint(checkpoint), mcloss.load_checkpoint(other)
    image = mcloss.load_image(src / "i0.png")
    ea = mcloss.explain(a, image, "top2")
    eb = mcloss.explain(b, image, [[g.target for g in ea.groups]])
    with np.load(out / "in" / "i0.png.npz") as z:
        np.testing.assert_allclose(z["compare_channels"], eb.groups[0].channels, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z["compare_channels_r2"], eb.groups[1].channels, rtol=1e-5, atol=1e-6)
    # both rows drawn with one maximum: the larger of the two groups'
    style = render.Style(tile_height=48, shared_scale=True)
    view = ea.view
    picture = render.compare_montage(view, ea, eb, 0, style, ("a", "b"))
    common = max(float(ea.groups[0].channels.max()), float(eb.groups[0].channels.max()))
    top = render.explanation_montage(view, ea, 0, replace(style, group_max=common), title="a")
    np.testing.assert_array_equal(picture[: top.shape[0], : top.shape[1]], top)
    second = render.explanation_montage(view, eb, 0, replace(style, group_max=common), title="b")
    np.testing.assert_array_equal(picture[top.shape[0] + 6 :, : second.shape[1]], second)
    assert (out / "in" / "i0.png.png").is_file() and (out / "in" / "i0.png.r2.png").is_file()
    # a re-run without --compare re-does the images; classes that differ are refused in one line
    assert main(args) == 0 and "3 re-done" in capsys.readouterr().err
    odd = tmp_path / "odd.safetensors"
    mcloss.save_checkpoint(tiny_model(4, class_names=["w", "x", "y", "z"]), odd)
    assert main([*args, "--compare", str(odd)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its classes differ" in err


@pytest.fixture()
def two_threads():
    """torch with two intra-op threads (what a CPU export splits into lanes), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _lane_inputs(root: Path) -> Path:
    root.mkdir()
    for i in range(9):  # three sizes: batches of one shape, in more batches than lanes
        _rgb(48 + 8 * (i % 3), 40, i).save(root / f"img{i}.png")
    (root / "text.png").write_text("not an image")
    return root


def _export_config(src: Path, out: Path) -> ExportConfig:
    return ExportConfig(checkpoint="tiny", input=[str(src)], out=str(out), style=Style(tile_height=48), batch_size=2, workers=0)


def test_cpu_export_in_lanes_writes_what_one_lane_writes(tmp_path, two_threads):
    model = tiny_model(4, class_names=["ant", "bee", "cat", "dog"])
    flags = [p.requires_grad for p in model.parameters()]
    src = _lane_inputs(tmp_path / "in")
    cpu = torch.device("cpu")
    assert cpu_lanes(cpu, ("channels", "gradcam"), "fused") == 2
    # hooks on the shared model (Captum, Guided Grad-CAM) and a GPU keep one lane
    assert cpu_lanes(cpu, ("channels", "gradcam"), "captum") == cpu_lanes(cpu, ("channels", "guided"), "fused") == 1
    assert cpu_lanes(torch.device("cuda"), ("channels",), "fused") == 1
    seen = []
    lanes = export(model, _export_config(src, tmp_path / "lanes"), device=cpu, checkpoint_sha256="x",
                   progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert torch.get_num_threads() == 2 and [p.requires_grad for p in model.parameters()] == flags
    assert (lanes.written, len(lanes.errors)) == (9, 1) and seen[0] == (0, 10) and seen[-1] == (10, 10)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # progress only goes up, whichever lane reports
    torch.set_num_threads(1)  # one lane, and the same single-threaded float sums as each lane's
    one = export(model, _export_config(src, tmp_path / "one"), device=cpu, checkpoint_sha256="x")
    assert (one.written, one.errors) == (9, lanes.errors)
    _same_outputs(tmp_path / "one", tmp_path / "lanes")  # the images, their records and index.csv


def test_writer_processes_write_what_writer_threads_write(tmp_path):
    from dataclasses import replace

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one lane: the export's writers run beside one model thread, as on a GPU
    try:
        model = tiny_model(4, class_names=["ant", "bee", "cat", "dog"])
        src = _lane_inputs(tmp_path / "in")
        (src / "deep").mkdir()
        _rgb(50, 40, 11).save(src / "deep" / "late.png")
        # the folder the last image's files go in is a file: its write fails in whichever writer has it
        (tmp_path / "procs" / "in").mkdir(parents=True)
        (tmp_path / "procs" / "in" / "deep").write_text("in the way")
        config = replace(_export_config(src, tmp_path / "threads"), writers=0)
        threads = export(model, config, device=torch.device("cpu"), checkpoint_sha256="x")
        seen = []
        procs = export(model, replace(config, out=str(tmp_path / "procs"), writers=2), device=torch.device("cpu"),
                       checkpoint_sha256="x", progress=lambda done, total: seen.append(done))  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert (threads.written, len(threads.errors)) == (10, 1) and (procs.written, len(procs.errors)) == (9, 2)
    late = [reason for file, reason in procs.errors if file.endswith("late.png")]
    assert len(late) == 1 and "cannot write outputs" in late[0]  # the writer's OSError rejects that image only
    (tmp_path / "threads" / "in" / "deep" / "late.png.png").unlink()  # the one image the processes could not write
    for name in ("late.png.json", "late.png.npz"):
        (tmp_path / "threads" / "in" / "deep" / name).unlink()
    for name in ("index.csv", "errors.csv"):
        (tmp_path / "threads" / name).unlink()
        (tmp_path / "procs" / name).unlink()
    _same_outputs(tmp_path / "threads", tmp_path / "procs")  # montages, npz and json records alike
    manifest = json.loads((tmp_path / "procs" / "manifest.json").read_text())
    assert manifest["options"]["writers"] == 2 and seen[-1] == 11


def test_a_killed_writer_process_is_one_error_and_a_rerun_finishes(tmp_path):
    import multiprocessing
    from dataclasses import replace

    from mcloss.core.errors import OutputError

    model = tiny_model(4, class_names=["ant", "bee", "cat", "dog"])
    src, out = _lane_inputs(tmp_path / "in"), tmp_path / "out"
    config = replace(_export_config(src, out), method="captum", writers=2)  # Captum's hooks: one lane
    killed = []

    def kill_a_writer(done: int, total: int) -> None:  # as the system's OOM killer would, once the writes run
        if done and not killed and (writers := multiprocessing.active_children()):
            killed.append(writers[0].pid)
            os.kill(writers[0].pid, signal.SIGKILL)

    with pytest.raises(OutputError, match="a writer process died") as caught:
        export(model, config, device=torch.device("cpu"), checkpoint_sha256="x", progress=kill_a_writer)
    assert killed and len(str(caught.value).splitlines()) == 1 and str(out) in str(caught.value)
    assert "run the export again" in str(caught.value)
    finished = sorted((out / "in").glob("*.json"))
    for path in finished:  # what was finished is whole
        stem = path.name.removesuffix(".json")
        assert path.with_name(f"{stem}.png").is_file() and path.with_name(f"{stem}.npz").is_file()
    assert len(finished) < 9 and not (out / ".mcloss-export.lock").exists()
    again = export(model, config, device=torch.device("cpu"), checkpoint_sha256="x")
    assert (again.skipped, again.written) == (len(finished), 9 - len(finished))


def test_a_writers_error_that_cannot_travel_comes_back_named(tmp_path, monkeypatch):
    from mcloss.explainability import export as export_module

    class DrawError(Exception):  # rebuilt from its message alone, it would break the pool as a dead writer does
        def __init__(self, kind: str, reason: str) -> None:
            super().__init__(f"cannot draw {kind}: {reason}")

    def failing(*args, **kwargs):
        raise DrawError("gradcam", "map is all NaN")

    from mcloss.explainability.explanation import explain, prepare

    model = tiny_model(4)
    _rgb(40, 30).save(tmp_path / "a.png")
    config = _export_config(tmp_path / "a.png", tmp_path / "out")
    plan = export_module.plan_export(model, config, checkpoint_sha256="x")
    prepared = prepare(model, tmp_path / "a.png", view="height", view_size=48)
    job = export_module._Job(plan.todo[0], prepared, explain(model, prepared))
    files = export_module._Files.of(job, plan)
    monkeypatch.setattr(export_module, "_process_shared", export_module._shared(plan))  # as in a writer process
    monkeypatch.setattr(export_module, "write_explanation", failing)
    with pytest.raises(RuntimeError, match="DrawError: cannot draw gradcam: map is all NaN") as caught:
        export_module._write_in_process(files)
    assert isinstance(caught.value.__cause__, DrawError)
    monkeypatch.setattr(export_module, "write_explanation", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space left"):  # one that travels comes back as itself (and rejects one image)
        export_module._write_in_process(files)


def test_writers_start_clean_while_another_thread_holds_a_lock(tmp_path):
    """The writers are forked while another thread holds the CUB index's lock, which a writer takes to read an
    image's part annotations: inherited held, it would hang them for good; a forked child makes it anew."""
    import threading
    from dataclasses import replace

    from test_defining_explain import _checkpoint, _cub

    from mcloss.data import cub

    root = _cub(tmp_path / "cub")
    model = mcloss.load_checkpoint(_checkpoint(tmp_path, {"defining_parts": {"Green_Wing": ["wing"], "Plain": []}}))
    config = replace(_export_config(root / "images", tmp_path / "out"), target="top2", method="captum", writers=2)
    held, release, results = threading.Event(), threading.Event(), []

    def hold_the_index_lock() -> None:
        with cub._INDEX_LOCK:
            held.set()
            release.wait(60)

    def run_export() -> None:
        results.append(export(model, config, device=torch.device("cpu"), checkpoint_sha256="x"))

    holder = threading.Thread(target=hold_the_index_lock, daemon=True)
    holder.start()
    held.wait(10)
    exporter = threading.Thread(target=run_export, daemon=True)  # the writers start while the lock is held
    exporter.start()
    time.sleep(3)
    release.set()
    exporter.join(120)
    assert not exporter.is_alive(), "the export hung: a writer inherited a held lock"
    assert results[0].written == 2 and not results[0].errors
    record = json.loads((tmp_path / "out" / "images" / "001.Green_Wing" / "a.png.json").read_text())
    green = next(t for t in record["targets"] if t["name"] == "Green_Wing")
    assert green["defining_mass_ratio"]["source"] == "image"  # the writer read the image's annotations


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_export_takes_its_writer_processes_along(tmp_path, checkpoint):
    from test_processes import _running

    src = _lane_inputs(tmp_path / "in")
    for i in range(9, 40):
        _rgb(48, 40, i).save(src / f"img{i}.png")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mcloss", "export", "--checkpoint", str(checkpoint), "--input", str(src),
            "--out", str(out), "--batch-size", "1", "--workers", "0", "--tile-height", "48", "--no-progress",
            "--method", "captum", "--writers", "2"]  # fmt: skip
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.rglob("*.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    family = _descendants(proc.pid)
    assert len(family) >= 2  # the two writers
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while (alive := [p for p in family if _running(p)]) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive
    assert subprocess.run(args, capture_output=True).returncode == 1  # a re-run finishes (text.png is rejected)
    assert len(list((out / "in").glob("*.json"))) == 40


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, grandchildren...), read from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_writer_processes_take_the_cpus_the_model_and_decoders_leave(monkeypatch, capsys):
    from dataclasses import replace

    from mcloss.core.errors import ParameterError
    from mcloss.explainability import export as export_module
    from mcloss.explainability.export import writer_processes

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    config = ExportConfig(checkpoint="c", input=["i"], out="o", workers=4)
    monkeypatch.setattr(export_module.processes, "usable_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(export_module.sys, "platform", "linux")
    assert writer_processes(config, cuda) == 11  # the H200 node: 16 - the model's thread - 4 decoders
    assert writer_processes(config, cpu) == 0  # a CPU export's cores are the model's
    assert writer_processes(replace(config, workers=12), cuda) == 3
    assert writer_processes(replace(config, workers=13), cuda) == 0  # 2 free: threads do as well
    assert writer_processes(replace(config, writers=5), cpu) == 5 and writer_processes(replace(config, writers=0), cuda) == 0
    monkeypatch.setattr(export_module.processes, "usable_cpus", lambda: 64)
    assert writer_processes(config, cuda) == export_module.MOST_WRITER_PROCESSES
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's ranks on one node share its CPUs
    assert writer_processes(replace(config, workers=2), cuda) == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "eight")  # not torchrun's: the node's CPUs are this process's
    assert writer_processes(replace(config, workers=2), cuda) == 14
    monkeypatch.setattr(export_module.sys, "platform", "darwin")  # no fork: threads unless told
    assert writer_processes(config, cuda) == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ParameterError, match="writers must be an integer >= 0"):
            replace(config, writers=bad)
    assert main(["--input", "x", "--out", "y", "--writers", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--writers must be an integer >= 0" in err


def test_a_failing_lane_stops_the_export_and_keeps_what_was_written(tmp_path, two_threads, monkeypatch):
    from mcloss.explainability import export as export_module

    model = tiny_model(4, class_names=["ant", "bee", "cat", "dog"])
    src = _lane_inputs(tmp_path / "in")
    calls, explain = [], export_module.explain

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return explain(*args, **kwargs)

    monkeypatch.setattr(export_module, "explain", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="out of memory"):
        export(model, _export_config(src, out), device=torch.device("cpu"), checkpoint_sha256="x")
    assert torch.get_num_threads() == 2
    finished = sorted((out / "in").glob("*.json"))  # a directory input is mirrored under its name
    assert 2 <= len(finished) <= 6  # the batches explained before the failure and the one in the other lane
    for path in finished:  # every finished image has all its files, and no write was left half-done
        stem = path.name.removesuffix(".json")
        assert path.with_name(f"{stem}.png").is_file() and path.with_name(f"{stem}.npz").is_file()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(export_module, "explain", explain)  # a re-run finishes the rest and skips the done ones
    again = export(model, _export_config(src, out), device=torch.device("cpu"), checkpoint_sha256="x")
    assert (again.skipped, again.written) == (len(finished), 9 - len(finished))


def test_inputs_live_in_the_data_layer_and_travel_to_workers(tmp_path):
    import pickle

    from mcloss.data import inputs
    from mcloss.explainability import atlas, explanation
    from mcloss.explainability import export as export_module
    from mcloss.explainability.explanation import prepare, view_maker

    assert atlas.ImageFiles is inputs.ImageFiles and atlas.collate_items is inputs.collate_items
    assert "ImageFiles" not in export_module.__all__ and explanation.PreparedImage is inputs.PreparedImage
    _rgb(60, 30).save(tmp_path / "i.png")
    model = tiny_model(4)
    files = collect_inputs([str(tmp_path / "i.png")]).files + [collect_inputs([str(tmp_path)]).files[0]]
    # the view maker goes to DataLoader workers with the dataset: it pickles, and makes the thumbnail prepare() keeps
    dataset = pickle.loads(pickle.dumps(inputs.ImageFiles(files, model.transform, view_maker("height", 24))))
    index, item = dataset[0]
    same = prepare(model, tmp_path / "i.png", view="height", view_size=24)
    assert index == 0 and isinstance(item, inputs.PreparedImage) and item.view.shape == same.view.shape == (24, 48, 3)
    assert np.array_equal(item.view, same.view) and torch.equal(item.x, same.x) and item.geometry == same.geometry
    assert inputs.ImageFiles(files, model.transform)[0][1].view is None
    assert inputs.collate_items([(0, item)]) == [(0, item)]
    with pytest.raises(ValueError, match="view must be"):
        view_maker("wide")


def test_a_workers_batch_arrives_whole_with_its_tensors_in_one_block_per_shape(tmp_path):
    import copy
    from dataclasses import replace
    from multiprocessing import reduction

    from torch.utils.data import DataLoader

    from mcloss.data.inputs import ImageFiles, collate_items
    from mcloss.explainability.explanation import prepare, view_maker

    for i, (w, h) in enumerate([(60, 30), (30, 60), (40, 40), (50, 20)]):
        _rgb(w, h, i).save(tmp_path / f"i{i}.png")
    (tmp_path / "i9.png").write_text("not an image")
    model = tiny_model(4)
    files = collect_inputs([str(tmp_path)]).files
    dataset = ImageFiles(files, model.transform, view_maker("height", 24))
    # what a worker sends: the batch pickled as the DataLoader's queues pickle it, one block per shape
    sent = reduction.ForkingPickler.dumps(collate_items([dataset[k] for k in range(len(files))]))
    received = pickle.loads(sent)
    assert type(received) is list and [k for k, _ in received] == list(range(len(files)))
    loader = DataLoader(dataset, batch_size=len(files), num_workers=1, collate_fn=collate_items)
    (from_worker,) = list(loader)
    for (k, item), (j, got) in zip(received, from_worker, strict=True):
        assert k == j
        if isinstance(item, str):
            assert got == item and "i9.png" in got
            continue
        same = prepare(model, files[k].source, view="height", view_size=24)
        assert torch.equal(got.x, same.x) and got.geometry == same.geometry and np.array_equal(got.view, same.view)
        assert torch.equal(item.x, same.x) and got.source == same.source
    stacks = {got.x.untyped_storage().data_ptr() for _, got in from_worker if not isinstance(got, str)}
    assert len(stacks) == 1  # every image of the batch shares one block (the model's input size is fixed)
    # a batch decoded in process is copied by the DataLoader's memory pinning: a plain copy, nothing stacked
    batch = collate_items([dataset[k] for k in range(len(files))])
    assert all(a is b for a, b in zip(copy.copy(batch), batch, strict=True))
    # images of one shape in two dtypes keep their dtypes and values
    one = batch[0][1]
    mixed = collate_items([(0, one), (1, replace(one, x=one.x.double() / 3))])
    back = pickle.loads(reduction.ForkingPickler.dumps(mixed))
    assert back[1][1].x.dtype == torch.float64 and torch.equal(back[1][1].x, one.x.double() / 3)
    assert back[0][1].x.dtype == torch.float32 and torch.equal(back[0][1].x, one.x)


def test_explanation_save_writes_what_the_export_writes(tmp_path):
    from mcloss.explainability.explanation import explain, prepare

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one lane: the same float sums in both
    try:
        model = tiny_model(4, class_names=["ant", "bee", "cat", "dog"])
        image = tmp_path / "x.png"
        _rgb(70, 40, 5).save(image)
        config = ExportConfig(checkpoint="tiny", input=[str(image)], out=str(tmp_path / "out"), target="top2",
                              style=Style(tile_height=48), topk=3, workers=0)  # fmt: skip
        assert export(model, config, device=torch.device("cpu"), checkpoint_sha256="x").written == 1
        options = json.loads((tmp_path / "out" / "x.png.json").read_text())["options"]
        exp = explain(model, prepare(model, image, view="height", view_size=48), "top2")
        (tmp_path / "saved").mkdir()
        exp.save(tmp_path / "saved" / "x.png", Style(tile_height=48), topk=3, options=options)
    finally:
        torch.set_num_threads(before)
    for name in ("x.png.png", "x.png.r2.png", "x.png.npz"):
        assert (tmp_path / "saved" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
    exported = json.loads((tmp_path / "out" / "x.png.json").read_text())
    assert exported.pop("input")["path"] == str(image.resolve())  # what an export re-run checks the input by
    assert json.loads((tmp_path / "saved" / "x.png.json").read_text()) == exported


def test_a_rerun_redoes_what_changed_on_disk_and_not_how_the_path_was_typed(tmp_path, checkpoint, capsys, monkeypatch):
    """A re-run skips an image only while its json, its files and its input are as the earlier run left them:
    a deleted montage or npz, or an input replaced by another picture, re-does that image and says why; the
    same folder typed as an absolute path, or from another directory, is still the same input."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        _rgb(50 + i, 40, i).save(src / f"i{i}.png")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    args = ["--checkpoint", str(checkpoint), "--input", "in", "--out", str(out), "--workers", "0", "--no-progress",
            "--tile-height", "32"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args[:3], str(src), *args[4:]]) == 0  # the same folder, typed as an absolute path
    assert "0 exported, 4 already done" in capsys.readouterr().err
    monkeypatch.chdir(src)
    assert main([*args[:3], ".", *args[4:]]) == 0  # and from inside it
    assert "0 exported, 4 already done" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)

    (out / "in" / "i0.png.png").unlink()
    (out / "in" / "i1.png.npz").unlink()
    before = (out / "in" / "i2.png.json").read_text()
    _rgb(90, 20, 7).save(src / "i2.png")  # another picture under the same name
    os.utime(src / "i2.png", ns=(1, 1))  # a modification time no earlier run saw, whatever the clock's resolution
    assert main(args) == 0
    assert "3 exported (3 re-done: 1 from a changed input, 2 with files missing), 1 already done" in capsys.readouterr().err
    for i in range(4):
        _check_image_outputs(out / "in" / f"i{i}.png", (90, 20) if i == 2 else (50 + i, 40))
    after = json.loads((out / "in" / "i2.png.json").read_text())
    assert after["image_size"] == [90, 20] and json.loads(before)["image_size"] == [52, 40]
    assert after["input"] == {"path": os.path.realpath(src / "i2.png"), "size": (src / "i2.png").stat().st_size, "mtime_ns": 1}
    index = (out / "index.csv").read_text()
    assert index.count("\n") == 5  # the header and every image, the re-done ones included

    moved = tmp_path / "job2"
    shutil.copytree(src, moved / "in")  # the same files restaged elsewhere (copy2 keeps their times)
    monkeypatch.chdir(moved)
    assert main(args) == 0 and "0 exported, 4 already done" in capsys.readouterr().err
    (moved / "in" / "i3.png").write_bytes(b"not a picture any more")  # changed, and now unreadable
    assert main(args) == 1
    assert "0 exported, 3 already done, 1 rejected" in capsys.readouterr().err  # rejected, not "re-done"
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["redone"] == 0 and counts["ok"] == 0 and counts["failed"] == 1
