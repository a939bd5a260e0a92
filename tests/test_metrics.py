"""Part-localization and faithfulness metrics on arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mcloss.metrics import localization as M


def test_image_size_reference_definitions():
    assert M.image_size_reference(300, 400) == 400.0
    assert M.image_size_reference(300, 400, "sqrt-area") == pytest.approx(math.sqrt(120_000))
    assert M.image_size_reference(300, 400, "diagonal") == 500.0
    assert M.hit_radius(300, 400, 0.12) == pytest.approx(48.0)
    assert M.hit_radius(300, 400, 0.1, "diagonal") == pytest.approx(50.0)
    with pytest.raises(ValueError, match="size reference"):
        M.image_size_reference(10, 10, "min")
    with pytest.raises(ValueError, match="radius"):
        M.hit_radius(10, 10, 0.0)


def test_nearest_keypoint_ignores_invisible_parts():
    keypoints = np.array([[10.0, 10.0, 1], [50.0, 50.0, 0], [100.0, 0.0, 1]])
    points = np.array([[49.0, 50.0], [12.0, 10.0], [90.0, 0.0], [np.nan, 3.0]])
    part, dist = M.nearest_keypoints(points, keypoints)
    # (49, 50) sits on the invisible part 1: its nearest VISIBLE one is part 0 at distance √(39² + 40²).
    assert part.tolist() == [0, 0, 2, -1]
    np.testing.assert_allclose(dist[:3], [math.hypot(39, 40), 2.0, 10.0])
    assert dist[3] == np.inf


def test_nearest_keypoint_without_visible_parts_is_none():
    part, dist = M.nearest_keypoints(np.array([[1.0, 1.0]]), np.array([[1.0, 1.0, 0], [2.0, 2.0, 0]]))
    assert part.tolist() == [-1] and dist.tolist() == [np.inf]
    assert not M.hit_mask(dist, 1e9).any()


def test_hits_rate_and_distinct_parts():
    dist = np.array([0.0, 5.0, 5.0000001, np.inf, 4.0])
    hits = M.hit_mask(dist, 5.0)
    assert hits.tolist() == [True, True, False, False, True]  # radius is inclusive
    assert M.hit_rate(hits) == 0.6
    assert math.isnan(M.hit_rate(np.array([], dtype=bool)))
    parts = np.array([2, 2, 1, -1, 0])
    assert M.distinct_parts(parts, hits) == 2  # parts 2 and 0; part 1 was not a hit
    assert M.distinct_parts(parts, np.zeros(5, bool)) == 0
    assert M.distinct_parts(np.array([3, 3, 3]), np.ones(3, bool)) == 1


def test_separated_parts_merge_parts_whose_hit_disks_overlap():
    # head (0, 0), crest (12, 0), beak (23, 0): chained within 2 r = 20 of each other; wing far away at (100, 0)
    kp = np.array([[0.0, 0.0, 1], [12.0, 0.0, 1], [23.0, 0.0, 1], [100.0, 0.0, 1]])
    r = 10.0
    all_hit = np.ones(3, bool)
    assert M.distinct_parts([0, 1, 2], all_hit) == 3
    assert M.separated_parts([0, 1, 2], all_hit, kp, r) == 1  # one location, reached through the crest
    assert M.separated_parts([0, 2, 3], all_hit, kp, r) == 3  # head and beak are 23 apart: without the crest, two
    assert M.separated_parts([0, 1, 3], all_hit, kp, r) == 2
    assert M.separated_parts([0, 3, 3], all_hit, kp, r) == 2
    assert M.separated_parts([0, 1, 3], np.array([True, False, False]), kp, r) == 1  # misses do not count
    assert M.separated_parts([-1, -1, -1], all_hit, kp, r) == 0
    assert M.separated_parts([0, 1, 2], all_hit, kp, 5.0) == 3  # 2 r = 10 < 11, 12: every part on its own
    assert M.separated_parts([1, 2], np.ones(2, bool), kp, 5.5) == 2  # 11 apart, 2 r = 11: disks only touch
    assert M.separated_parts([1, 2], np.ones(2, bool), kp, 5.51) == 1


def test_topk_mask_counts_ties_and_ignores_zeros():
    values = np.arange(20, dtype=np.float32).reshape(4, 5)  # 0 … 19
    mask = M.topk_mask(values, 10)  # k = 2 → {18, 19}
    assert np.flatnonzero(mask).tolist() == [18, 19]
    assert M.topk_mask(values, 12).sum() == 3  # ceil(2.4) = 3
    tied = np.array([[5.0, 5.0], [5.0, 1.0]])
    assert M.topk_mask(tied, 25).sum() == 3  # the three tied maxima are all kept
    assert not M.topk_mask(np.zeros((3, 3)), 50).any()  # a dead map sees nothing
    with pytest.raises(ValueError):
        M.topk_mask(values, 0)


def test_overlap_of_known_masks_is_exact_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    c = np.zeros((4, 4), bool)
    a[0, :4] = True  # 4 pixels
    b[0, 2:4] = True
    b[1, 0:2] = True  # 4 pixels, 2 shared with a
    c[3, 3] = True  # disjoint from both
    assert M.mask_iou(a, b) == pytest.approx(2 / 6)
    assert M.mask_iou(a, a) == 1.0
    assert M.mask_iou(a, c) == 0.0
    assert math.isnan(M.mask_iou(np.zeros((2, 2)), np.zeros((2, 2))))
    assert M.mean_pairwise_iou(np.stack([a, b, c])) == pytest.approx((2 / 6 + 0 + 0) / 3)
    # a pair of empty masks is left out of the mean
    empty = np.zeros((4, 4), bool)
    assert M.mean_pairwise_iou(np.stack([a, a, empty, empty])) == pytest.approx((1 + 0 + 0 + 0 + 0) / 5)
    assert math.isnan(M.mean_pairwise_iou(np.stack([a])))


def test_overlap_from_maps_via_topk():
    maps = np.zeros((3, 10, 10), np.float32)
    maps[0, 0, :] = np.arange(1, 11)  # top 10 % = 10 pixels = the whole first row
    maps[1, 0, :5] = 9.0
    maps[1, 9, :5] = 8.0  # 10 pixels: half of row 0, half of row 9
    maps[2] = maps[0]
    masks = np.stack([M.topk_mask(m, 10) for m in maps])
    assert masks.sum(axis=(1, 2)).tolist() == [10, 10, 10]
    assert M.mean_pairwise_iou(masks) == pytest.approx((5 / 15 + 1.0 + 5 / 15) / 3)


def test_channel_part_matrix_and_rows():
    assignments = [np.array([0, 1, 2]), np.array([0, 2, -1]), np.array([1, 2, 2]), np.array([0, 1])]
    matrix = M.channel_part_matrix(assignments, num_parts=4)
    assert matrix.tolist() == [[3, 1, 0, 0], [0, 2, 2, 0], [0, 0, 2, 0]]
    rows = M.normalize_rows(matrix)
    np.testing.assert_allclose(rows, [[0.75, 0.25, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 1, 0]])
    np.testing.assert_allclose(M.normalize_rows(np.zeros((2, 3))), 0.0)
    with pytest.raises(ValueError):
        M.channel_part_matrix([np.array([5])], num_parts=4)
    assert M.part_histogram(np.array([0, 2, 2, -1, 3]), 4).tolist() == [1, 0, 2, 1]


def test_random_points_seeded_and_inside_box():
    a = M.random_points(np.random.default_rng(7), 500, (10, 20, 30, 25))
    b = M.random_points(np.random.default_rng(7), 500, (10, 20, 30, 25))
    c = M.random_points(np.random.default_rng(8), 500, (10, 20, 30, 25))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (500, 2)
    assert (a[:, 0] >= 10).all() and (a[:, 0] < 30).all() and (a[:, 1] >= 20).all() and (a[:, 1] < 25).all()
    assert abs(a[:, 0].mean() - 20) < 1.0 and abs(a[:, 1].mean() - 22.5) < 0.3


def test_random_baseline_hit_rate_matches_geometry():
    # one visible keypoint at the centre of a 100×100 image, radius 10 px: chance = π·10² / 100² ≈ 0.0314
    rng = np.random.default_rng(0)
    pts = M.random_points(rng, 200_000, (0, 0, 100, 100))
    _, dist = M.nearest_keypoints(pts, np.array([[50.0, 50.0, 1]]))
    assert M.hit_rate(M.hit_mask(dist, 10.0)) == pytest.approx(math.pi / 100, abs=0.002)


def test_trapezoid_auc_of_known_curves():
    assert M.trapezoid_auc(np.ones(17)) == 1.0
    assert M.trapezoid_auc(np.zeros(5)) == 0.0
    assert M.trapezoid_auc(np.linspace(1, 0, 11)) == pytest.approx(0.5)
    assert M.trapezoid_auc(np.array([1.0, 0.0, 0.0])) == 0.25
    # f(x) = x² sampled at 0, 0.5, 1: trapezoid gives (0 + 0.25)/4 + (0.25 + 1)/4 = 0.375
    assert M.trapezoid_auc(np.array([0.0, 0.25, 1.0])) == 0.375
    assert M.trapezoid_auc(np.array([0.0, 1.0]), np.array([0.2, 0.6])) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        M.trapezoid_auc(np.array([1.0]))


def test_steps_rank_and_perturbation_masks():
    np.testing.assert_allclose(M.step_fractions(4), [0, 0.25, 0.5, 0.75, 1])
    assert M.step_counts(10, 4).tolist() == [0, 2, 5, 8, 10]  # round half to even: 2.5 → 2, 7.5 → 8
    sal = np.array([[0.1, 0.9], [0.5, 0.3]])
    rank = M.saliency_rank(sal)
    assert rank.tolist() == [[3, 0], [1, 2]]
    masks = M.perturbation_masks(rank, 2)  # 0, 2, 4 pixels
    assert masks.shape == (3, 2, 2)
    assert masks[0].sum() == 0 and masks[2].all()
    assert masks[1].tolist() == [[False, True], [True, False]]
    # ties: a flat map is ordered by the seeded permutation, the same for the same seed
    flat = np.zeros((4, 4))
    r1 = M.saliency_rank(flat, np.random.default_rng(3))
    r2 = M.saliency_rank(flat, np.random.default_rng(3))
    np.testing.assert_array_equal(r1, r2)
    assert sorted(r1.ravel().tolist()) == list(range(16))
    assert r1.ravel().tolist() != list(range(16))
    # ties never outrank a strictly larger value
    mixed = np.zeros((4, 4))
    mixed[2, 1] = 1.0
    assert M.saliency_rank(mixed, np.random.default_rng(0))[2, 1] == 0
