"""`mcloss eval`: the table of both heads, the JSON file, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcloss.cli.eval import main
from mcloss.core.errors import DatasetError
from mcloss.evaluation.classification import evaluate, format_report


@pytest.fixture
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint(2, ["a", "b"])


def image_folder(root: Path, classes=("a", "b"), per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_prints_the_table_and_writes_json(tmp_path, checkpoint, capsys):
    root = image_folder(tmp_path / "data")
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(checkpoint), "--data", str(root), "--device", "cpu", "--workers", "0", "--json", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{checkpoint}: 4 test images, 2 classes, FC-head loss ")
    assert lines[1].split() == ["head", "top-1", "top-2"]
    assert [line.split()[0] for line in lines[2:]] == ["FC", "MC"]
    result = json.loads(out.read_text())
    assert result["n"] == 4 and result["topk"] == 2 and result["dataset"] == "auto"
    assert result["fc"] == {"top1": result["fc_top1"], "top2": result["fc_top5"]}
    assert format_report(result, str(checkpoint), 2) == "\n".join(lines)


def test_bad_inputs_fail_with_one_line(tmp_path, checkpoint, capsys):
    root = image_folder(tmp_path / "data")
    assert main(["--checkpoint", str(checkpoint), "--data", str(root), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "mcloss eval: error: --batch-size must be >= 1 and --workers >= 0"
    missing = tmp_path / "missing.safetensors"
    assert main(["--checkpoint", str(missing), "--data", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mcloss eval: error: {missing}") and len(err.splitlines()) == 1
    other = image_folder(tmp_path / "other", classes=("x", "y"))
    assert main(["--checkpoint", str(checkpoint), "--data", str(other), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mcloss eval: error: {other}: ") and "do not match" in err
    assert main(["--checkpoint", str(checkpoint), "--data", str(root), "--dataset", "nope"]) == 2


def test_evaluate_reports_progress_per_batch_and_refuses_an_empty_split(make_model):
    model = make_model(2)
    batches = [(torch.rand(2, 3, 64, 64), torch.tensor([0, 1])) for _ in range(3)]
    seen: list[tuple[int, int]] = []
    evaluate(model, batches, "cpu", progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    seen.clear()
    evaluate(model, batches, "cpu", limit_batches=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 2), (1, 2), (2, 2)]
    with pytest.raises(DatasetError, match="no samples were evaluated"):
        evaluate(model, [], "cpu")
