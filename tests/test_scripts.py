"""The analysis scripts behind docs/ablation_discussion.md, on the shipped checkpoint and tiny synthetic data."""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import mcloss
from mcloss.data import CUBDataset
from mcloss.synth import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from peak_cells import peak_cell_shares  # noqa: E402

CHECKPOINT = ROOT / "checkpoints" / "default.safetensors"


@pytest.fixture(scope="module")
def birds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("peaks") / "birds"
    generate_dataset(root, classes=12, per_class=2, size=96, seed=5, test_fraction=1.0)
    return root


def test_peak_cell_shares_count_the_argmax_cells(birds):
    result = peak_cell_shares(str(CHECKPOINT), str(birds), batch=5)
    model = mcloss.load_checkpoint(CHECKPOINT)
    records = CUBDataset(birds, "test").records
    counters = [Counter() for _ in range(3)]
    with torch.no_grad():
        for rec in records:
            x = model.transform(mcloss.load_image(rec.path))[None]
            maps = model.forward_features(x)[0, model.group_slice(rec.label)]
            h, w = maps.shape[1:]
            for j, flat in enumerate(maps.flatten(1).argmax(1).tolist()):
                counters[j][(flat % w, flat // w)] += 1
    n = len(records)
    assert result["images"] == n == 24
    assert result["top_cell_share"] == [round(c.most_common(1)[0][1] / n, 3) for c in counters]
    assert result["distinct_cells"] == len(sum(counters, Counter()))
    assert result["map"] == f"{h}x{w}" and result["cells"] == h * w
    assert result["border_cells_share"] == round((h * w - (h - 2) * (w - 2)) / (h * w), 3)
