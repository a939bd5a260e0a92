"""Eval/train transform geometry: tensors match torchvision, points map exactly both ways."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mcloss.core.errors import ParameterError
from mcloss.core.transforms import EvalTransform, TrainTransform, features_to_original


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "tf, reference",
    [
        (EvalTransform((64, 48)), T.Compose([T.Resize((64, 48)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])),
        (
            EvalTransform(80, (64, 64)),
            T.Compose([T.Resize(80), T.CenterCrop(64), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]),
        ),
    ],
)
@pytest.mark.parametrize("size", [(120, 90), (90, 131), (64, 64)])
def test_eval_tensor_matches_torchvision(tf, reference, size):
    img = _image(*size)
    torch.testing.assert_close(tf(img), reference(img))


def test_geometry_round_trip_and_crop_offsets():
    tf = EvalTransform(100, (64, 64))
    geo = tf.geometry(300, 150)  # shorter side 150 → 100: resized 200×100, crop at x=68, y=18
    assert geo.resized == (200, 100) and geo.crop == (68, 18, 64, 64)
    pts = np.array([[0.0, 0.0], [150.0, 75.0], [299.5, 149.5]])
    np.testing.assert_allclose(geo.to_original(geo.to_input(pts)), pts)
    np.testing.assert_allclose(geo.to_input([[150.0, 75.0]]), [[32.0, 32.0]])  # centre → centre


def test_points_through_their_own_geometries_map_as_each_geometry_alone():
    """explain's batch peaks: every point through its own image's geometry, bit for bit what each gives alone."""
    tf = EvalTransform(80, (64, 64))
    geos = [tf.geometry(w, h) for w, h in [(170, 117), (64, 64), (33, 500), (2000, 50), (81, 79)]]
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 4, (12, 2))
    rows = [geos[i % len(geos)] for i in range(len(pts))]
    together = features_to_original(pts, rows, (4, 4))
    alone = np.concatenate([g.feature_to_original(p[None], (4, 4)) for g, p in zip(rows, pts, strict=True)])
    assert together.dtype == np.float64 and together.shape == (12, 2)
    assert np.array_equal(together, alone)
    assert len({tuple(r) for r in together}) > len(geos)  # the geometries differ: a row taken from another image shows
    with pytest.raises(ParameterError, match="geometries: 5 for 12 points"):
        features_to_original(pts, geos, (4, 4))


def test_feature_cells_map_to_original_cell_centres():
    tf = EvalTransform((40, 80))  # exact resize, no crop
    geo = tf.geometry(160, 40)  # 2x horizontally, 1x vertically... to (80, 40)
    # feature map 10×20: each cell is 4×4 input pixels = 8×4 original pixels
    np.testing.assert_allclose(geo.feature_to_original([[0, 0], [19, 9]], (10, 20)), [[4.0, 2.0], [156.0, 38.0]])
    affine = geo.original_to_feature_affine((10, 20))
    # the original pixel whose centre is a cell centre maps onto that cell index
    x, y = 156.0 - 0.5, 38.0 - 0.5
    fx, fy = affine @ np.array([x, y, 1.0])
    assert fx == pytest.approx(19.0) and fy == pytest.approx(9.0)


def test_recipes():
    scratch = EvalTransform.for_recipe("official-scratch", 224)
    assert scratch.resize == (224, 224) and scratch.crop is None and scratch.mean == (0.5, 0.5, 0.5)
    pre = EvalTransform.for_recipe("official-pretrained", 448, "imagenet")
    assert pre.resize == 600 and pre.crop == (448, 448) and pre.mean[0] == pytest.approx(0.485)
    assert EvalTransform.from_dict(pre.to_dict()) == pre


def test_train_transform_carries_points_through_crop_and_flip():
    import random

    w, h = 90, 60
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[20, 70] = 255  # a bright dot at (x=70, y=20)
    img = Image.fromarray(arr)
    tf = TrainTransform((48, 48), (48, 48), padding=4, flip=True, mean=(0, 0, 0), std=(1, 1, 1))
    flips = set()
    for seed in range(12):
        random.seed(seed)
        tensor, pts = tf(img, np.array([[70.5, 20.5]]))  # pixel centre
        bright = tensor.sum(0)
        y, x = np.unravel_index(int(bright.argmax()), bright.shape)
        # resized dot spans a few pixels; its brightest pixel lies within one pixel of the mapped centre
        assert abs(pts[0, 0] - (x + 0.5)) <= 1.0 and abs(pts[0, 1] - (y + 0.5)) <= 1.0
        flips.add(bool(pts[0, 0] < 24))
    assert flips == {True, False}  # both flipped and unflipped draws were checked
