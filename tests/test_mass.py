"""Defining-part metrics (mcloss.metrics.mass) against planted ground truth, with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mcloss.metrics import mass as W

# A 10 × 20 image: part 0 (label 1) in columns 0-3, part 1 (label 2) in columns 4-7 of rows 0-4,
# part 2 (label 3) in columns 8-11, the body (label 9 > P) in columns 12-15, background elsewhere.
P = 3


def _regions() -> np.ndarray:
    r = np.zeros((10, 20), np.int32)
    r[0:5, 0:4] = 1  # 20 px
    r[0:5, 4:8] = 2  # 20 px
    r[0:5, 8:12] = 3  # 20 px
    r[0:5, 12:16] = 9  # body
    return r


def test_map_on_the_defining_parts_only_hits_the_clip():
    regions = _regions()
    values = np.where(regions == 2, 1.0, 0.0)
    assert W.mass_ratio(values, regions, [1], P) == W.RATIO_CLIP
    assert W.rank_accuracy(values, regions == 2) == 1.0
    energy = W.energy_shares(values, regions, P)
    assert energy["object"] == 1.0
    np.testing.assert_allclose(energy["parts"], [0.0, 1.0, 0.0])


def test_uniform_map_has_no_preference_and_chance_rank():
    regions = _regions()
    values = np.ones(regions.shape)
    assert W.mass_ratio(values, regions, [1], P) == pytest.approx(1.0)
    # K = 20 defining pixels of 200; every pixel ties, so the expected share is 20 / 200
    assert W.rank_accuracy(values, regions == 2) == pytest.approx(0.1)
    energy = W.energy_shares(values, regions, P)
    assert energy["object"] == pytest.approx(80 / 200)  # parts + body
    np.testing.assert_allclose(energy["parts"], [0.1, 0.1, 0.1])
    assert W.defining_chance(regions, [1], P) == pytest.approx(1 / 3)


def test_map_on_the_background_scores_nothing():
    regions = _regions()
    values = np.where(regions == 0, 1.0, 0.0)
    assert math.isnan(W.mass_ratio(values, regions, [1], P))  # no mass on any part
    assert W.rank_accuracy(values, regions == 2) == 0.0
    energy = W.energy_shares(values, regions, P)
    assert energy["object"] == 0.0
    np.testing.assert_allclose(energy["parts"], [0.0, 0.0, 0.0])


def test_hand_computed_ratio_and_rank():
    regions = _regions()
    values = np.zeros(regions.shape)
    values[regions == 1] = 3.0  # defining
    values[regions == 2] = 1.0
    values[regions == 3] = 2.0  # defining
    values[regions == 9] = 100.0  # the body is neither side
    # defining density (60 + 40) / 40 = 2.5, other density 20 / 20 = 1.0
    assert W.mass_ratio(values, regions, [0, 2], P) == pytest.approx(2.5)
    # top-40 pixels: 20 body (100) + 20 of part 0 (3) → 20 of 40 inside the defining mask
    mask = np.isin(regions, [1, 3])
    assert W.rank_accuracy(values, mask) == pytest.approx(0.5)
    # negative values are not mass
    assert W.mass_ratio(np.where(regions == 0, -5.0, values), regions, [0, 2], P) == pytest.approx(2.5)


def test_rank_accuracy_shares_ties_at_the_threshold():
    values = np.array([[5.0, 1.0, 1.0, 1.0]])
    mask = np.array([[False, True, False, False]])  # K = 1: the single top pixel is outside
    assert W.rank_accuracy(values, mask) == 0.0
    mask = np.array([[True, True, False, False]])  # K = 2: 5 (inside) then one of three tied 1s (1/3 inside)
    assert W.rank_accuracy(values, mask) == pytest.approx((1 + 1 / 3) / 2)


def test_ratio_undefined_without_both_sides():
    regions = _regions()
    values = np.ones(regions.shape)
    assert math.isnan(W.mass_ratio(values, regions, [0, 1, 2], P))  # no other part
    assert math.isnan(W.mass_ratio(values, np.where(regions == 2, 0, regions), [1], P))  # defining part not visible
    with pytest.raises(ValueError, match="differ in shape"):
        W.mass_ratio(np.ones((3, 3)), regions, [1], P)


def test_geometric_mean_ignores_undefined_values():
    assert W.geometric_mean([2.0, 8.0, float("nan"), None]) == pytest.approx(4.0)
    assert math.isnan(W.geometric_mean([float("nan")]))


def test_keypoint_regions_take_the_nearest_visible_keypoint_within_the_radius():
    kp = np.array([[2.0, 2.0, 1.0], [6.0, 2.0, 1.0], [4.0, 2.0, 0.0]])  # part 2 invisible
    regions = W.keypoint_regions(kp, (10, 5), radius_px=2.0)
    assert regions.shape == (5, 10)
    assert regions[2, 1] == 1 and regions[2, 6] == 2  # pixel centres (1.5, 2.5) and (6.5, 2.5)
    assert regions[2, 9] == 0  # (9.5, 2.5) is 3.5 px from part 1
    assert not (regions == 3).any()
    assert (W.keypoint_regions(np.zeros((3, 3)), (4, 4), 2.0) == 0).all()


def test_peak_region_reads_the_pixel_under_the_point():
    regions = _regions()
    assert W.peak_region((5.5, 2.5), regions) == 2
    assert W.peak_region((float("nan"), 2.0), regions) == 0
    assert W.peak_region((25.0, 2.0), regions) == 0


# ------------------------------------------------------------------ bootstrap intervals of the geometric mean


def test_interval_of_a_constant_ratio_is_that_ratio():
    lo, hi = W.geometric_mean_ci([[4.0, 4.0, 4.0]] * 30)
    assert lo == pytest.approx(4.0) and hi == pytest.approx(4.0)


def test_paired_interval_cancels_what_two_maps_share_about_an_image():
    rng = np.random.default_rng(1)
    cam = [[float(v)] for v in np.exp(rng.normal(1.5, 1.0, 80))]  # images differ a lot
    group = [[2.0 * v[0]] for v in cam]  # but the group's map is exactly twice Grad-CAM's on each
    lo, hi = W.geometric_mean_ci(group, cam)
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    alone = W.geometric_mean_ci(group)
    assert alone[1] / alone[0] > 1.4  # unpaired, the images' spread stays in the interval
    assert W.geometric_mean_ci(cam, cam) == pytest.approx((1.0, 1.0))


def test_an_images_channels_are_resampled_together():
    rng = np.random.default_rng(2)
    one = [[float(v)] for v in np.exp(rng.normal(0.0, 1.0, 50))]
    three = [v * 3 for v in one]  # three channels that agree on each image carry no more evidence than one
    assert W.geometric_mean_ci(three) == pytest.approx(W.geometric_mean_ci(one))


def test_the_95_percent_interval_covers_the_true_geometric_mean_about_95_percent_of_the_time():
    mu, covered, trials = 1.2, 0, 300
    for t in range(trials):
        values = np.exp(np.random.default_rng(100 + t).normal(mu, 0.8, (60, 3)))
        lo, hi = W.geometric_mean_ci(values.tolist(), resamples=1000, seed=t)
        covered += lo <= math.exp(mu) <= hi
    assert 0.88 <= covered / trials <= 0.99


def test_interval_without_values_or_with_misaligned_images():
    assert all(math.isnan(v) for v in W.geometric_mean_ci([[], [float("nan")]]))
    assert all(math.isnan(v) for v in W.geometric_mean_ci([[2.0]], [[]]))
    with pytest.raises(ValueError, match="same images"):
        W.geometric_mean_ci([[2.0], [3.0]], [[1.0]])
    with pytest.raises(ValueError, match="level"):
        W.geometric_mean_ci([[2.0]], level=1.0)


def test_an_image_where_grad_cam_has_no_ratio_drops_out_of_both_sides():
    rng = np.random.default_rng(3)
    cam = [[float(v)] for v in np.exp(rng.normal(1.0, 0.5, 40))]
    group = [[3.0 * v[0], 3.0 * v[0]] for v in cam]
    # one more image: Grad-CAM zero after its ReLU (no ratio), the group's map strongly on the defining parts
    cam_gap, group_gap = [*cam, [float("nan")]], [*group, [50.0, 50.0]]
    assert W.paired_quotient(group_gap, cam_gap) == pytest.approx(3.0)
    assert W.geometric_mean_ci(group_gap, cam_gap) == pytest.approx((3.0, 3.0))
    # unpaired, the extra image would have raised the group's mean alone
    assert W.geometric_mean([v for g in group_gap for v in g]) / W.geometric_mean([c[0] for c in cam]) > 3.1
    assert W.paired(group_gap, cam_gap) == (group, cam)
    with pytest.raises(ValueError, match="same images"):
        W.paired_quotient([[2.0]], [])
