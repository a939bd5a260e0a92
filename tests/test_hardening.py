"""Careless and hostile inputs: extreme image shapes, re-runs with other options, killed exports, checkpoint
metadata that lies, inputs that match nothing, the output folder inside the input, and the messages."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import mcloss
from mcloss.cli import main as cli_main
from mcloss.cli.export import main as export_main
from mcloss.core.checkpoint import MAX_CLASSES, CheckpointError
from mcloss.data.io import ImageLoadError, load_image
from mcloss.explainability import render

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    mcloss.save_checkpoint(tiny_model(4, class_names=["ant", "bee", "cat", "dog"]), path)
    return path


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _export(checkpoint: Path, *args: str) -> int:
    return export_main(["--checkpoint", str(checkpoint), "--workers", "0", "--no-progress", *args])


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _errors(out: Path) -> dict[str, str]:
    with open(out / "errors.csv") as f:
        return {row["file"]: row["reason"] for row in csv.DictReader(f)}


# ------------------------------------------------------------------------------------------ montage size


def test_letterbox_bounds_extreme_shapes():
    wide = np.zeros((8, 3000, 3), np.uint8)
    assert render.letterbox(wide, 224).shape == (224, 896, 3)  # fitted to 4:1, padded to 224 rows
    tall = np.zeros((3000, 8, 3), np.uint8)
    assert render.letterbox(tall, 224).shape == (224, 56, 3)  # 1 px wide, padded to 1:4
    normal = np.zeros((300, 400, 3), np.uint8)
    assert render.letterbox(normal, 150).shape == (150, 200, 3)  # an ordinary image is only scaled
    assert render.pad_to_aspect(np.zeros((3, 1024, 3), np.uint8)).shape == (256, 1024, 3)
    # a caller's huge tile height still gives a montage within the pixel cap
    row = render.montage([(normal, f"t{i}") for i in range(20)], height=2048)
    assert row.shape[0] * row.shape[1] <= render.MONTAGE_MAX_PIXELS
    assert render.montage_height((300, 400), 16, 2048) * 16 * 4 / 3 * 2048 < render.MONTAGE_MAX_PIXELS * 2
    assert render.montage_height((300, 400), 5, 224) == 224


def test_thin_images_export_bounded_montages_that_pillow_opens(tmp_path, checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    shapes = {"wide.png": (3000, 8), "tall.png": (8, 3000), "line.png": (30000, 1)}
    for i, (name, (w, h)) in enumerate(shapes.items()):
        _rgb(w, h, i).save(src / name)
    out = tmp_path / "out"
    assert _export(checkpoint, "--input", str(src), "--out", str(out), "--tile-height", "224") == 0
    tiles = 1 + 3 + 2 + 1  # original, 3 channels, CCMP, parts, Grad-CAM
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's default guard, strict
        for name in shapes:
            with Image.open(out / "in" / f"{name}.png") as png:
                w, h = png.size
                png.load()
            assert w * h <= render.MONTAGE_MAX_PIXELS
            assert w <= tiles * (4 * 224 + 4) + 4 and h <= 224 + 22 + 28 + 4 + 18 * 3 + 10, (name, png.size)
    rec = json.loads((out / "in" / "line.png.json").read_text())
    assert rec["image_size"] == [30000, 1]


def test_tile_height_is_bounded_and_stated():
    from mcloss.cli.export import build_parser

    text = build_parser().format_help()
    assert "letterboxed" in text and str(render.MAX_TILE_HEIGHT) in text
    with pytest.raises(ValueError, match="tile_height"):
        render.Style(tile_height=render.MAX_TILE_HEIGHT + 1)


# ------------------------------------------------------------------------------------------ re-runs


def test_rerun_with_other_options_redoes_those_outputs(tmp_path, checkpoint, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _rgb(50 + i, 40, i).save(src / f"i{i}.png")
    out = tmp_path / "out"
    base = ["--input", str(src), "--out", str(out), "--tile-height", "48"]
    assert _export(checkpoint, *base) == 0
    first = (out / "in" / "i0.png.png").read_bytes()
    assert _export(checkpoint, *base, "--target", "top2", "--colormap", "viridis") == 0
    assert "3 re-done" in capsys.readouterr().err
    assert _manifest(out)["counts"] | {} == {"inputs": 3, "ok": 3, "redone": 3, "failed": 0, "skipped": 0}
    rec = json.loads((out / "in" / "i0.png.json").read_text())
    assert rec["options"]["colormap"] == "viridis" and rec["options"]["target"] == "top2"
    assert len(rec["targets"]) == 2 and (out / "in" / "i0.png.r2.png").is_file()
    assert (out / "in" / "i0.png.png").read_bytes() != first
    # back to the defaults: re-done again, and the second target's montage is not left behind
    assert _export(checkpoint, *base) == 0
    assert not (out / "in" / "i0.png.r2.png").exists()
    assert (out / "in" / "i0.png.png").read_bytes() == first
    # the same options again: nothing to do
    assert _export(checkpoint, *base) == 0
    assert _manifest(out)["counts"]["skipped"] == 3 and _manifest(out)["counts"]["ok"] == 0
    # another checkpoint is another option
    other = tmp_path / "other.safetensors"
    mcloss.save_checkpoint(tiny_model(4, class_names=["ant", "bee", "cat", "dog"], seed=5), other)
    assert _export(other, *base) == 0
    assert _manifest(out)["counts"]["redone"] == 3
    with open(out / "index.csv") as f:
        assert len(list(csv.DictReader(f))) == 3


def _outputs_agree_with_records(out: Path) -> list[str]:
    """Every image json's listed outputs exist; returns the montages they list."""
    listed = []
    for rec_path in out.rglob("*.json"):
        if rec_path.name.startswith("manifest"):
            continue
        for name in json.loads(rec_path.read_text())["outputs"]:
            assert (rec_path.parent / name).is_file(), f"{rec_path.name} lists {name}, which is gone"
            listed += [name] if not name.endswith((".npz", ".json")) else []
    return listed


def test_an_interrupted_rerun_in_another_format_loses_no_finished_image(tmp_path, checkpoint):
    """The old montages of an image to redo stay until its new json lands: an interrupt mid-way leaves every
    image either as it was or redone, each json naming files that exist, and no summary of the last run."""
    from mcloss.explainability.export import ExportConfig, export

    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        _rgb(50 + i, 40, i).save(src / f"i{i}.png")
    out = tmp_path / "out"
    model = mcloss.load_checkpoint(checkpoint)

    def run(fmt: str, progress=None):
        config = ExportConfig(
            checkpoint=str(checkpoint), input=[str(src)], out=str(out), batch_size=1, workers=0, montage_format=fmt,
            style=render.Style(tile_height=48),
        )  # fmt: skip
        return export(model, config, device=torch.device("cpu"), progress=progress)

    run("png")
    assert sorted(_outputs_agree_with_records(out)) == [f"i{i}.png.png" for i in range(6)]

    def interrupt(done: int, total: int) -> None:
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("jpg", interrupt)
    montages = _outputs_agree_with_records(out)
    assert len(montages) == 6 and any(m.endswith(".png") for m in montages) and any(m.endswith(".jpg") for m in montages)
    assert not any((out / n).exists() for n in ("manifest.json", "index.csv", "errors.csv"))  # they described the last run
    assert run("jpg").written == 6 - sum(m.endswith(".jpg") for m in montages)
    assert sorted(_outputs_agree_with_records(out)) == [f"i{i}.png.jpg" for i in range(6)]
    assert not list(out.rglob("*.png.png")) and _manifest(out)["counts"]["ok"] + _manifest(out)["counts"]["skipped"] == 6


def test_a_rerun_that_cannot_read_a_changed_input_keeps_its_finished_outputs(tmp_path, checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        _rgb(50 + i, 40, i).save(src / f"i{i}.png")
    out = tmp_path / "out"
    assert _export(checkpoint, "--input", str(src), "--out", str(out)) == 0
    before = sorted(p.name for p in (out / "in").iterdir())
    (src / "i1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert _export(checkpoint, "--input", str(src), "--out", str(out)) == 1
    assert "i1.png" in next(iter(_errors(out))) and sorted(p.name for p in (out / "in").iterdir()) == before
    _outputs_agree_with_records(out)


def test_a_write_that_fails_midway_leaves_none_of_that_images_files(tmp_path, checkpoint, monkeypatch):
    """A full disk after the montage: the image is a row of errors.csv, and its montage goes with it."""
    from mcloss.explainability import outputs

    real = outputs.atomic_write_bytes

    def full_disk(path, data):
        if Path(path).name == "i1.png.npz":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(outputs, "atomic_write_bytes", full_disk)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _rgb(50 + i, 40, i).save(src / f"i{i}.png")
    out = tmp_path / "out"
    assert _export(checkpoint, "--input", str(src), "--out", str(out), "--target", "top2") == 1
    assert "No space left on device" in _errors(out)[str(src / "i1.png")]
    assert sorted(p.name for p in (out / "in").glob("i1*")) == []
    assert sorted(_outputs_agree_with_records(out)) == ["i0.png.png", "i0.png.r2.png", "i2.png.png", "i2.png.r2.png"]


# ------------------------------------------------------------------------------------------ killed exports


def _children(pid: int) -> set[int]:
    kids = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids |= {int(c) for c in (task / "children").read_text().split()}
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_export_leaves_no_live_worker(tmp_path, checkpoint, sig):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(60):
        _rgb(400, 300, i).save(src / f"img{i:02d}.png")
    cmd = [sys.executable, "-m", "mcloss", "export", "--checkpoint", str(checkpoint), "--input", str(src),
           "--out", str(tmp_path / "out"), "--batch-size", "1", "--workers", "2", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        workers: set[int] = set()
        while time.monotonic() < deadline and len(workers) < 2:
            workers = _children(proc.pid)
            time.sleep(0.05)
        assert len(workers) >= 2, "the export never started its workers"
        time.sleep(1.0)  # let them get busy decoding
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "workers outlived the export"
    finally:
        proc.kill()
        for w in workers:
            with contextlib.suppress(OSError):
                os.kill(w, signal.SIGKILL)


# ------------------------------------------------------------------------------------------ checkpoints


def _forged(path: Path, source: Path, **changes) -> Path:
    """A copy of ``source`` whose metadata config has ``changes`` (a value of None removes the key)."""
    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    config = json.loads(meta["config"])
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    meta["config"] = json.dumps(config)
    save_file(tensors, str(path), metadata=meta)
    return path


def test_checkpoint_metadata_is_checked_before_anything_is_built(tmp_path, checkpoint):
    cases = {
        "many.safetensors": ({"num_classes": 1500, "groups": [3] * 1500}, "class_names must be 1500"),
        "huge.safetensors": ({"num_classes": 10**9}, f"num_classes must be an integer in 1..{MAX_CLASSES}"),
        "bigimg.safetensors": ({"img_size": 100_000}, "img_size must be an integer in 16..1024"),
        "nogroups.safetensors": ({"groups": None}, "config lacks groups"),
        "nobackbone.safetensors": ({"backbone": None}, "config lacks backbone"),
        "nogrid.safetensors": ({"head_grid": None}, "config lacks head_grid"),
        "wide.safetensors": ({"groups": [4, 4, 4, 4], "xi": 4}, "head inputs"),
        "pool.safetensors": ({"mc_pool_share": 1.5}, r"mc_pool_share must be a number in \(0, 1\], got 1.5"),
        "poolstr.safetensors": ({"mc_pool_share": "top"}, "mc_pool_share must be a number"),
    }
    for name, (changes, says) in cases.items():
        path = _forged(tmp_path / name, checkpoint, **changes)
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError, match=says) as info:
            mcloss.load_checkpoint(path)
        assert str(info.value).startswith(str(path))
        assert time.perf_counter() - t0 < 5  # refused from the header, not after building 10^9 classes
    # a checkpoint saved before the MC head's pool was recorded: the L_dis pool its card names, else the official GAP
    old = _forged(tmp_path / "old.safetensors", checkpoint, mc_pool_share=None)
    assert mcloss.load_checkpoint(old).mc_pool_share == 1.0
    with safe_open(str(old), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for share, alpha, expect in ((0.05, 1.5, 0.05), (0.05, 0.0, 1.0), ("x", 1.5, 1.0), (7, 1.5, 1.0)):  # alpha 0: CE only
        meta["card"] = json.dumps(json.loads(meta["card"]) | {"dis_topk": share, "alpha": alpha})
        save_file(tensors, str(tmp_path / "topk.safetensors"), metadata=meta)
        assert mcloss.load_checkpoint(tmp_path / "topk.safetensors").mc_pool_share == expect
    # class names that agree with a lying class count: the header's head shape refuses it
    with safe_open(str(checkpoint), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(meta["config"])
    config.update(num_classes=1500, groups=[3] * 1500)
    meta.update(config=json.dumps(config), class_names=json.dumps([f"c{i}" for i in range(1500)]))
    save_file(tensors, str(tmp_path / "lying.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="metadata says 1500 classes but the weights have 4"):
        mcloss.load_checkpoint(tmp_path / "lying.safetensors")


def test_cli_commands_refuse_bad_metadata_in_one_line(tmp_path, checkpoint, capsys):
    path = _forged(tmp_path / "nogroups.safetensors", checkpoint, groups=None)
    _rgb(40, 30).save(tmp_path / "i.png")
    for argv in (
        ["export", "--checkpoint", str(path), "--input", str(tmp_path / "i.png"), "--out", str(tmp_path / "o")],
        ["eval", "--checkpoint", str(path), "--data", str(tmp_path)],
    ):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "config lacks groups" in err and "KeyError" not in err, err


# ------------------------------------------------------------------------------------------ inputs


def test_inputs_that_give_nothing_are_rows_of_errors_csv(tmp_path, checkpoint, monkeypatch):
    src = tmp_path / "in"
    (src / "locked").mkdir(parents=True)
    _rgb(40, 30).save(src / "good.png")
    _rgb(40, 30).save(src / "locked" / "hidden.png")
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(src / "pipe.png")
    (tmp_path / "empty").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # root may read anything: fake the permission error of an unreadable folder
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    pattern = str(tmp_path / "*.nothing")
    code = _export(checkpoint, "--input", str(src), str(tmp_path / "empty"), pattern, "--out", str(out))
    assert code == 1
    errors = _errors(out)
    assert "unreadable folder" in errors[str(src / "locked")]
    assert "dangling symbolic link" in errors[str(src / "gone.png")]
    assert "not a regular file" in errors[str(src / "pipe.png")]
    assert "no image files found" in errors[str(tmp_path / "empty")]
    assert "no file matches" in errors[pattern]
    assert (out / "in" / "good.png.json").is_file()
    # every row of index.csv and errors.csv is an input: the counts add up
    assert _manifest(out)["counts"] == {"inputs": 6, "ok": 1, "redone": 0, "failed": 5, "skipped": 0}


def test_a_glob_reports_the_image_names_that_are_no_files_as_a_folder_does(tmp_path, checkpoint, capsys):
    src = tmp_path / "in"
    (src / "x.png").mkdir(parents=True)  # a folder with an image name: not an input of a glob, and no error
    _rgb(40, 30).save(src / "good.png")
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (src / "loop.png").symlink_to(src / "loop.png")
    os.mkfifo(src / "pipe.png")
    out = tmp_path / "out"
    assert _export(checkpoint, "--input", str(src / "*.png"), "--out", str(out)) == 1
    assert _errors(out) == {
        str(src / "gone.png"): f"{src / 'gone.png'}: dangling symbolic link",
        str(src / "loop.png"): f"{src / 'loop.png'}: symbolic link loop",
        str(src / "pipe.png"): f"{src / 'pipe.png'}: not a regular file",
    }
    assert _manifest(out)["counts"] == {"inputs": 4, "ok": 1, "redone": 0, "failed": 3, "skipped": 0}
    # named one by one, they say the same, not what decoding them would
    named = [str(src / n) for n in ("loop.png", "pipe.png", "gone.png")]
    assert _export(checkpoint, "--input", *named, "--out", str(tmp_path / "named")) == 1
    assert sorted(_errors(tmp_path / "named").values()) == sorted(_errors(out).values())


def test_a_rejected_name_with_a_newline_is_one_line_on_stderr(tmp_path, checkpoint, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "two\nlines.png").write_bytes(b"not an image")
    _rgb(40, 30).save(src / "good.png")
    assert _export(checkpoint, "--input", str(src), "--out", str(tmp_path / "out")) == 1
    rejected = [line for line in capsys.readouterr().err.splitlines() if "lines.png" in line]
    assert len(rejected) == 1 and rejected[0].startswith("  rejected: ") and "two\\nlines.png" in rejected[0]


def test_out_inside_input_is_never_read_back(tmp_path, checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    _rgb(40, 30).save(src / "chelsea.png")
    out = src / "exported"
    for _ in range(3):
        assert _export(checkpoint, "--input", str(src), "--out", str(out), "--tile-height", "32") == 0
    jsons = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json") if p.name != "manifest.json")
    assert jsons == ["in/chelsea.png.json"]
    # a file in the output folder named as an input is an error, not an input; the output folder itself as an
    # input is refused outright (issue 26: its index, errors and manifest would land among the inputs)
    assert _export(checkpoint, "--input", str(out / "in" / "chelsea.png.png"), "--out", str(out)) == 1
    assert len(_errors(out)) == 1 and all("output folder" in r for r in _errors(out).values())
    assert _export(checkpoint, "--input", str(out), "--out", str(out)) == 2


# ------------------------------------------------------------------------------------------ messages


def _float64_tiff(path: Path, w: int = 4, h: int = 3, samples: int = 1) -> None:
    """A TIFF of 64-bit float samples (``samples`` a pixel: with 3, BitsPerSample's three SHORTs do not fit in
    its entry, which then holds their offset)."""
    entries = [(256, w), (257, h), (258, 64), (259, 1), (262, 1 if samples == 1 else 2), (273, 0), (277, samples),
               (278, h), (279, w * h * 8 * samples), (339, 3)]  # fmt: skip
    extra_at = 8 + 2 + 12 * len(entries) + 4  # the out-of-entry BitsPerSample values, then the pixels
    data_at = extra_at + (2 * samples if samples > 2 else 0)
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, value in entries:
        value = data_at if tag == 273 else value
        kind = 4 if tag in (273, 279) else 3
        if tag == 258 and samples > 2:
            out += struct.pack("<HHII", tag, 3, samples, extra_at)
            continue
        n = samples if tag == 258 else 1
        out += struct.pack("<HHI", tag, kind, n) + (struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, value if n == 2 else 0))
    extra = struct.pack(f"<{samples}H", *[64] * samples) if samples > 2 else b""
    path.write_bytes(out + struct.pack("<I", 0) + extra + bytes(w * h * 8 * samples))


def test_messages_name_the_real_reason(tmp_path):
    _float64_tiff(tmp_path / "f64.tif")
    with pytest.raises(ImageLoadError, match=r"TIFF whose pixel format .*\(64-bit floating-point samples\)"):
        load_image(tmp_path / "f64.tif")
    _float64_tiff(tmp_path / "rgb64.tif", samples=3)  # issue 26: was "206-bit floating-point samples"
    with pytest.raises(ImageLoadError, match=r"TIFF whose pixel format .*\(3 × 64-bit floating-point samples\)"):
        load_image(tmp_path / "rgb64.tif")
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # 200 MP, over Pillow's own 179 MP guard
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "bomb.png", max_pixels=40_000_000)
    assert "200 MP, limit 40 MP" in str(info.value) and "178956970" not in str(info.value)
    Image.new("1", (8000, 5001)).save(tmp_path / "just_over.png")  # 40.008 MP: over the limit, if barely
    with pytest.raises(ImageLoadError, match=r"\(8000×5001 = 40\.01 MP, limit 40 MP\)$"):
        load_image(tmp_path / "just_over.png", max_pixels=40_000_000)


def test_every_bad_flag_value_is_one_line_and_exit_2(tmp_path, checkpoint, capsys):
    _rgb(40, 30).save(tmp_path / "i.png")
    base = ["export", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "i.png"), "--out", str(tmp_path / "o")]
    bad = [["--batch-size", "x"], ["--method", "gradcam++"], ["--alpha", "2"], ["--colormap", "nope"],
           ["--tile-height", "5000"], ["--tile-height", "0"], ["--workers", "-1"], ["--topk", "-3"]]  # fmt: skip
    for flag in bad:
        assert cli_main([*base, *flag]) == 2, flag
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("mcloss export: error: "), err
    assert not (tmp_path / "o").exists()
    for argv in (["train", "--epochs", "x"], ["parts", "--radius", "wide"], ["synth", "--classes", "many"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"mcloss {argv[0]}: error: "), err


def test_a_rerun_never_takes_another_input_for_done(tmp_path, checkpoint):
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        _rgb(40, 30, seed).save(tmp_path / folder / "x.png")
    out = tmp_path / "out"
    assert _export(checkpoint, "--input", str(tmp_path / "a" / "x.png"), "--out", str(out), "--tile-height", "32") == 0
    assert _export(checkpoint, "--input", str(tmp_path / "b" / "x.png"), "--out", str(out), "--tile-height", "32") == 0
    assert _manifest(out)["counts"]["redone"] == 1  # the same output name, but another input: re-done
    assert json.loads((out / "x.png.json").read_text())["file"] == str(tmp_path / "b" / "x.png")


def test_stale_temp_cleanup_leaves_another_images_temps(tmp_path):
    from mcloss.explainability.outputs import stale_temps

    own = tmp_path / ".a.png.png.abcd1234.tmp.png"  # a killed write of a.png's montage
    other = tmp_path / ".a.png.png.png.efgh5678.tmp.png"  # a live write of a.png.png's montage
    for p in (own, other):
        p.write_bytes(b"x")
    assert stale_temps(tmp_path, {"a.png"}) == [own]


def test_export_sweeps_a_killed_runs_temps_with_one_listing_per_folder(tmp_path, checkpoint, monkeypatch):
    import mcloss.explainability.outputs as outputs_mod

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(5):
        _rgb(40, 30, i).save(src / f"x{i}.png")
    (out / "in").mkdir(parents=True)
    killed = [".x0.png.png.abcd1234.tmp.png", ".x0.png.r2.png.abcd1234.tmp.png", ".x3.png.npz.a_b1c2d3.tmp.npz"]
    foreign = [".y.png.json.abcd1234.tmp.json", ".x0.png.png.png.abcd1234.tmp.png", "x0.png.tmp"]  # not our outputs
    for name in killed + foreign:
        (out / "in" / name).write_bytes(b"x")
    listings = []
    scandir = os.scandir
    monkeypatch.setattr(outputs_mod.os, "scandir", lambda d: listings.append(Path(d)) or scandir(d))
    assert _export(checkpoint, "--input", str(src), "--out", str(out), "--tile-height", "32") == 0
    # one listing of the output folder, not one per image: an export stays O(n) (the inputs' walk lists src)
    assert [d for d in listings if out in d.parents] == [out / "in"]
    left = {p.name for p in (out / "in").iterdir() if "tmp" in p.name}
    assert left == set(foreign)


def test_compare_refuses_a_model_with_another_input_transform(tmp_path, checkpoint, capsys):
    other = tmp_path / "big.safetensors"
    mcloss.save_checkpoint(tiny_model(4, class_names=["ant", "bee", "cat", "dog"], img_size=96), other)
    _rgb(40, 30).save(tmp_path / "i.png")
    assert _export(checkpoint, "--input", str(tmp_path / "i.png"), "--out", str(tmp_path / "o"), "--compare", str(other)) == 2
    assert "input transform" in capsys.readouterr().err


def test_checkpoint_xi_must_match_the_groups(tmp_path, checkpoint):
    path = _forged(tmp_path / "xi.safetensors", checkpoint, xi=2000)
    with pytest.raises(CheckpointError, match="xi must be null or the size of every group"):
        mcloss.load_checkpoint(path)


def test_a_comparison_montage_stays_within_the_cap():
    a, b = tiny_model(4, seed=1), tiny_model(4, seed=2)
    image = _rgb(400, 300)
    ea = mcloss.explain(a, image, "pred")
    eb = mcloss.explain(b, image, [[ea.prediction]])
    picture = render.compare_montage(ea.view, ea, eb, 0, render.Style(tile_height=2048), ("a", "b"))
    assert picture.shape[0] * picture.shape[1] <= render.MONTAGE_MAX_PIXELS


def test_a_file_name_that_is_not_utf8_never_sinks_an_export(tmp_path, capsys):
    """Issue 26 item 2: such a name is exported (or rejected in errors.csv) like any other, the index, errors and
    manifest are written, the csv holds the name as valid UTF-8 with its odd bytes as \\xNN, the json keeps it
    losslessly, and a re-run finds the work done."""
    from mcloss.cli.export import main as export_main

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(src / "good.png")
    bad = os.fsencode(src) + b"/bad\xff\xfe.png"
    Image.new("RGB", (48, 40), (30, 200, 30)).save(bad)
    with open(os.fsencode(src) + b"/broken\xfe.jpg", "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "out"
    args = ["--input", str(src), "--out", str(out), "--no-progress"]
    assert export_main(args) == 1  # one input rejected, the others exported
    err = capsys.readouterr().err
    assert "2 exported" in err and "broken\\xfe.jpg: not a recognized image format" in err
    index = (out / "index.csv").read_bytes().decode("utf-8")
    assert "bad\\xff\\xfe.png" in index and "good.png" in index
    errors = (out / "errors.csv").read_bytes().decode("utf-8")
    assert "broken\\xfe.jpg" in errors
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["ok"] == 2 and manifest["counts"]["failed"] == 1
    record = json.loads(next(p for p in out.rglob("*.json") if p.name.startswith("bad")).read_text())
    assert os.fsencode(record["file"]) == bad
    assert export_main(args) == 1
    assert "0 exported, 2 already done, 1 rejected" in capsys.readouterr().err


def test_an_export_into_its_own_input_folder_is_refused(tmp_path, capsys):
    """Issue 26 item 10: ``--out`` equal to ``--input`` (or holding it) would write index.csv, errors.csv and
    manifest.json, and the montages, among the inputs; it is refused before anything is written."""
    from mcloss.cli.export import main as export_main

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(src / "good.png")
    for out in (src, tmp_path):
        assert export_main(["--input", str(src), "--out", str(out), "--no-progress"]) == 2
        assert f"--out {out} is the input folder {src} or holds it" in capsys.readouterr().err
        pattern = str(src / "*.png")  # a glob searches its folder as a folder input does
        assert export_main(["--input", pattern, "--out", str(out), "--no-progress"]) == 2
        assert f"--out {out} is the input folder {pattern} or holds it" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == ["good.png"] and sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert export_main(["--input", str(src), "--out", str(src / "out"), "--no-progress"]) == 0  # inside it: fine


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_torchrun_ranks_die_with_their_launcher(tmp_path, checkpoint):
    """Issue 26: after a SIGKILL of torchrun, its ranks (re-parented, in sessions of their own) and their decoding
    workers kept exporting beside a re-run."""
    src = tmp_path / "in"
    src.mkdir()
    ramp = np.linspace(0, 255, 320 * 240 * 3).reshape(240, 320, 3).astype(np.uint8)  # compresses to a few KB
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    total = 3000  # far more than the ranks export before they are killed: unkilled, they take a minute or more
    for i in range(total):
        (src / f"img{i:04d}.png").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mcloss", "export", "--checkpoint",
           str(checkpoint), "--input", str(src), "--out", str(out), "--batch-size", "1", "--workers", "2",
           "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    ranks: set[int] = set()
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not list(out.glob("in/*.json")):  # the ranks are exporting
            assert launcher.poll() is None, "torchrun ended before it was killed"
            time.sleep(0.1)
        ranks = _children(launcher.pid)
        workers = set().union(*(_children(r) for r in ranks))
        assert len(ranks) == 2 and all(_alive(p) for p in ranks), ranks
        assert len(workers) >= 2, "the ranks never started their decoding workers"
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher only: the ranks run in sessions of their own
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in ranks | workers):
            time.sleep(0.1)
        assert not [p for p in ranks | workers if _alive(p)], "ranks or workers outlived their launcher"
        assert not list(out.glob("manifest*")), "the ranks finished their shards"
        assert len(list(out.glob("in/*.json"))) < total
    finally:
        launcher.kill()
        launcher.wait()
        for pid in ranks | workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------ the API


def test_targets_that_are_no_spec_are_a_parameter_error(checkpoint):
    from mcloss.core.errors import ParameterError

    model = mcloss.load_checkpoint(checkpoint)
    for target in (1.5, [1.5], None, [None], {"a": 1}):
        with pytest.raises(ParameterError, match=r"target must be a class index or name, a spec such as 'pred'"):
            mcloss.explain(model, _rgb(40, 30), target)


def test_a_pil_image_in_any_mode_is_read_as_its_file_would_be(tmp_path, checkpoint):
    """An image the caller opened is converted as :func:`mcloss.load_image` converts files (alpha on white)."""
    model = mcloss.load_checkpoint(checkpoint)
    rgb = _rgb(40, 30)
    for mode in ("L", "P", "LA", "RGBA", "CMYK", "I;16", "F"):
        image = rgb.convert("L").convert(mode) if mode in ("I;16", "F") else rgb.convert(mode)
        image.save(tmp_path / f"{mode.replace(';', '')}.tiff")
        from_file = mcloss.explain(model, tmp_path / f"{mode.replace(';', '')}.tiff")
        opened = mcloss.explain(model, image)
        np.testing.assert_array_equal(opened.groups[0].channels, from_file.groups[0].channels, err_msg=mode)


def test_save_refuses_a_folder_and_replaces_an_earlier_saves_files(tmp_path, checkpoint):
    from mcloss.core.errors import OutputError, ParameterError

    model = mcloss.load_checkpoint(checkpoint)
    image = _rgb(40, 30)
    mcloss.explain(model, image, "top3").save(tmp_path / "b.jpg", image=image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.jpg.json", "b.jpg.npz", "b.jpg.png", "b.jpg.r2.png", "b.jpg.r3.png"]
    one = mcloss.explain(model, image, "pred")
    one.save(tmp_path / "b.jpg", image=image, montage_format="jpg")  # one target, another format: the rest go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.jpg.jpg", "b.jpg.json", "b.jpg.npz"]
    for path in ("", f"{tmp_path}/", tmp_path):
        with pytest.raises(ParameterError, match="is a folder or empty, not an output stem"):
            one.save(path, image=image)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=rf"{tmp_path / 'afile' / 'x.jpg'}: cannot write the explanation"):
        one.save(tmp_path / "afile" / "x.jpg", image=image)
