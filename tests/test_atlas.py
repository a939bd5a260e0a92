"""The channel atlas against planted truth: the running top-k, patch boxes, part labels, consistency,
stability, resuming an interrupted pass, and the CLI's files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model

import mcloss
from mcloss.cli import main as cli_main
from mcloss.core.errors import DatasetError, UnknownClassError
from mcloss.data.cub import CUBDataset
from mcloss.data.synth import generate_dataset
from mcloss.explainability.atlas import AtlasInputs, build_atlas, patch_box, running_topk


def test_running_topk_keeps_the_best_image_per_channel_across_batches():
    empty = torch.empty(2, 0)
    state = (empty.float(), empty.long(), empty.long())
    a = torch.zeros(3, 2, 2, 2)
    a[0, 0, 1, 1], a[1, 0, 0, 1], a[2, 0, 1, 0] = 5.0, 9.0, 1.0  # channel 0: image 1 best, then 0
    a[:, 1] = torch.tensor([1.0, 2.0, 3.0])[:, None, None]  # channel 1: flat maps, later images larger
    state = running_topk(state, a, torch.tensor([0, 1, 2]), 2)
    b = torch.zeros(2, 2, 2, 2)
    b[0, 0, 0, 0] = 7.0
    b[:, 1] = torch.tensor([0.5, 4.0])[:, None, None]
    values, images, cells = running_topk(state, b, torch.tensor([3, 4]), 2)
    assert values[0].tolist() == [9.0, 7.0] and images[0].tolist() == [1, 3] and cells[0].tolist() == [1, 0]
    assert values[1].tolist() == [4.0, 3.0] and images[1].tolist() == [4, 2]


def test_patch_box_is_centred_and_kept_inside():
    assert patch_box((50, 40), (100, 80), 0.2) == [40, 30, 60, 50]
    assert patch_box((2, 79), (100, 80), 0.2) == [0, 60, 20, 80]  # shifted inside at the corner
    assert patch_box((5, 5), (10, 8), 2.0) == [0, 0, 10, 8]  # larger than the image: the image


def _planted(model, cell_xy: tuple[int, int]):
    """forward_features → zeros except channel 0 at ``cell_xy``, as strong as the image is bright."""
    real = model.forward_features
    fh, fw = real(torch.zeros(1, 3, 64, 64)).shape[2:]

    def fake(x):
        f = torch.zeros(x.shape[0], model.num_channels, fh, fw)
        f[:, 0, cell_xy[1], cell_xy[0]] = 10.0 + x.mean(dim=(1, 2, 3))
        f[:, 1:] = 0.01 * torch.rand(x.shape[0], model.num_channels - 1, fh, fw)
        return f

    model.forward_features = fake
    return (fh, fw)


def test_atlas_labels_a_planted_channel_with_its_part(tmp_path):
    from PIL import Image

    model = tiny_model(2, img_size=64, last_stage=2, class_names=["a", "b"])
    fh, fw = _planted(model, (5, 9))
    paths, labels, kps = [], [], []
    rng = np.random.default_rng(0)
    for i in range(6):
        w, h = 80 + 8 * i, 64
        p = tmp_path / f"i{i}.png"
        Image.fromarray(np.full((h, w, 3), 20 * i, np.uint8)).save(p)
        geo = model.transform.geometry(w, h)
        at = geo.feature_to_original(np.array([[5, 9]]), (fh, fw))[0]
        far = [w - 1.0, 0.0]
        kp = np.array([[*at, 1.0], far + [1.0]]) + np.array([[rng.uniform(-1, 1), 0, 0], [0, 0, 0]])
        paths.append(str(p)), labels.append(i % 2), kps.append(kp)
    inputs = AtlasInputs(paths, labels, kps, ["beak", "tail"])
    summary = build_atlas(model, inputs, classes=["a"], top=4, batch_size=4, noise=0.5)
    ch0 = summary["classes"]["a"]["channels"][0]
    assert ch0["part"] == "beak" and ch0["purity"] == 1.0
    assert [e["image"] for e in ch0["top"]] == [paths[5], paths[4], paths[3], paths[2]]  # brightest first
    for e in ch0["top"]:
        x0, y0, x1, y1 = e["box"]
        assert x0 <= e["peak_xy"][0] <= x1 and y0 <= e["peak_xy"][1] <= y1
    assert ch0["consistency"] == {"part": "beak", "share": 1.0, "consistent": True}
    # stability counts the pairs whose clean peak hits a part: channel 0 on the 3 images of class a, kept
    assert summary["stability"] == {"pairs": 3, "stable": 3, "share": 1.0} and summary["consistency"]["channels"] == 3
    assert summary["images"] == 6 and summary["has_parts"]
    # a class named twice (by name and by index) is counted once
    twice = build_atlas(model, inputs, classes=["a", 0], top=4, batch_size=4, noise=0.5)
    assert twice["consistency"] == summary["consistency"] and twice["stability"] == summary["stability"]
    # channels whose class has no image to score measure nothing: not "0 of 3"
    only_b = AtlasInputs(paths[1::2], labels[1::2], kps[1::2], ["beak", "tail"])
    none = build_atlas(model, only_b, classes=["a"], top=2, batch_size=4, noise=None)["consistency"]
    assert none["share"] is None and none["consistent_channels"] is None and none["measured"] == 0 and none["channels"] == 3


def _birds(tmp_path):
    """A 12-image synth split, a tiny model of its classes and the atlas inputs."""
    data = tmp_path / "birds"
    generate_dataset(data, 2, 6, 48, 0, test_fraction=1.0)
    ds = CUBDataset(data, "test")
    return ds, tiny_model(2, img_size=48, last_stage=2, class_names=ds.class_names), AtlasInputs.from_cub(ds)


def test_an_interrupted_atlas_resumes_where_it_stopped(tmp_path):
    ds, model, inputs = _birds(tmp_path)
    whole = build_atlas(model, inputs, top=3, batch_size=4, noise=None)
    state = tmp_path / "state.safetensors"
    calls = []

    def stop(done, total):
        calls.append(done)
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_atlas(model, inputs, top=3, batch_size=4, noise=None, state=state, save_every=100, progress=stop)
    assert json.loads(state.with_suffix(".json").read_text())["done"] == 4
    seen = []
    resumed = build_atlas(model, inputs, top=3, batch_size=4, noise=None, state=state, progress=lambda d, t: seen.append(d))
    assert seen[0] == 4 and seen[-1] == len(inputs.paths)
    assert resumed["classes"] == whole["classes"]


def test_cli_writes_sheets_index_and_summary(tmp_path, capsys):
    data = tmp_path / "birds"
    generate_dataset(data, 3, 4, 48, 0)
    names = CUBDataset(data, "test").class_names
    ckpt = tmp_path / "m.safetensors"
    mcloss.save_checkpoint(tiny_model(3, img_size=48, last_stage=2, class_names=names), ckpt)
    out = tmp_path / "atlas"
    argv = ["atlas", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--top", "2", "--workers", "0",
            "--no-progress", "--device", "cpu"]  # fmt: skip
    assert cli_main(argv) == 0
    index = json.loads((out / "atlas.json").read_text())
    assert set(index["classes"]) == set(names)
    assert sorted(p.name for p in (out / "sheets").iterdir()) == sorted(f"{n}.png" for n in names)
    text = (out / "summary.md").read_text()
    assert text.count("- channel ") == 3 * len(names) and "Part consistency" in text
    assert cli_main([*argv, "--top", "0"]) == 2
    assert "--top must be >= 1" in capsys.readouterr().err


def test_an_atlas_refuses_data_of_other_classes(tmp_path, capsys):
    data = tmp_path / "birds"
    generate_dataset(data, 3, 2, 48, 0)
    names = CUBDataset(data, "test").class_names
    out = tmp_path / "atlas"
    for model_names, reason in (
        ([*names, "Extra_Bird"], "its 3 classes do not match the checkpoint's 4 classes"),
        ([names[0], "Other_Bird", names[2]], f"its classes do not match the checkpoint's (class 1 is {names[1]!r} in the data but 'Other_Bird' in the checkpoint)"),
    ):  # fmt: skip
        ckpt = tmp_path / "m.safetensors"
        mcloss.save_checkpoint(tiny_model(len(model_names), img_size=48, last_stage=2, class_names=model_names), ckpt)
        argv = ["atlas", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--workers", "0",
                "--no-progress", "--device", "cpu"]  # fmt: skip
        assert cli_main(argv) == 2
        assert capsys.readouterr().err.strip() == f"mcloss atlas: error: {data}: {reason}"
        assert not out.exists()
        inputs = AtlasInputs.from_cub(CUBDataset(data, "test"))
        with pytest.raises(DatasetError, match=f"the atlas inputs: {reason[:20]}"):
            build_atlas(mcloss.load_checkpoint(ckpt), inputs)
    ds, model, inputs = _birds(tmp_path / "planted")  # inputs without class names: the labels must be the model's
    with pytest.raises(UnknownClassError, match="^classes: unknown class 'Nope'$"):
        build_atlas(model, inputs, classes=["Nope"])
    with pytest.raises(DatasetError, match="the atlas inputs: labels outside the checkpoint's"):
        build_atlas(model, AtlasInputs(inputs.paths, [model.num_classes] * len(inputs.paths), inputs.keypoints, inputs.part_names))


def test_an_interrupt_inside_a_batch_resumes_without_duplicates(tmp_path):
    ds, model, inputs = _birds(tmp_path)
    whole = build_atlas(model, inputs, top=len(inputs.paths), batch_size=4, noise=0.3)
    real, calls = model.forward_features, []

    def dies_in_the_noisy_pass_of_batch_2(x):
        calls.append(1)
        if len(calls) == 4:  # batch 1: clean + noisy, batch 2: clean, then its noisy pass
            raise KeyboardInterrupt
        return real(x)

    state = tmp_path / "state.safetensors"
    model.forward_features = dies_in_the_noisy_pass_of_batch_2
    with pytest.raises(KeyboardInterrupt):
        build_atlas(model, inputs, top=len(inputs.paths), batch_size=4, noise=0.3, state=state)
    model.forward_features = real
    resumed = build_atlas(model, inputs, top=len(inputs.paths), batch_size=4, noise=0.3, state=state)
    for name, group in resumed["classes"].items():
        for row, want in zip(group["channels"], whole["classes"][name]["channels"], strict=True):
            images = [e["image"] for e in row["top"]]
            assert len(images) == len(set(images)) == len(inputs.paths)  # every image once
            assert images == [e["image"] for e in want["top"]]
    # another model is not resumed from this state
    other = build_atlas(tiny_model(2, img_size=48, last_stage=2, class_names=ds.class_names, seed=4), inputs,
                        top=2, batch_size=4, noise=None, state=state, model_id="other")  # fmt: skip
    assert other["images"] == len(inputs.paths)


def _cli_birds(tmp_path):
    data = tmp_path / "birds"
    generate_dataset(data, 3, 4, 48, 0)
    names = CUBDataset(data, "test").class_names
    ckpt = tmp_path / "m.safetensors"
    mcloss.save_checkpoint(tiny_model(3, img_size=48, last_stage=2, class_names=names), ckpt)
    argv = ["atlas", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "atlas"), "--top", "2",
            "--workers", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    return data, tmp_path / "atlas", argv


def test_an_atlas_without_keypoints_says_so_instead_of_counting(tmp_path, capsys):
    data, out, argv = _cli_birds(tmp_path)
    (data / "parts" / "part_locs.txt").unlink()
    assert cli_main(argv) == 0
    said = capsys.readouterr().out
    index = json.loads((out / "atlas.json").read_text())
    assert not index["has_parts"]
    assert index["consistency"]["consistent_channels"] is None and index["consistency"]["share"] is None
    assert index["stability"]["share"] is None
    text = (out / "summary.md").read_text()
    for shown in (text, said):
        assert "no keypoints" in shown and "measured channels" not in shown and "Part consistency:" not in shown
    # with the keypoints, the count is given and "no keypoints" is not
    generate_dataset(data, 3, 4, 48, 0)
    assert cli_main(argv) == 0
    text = (out / "summary.md").read_text()
    assert "no keypoints" not in text and "of 9 measured channels" in text and json.loads((out / "atlas.json").read_text())["has_parts"]


def test_an_atlas_lists_its_skipped_images_on_stderr_and_in_the_summary(tmp_path, capsys):
    data, out, argv = _cli_birds(tmp_path)
    ds = CUBDataset(data, "test")
    broken = [ds.records[1].path, ds.records[4].path]
    for path in broken:
        path.write_bytes(b"not an image")
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mcloss atlas: skipped ")]
    assert len(lines) == 2 and all(str(p) in line for p, line in zip(broken, lines, strict=True))
    text = (out / "summary.md").read_text()
    assert "Skipped 2 unreadable images:" in text and all(f"- {p}" in text for p in broken)
    index = json.loads((out / "atlas.json").read_text())
    assert index["images"] == len(ds) - 2 and len(index["skipped"]) == 2


def test_an_interrupted_atlas_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    ds, model, inputs = _birds(tmp_path)
    whole_state = tmp_path / "whole.safetensors"
    whole = build_atlas(model, inputs, top=3, batch_size=4, noise=0.5, state=whole_state)
    noisy = json.loads(whole_state.with_suffix(".json").read_text())["noisy"]
    assert len(noisy) == len(inputs.paths)

    def stop_after(n):
        def progress(done, total):
            if done >= n:
                raise KeyboardInterrupt

        return progress

    state = tmp_path / "state.safetensors"
    for n in (4, 8):  # interrupted twice, then resumed to the end
        with pytest.raises(KeyboardInterrupt):
            build_atlas(model, inputs, top=3, batch_size=4, noise=0.5, state=state, progress=stop_after(n))
        assert json.loads(state.with_suffix(".json").read_text())["done"] == n
    resumed = build_atlas(model, inputs, top=3, batch_size=4, noise=0.5, state=state)
    assert json.loads(state.with_suffix(".json").read_text())["noisy"] == noisy  # every image's noisy peaks
    assert resumed == whole
    # the seed is what a state must match: another seed starts afresh and draws other noise
    other = build_atlas(model, inputs, top=3, batch_size=4, noise=0.5, state=state, seed=1)
    assert json.loads(state.with_suffix(".json").read_text())["noisy"] != noisy and other["images"] == whole["images"]


def test_a_rerun_for_fewer_classes_leaves_no_sheet_of_the_others(tmp_path, capsys):
    data, out, argv = _cli_birds(tmp_path)
    assert cli_main(argv) == 0
    assert len(list((out / "sheets").glob("*.png"))) == 3
    assert cli_main([*argv, "--classes", "0"]) == 0
    index = json.loads((out / "atlas.json").read_text())
    assert [p.stem for p in (out / "sheets").glob("*.png")] == list(index["classes"]) and len(index["classes"]) == 1
