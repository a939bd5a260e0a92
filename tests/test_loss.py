"""MC-Loss against hand-computed values and a transcription of the official op sequence."""

import math

import pytest
import torch
import torch.nn.functional as F

from mcloss.core.groups import default_drop, group_index, normalize_groups, split_channels
from mcloss.core.loss import (
    RECIPE_WEIGHTS,
    MCLoss,
    _selected_mean,
    ccmp,
    draw_channel_mask,
    mutual_channel_loss,
    top_share_mean,
)


def official_transcription(features, targets, xi, mask):
    """The official supervisor() op sequence for equal groups: channels moved last, max_pool2d over (1, ξ)."""

    def channel_maxpool(x):
        b, k, h, w = x.shape
        x = x.view(b, k, h * w).transpose(1, 2)  # [B, HW, K]
        x = F.max_pool2d(x, kernel_size=(1, xi), stride=(1, xi))  # [B, HW, C]
        return x.transpose(1, 2).reshape(b, k // xi, h, w)

    b, k, h, w = features.shape
    branch = torch.softmax(features.reshape(b, k, h * w), 2).reshape(b, k, h, w)
    branch = channel_maxpool(branch).reshape(b, k // xi, h * w)
    loss_2 = 1.0 - torch.mean(torch.sum(branch, 2)) / xi
    branch_1 = channel_maxpool(features * mask.view(1, k, 1, 1))
    branch_1 = F.avg_pool2d(branch_1, kernel_size=(h, w)).view(b, -1)
    loss_1 = F.cross_entropy(branch_1, targets)
    return loss_1, loss_2


def loop_reference(features, targets, sizes, mask):
    """A slow per-class loop, for uneven groups."""
    b = features.shape[0]
    logits, spreads = [], []
    start = 0
    masked = features * mask.view(mask.shape[0] if mask.dim() == 2 else 1, -1, 1, 1)
    soft = torch.softmax(features.flatten(2), 2)
    for size in sizes:
        logits.append(masked[:, start : start + size].amax(1).mean(dim=(1, 2)))
        spreads.append(soft[:, start : start + size].amax(1).sum(1) / size)
        start += size
    dis = F.cross_entropy(torch.stack(logits, 1), targets)
    div = 1.0 - torch.stack(spreads, 1).reshape(b, -1).mean()
    return dis, div


def test_hand_computed_equal_groups():
    # K = 4 (ξ = 2, C = 2), H = 1, W = 2; channel 1 masked out.
    feats = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]], [[3.0, 1.0]], [[1.0, 1.0]]]])
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    dis, div = mutual_channel_loss(feats, torch.tensor([0]), 2, mask=mask)
    # masked CCMP+GAP logits: class 0 = mean(1, 0) = 0.5, class 1 = mean(3, 1) = 2 → CE = log(1 + e^1.5)
    assert dis.item() == pytest.approx(math.log(1 + math.exp(1.5)), abs=1e-6)
    assert dis.item() == pytest.approx(1.701413, abs=1e-6)
    # softmax per channel, CCMP, sum: class 0 = e/(1+e) + e²/(1+e²), class 1 = e²/(1+e²) + 1/2
    e, e2 = math.e, math.exp(2)
    s0 = e / (1 + e) + e2 / (1 + e2)
    s1 = e2 / (1 + e2) + 0.5
    assert div.item() == pytest.approx(1 - (s0 + s1) / 2 / 2, abs=1e-6)
    assert div.item() == pytest.approx(0.251837, abs=1e-6)


def test_hand_computed_uneven_groups():
    # groups [1, 2]: class 0 owns channel 0, class 1 channels 1-2; no channel masked.
    feats = torch.tensor([[[[0.0, 1.0]], [[2.0, 0.0]], [[0.0, 2.0]]]])
    dis, div = mutual_channel_loss(feats, torch.tensor([1]), [1, 2], mask=torch.ones(3))
    # logits: class 0 = 0.5, class 1 = mean(max) = 2 → CE(target 1) = log(1 + e^-1.5)
    assert dis.item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-6)
    # class 0 spread = 1 (ξ=1 → 1/1); class 1 = 2·e²/(1+e²) / 2
    p = math.exp(2) / (1 + math.exp(2))
    assert div.item() == pytest.approx(1 - (1.0 + p) / 2, abs=1e-6)


@pytest.mark.parametrize("shape", [(4, 12, 14, 14), (3, 9, 7, 5), (2, 30, 1, 1)])
def test_matches_official_op_sequence(shape):
    g = torch.Generator().manual_seed(0)
    feats = torch.relu(torch.randn(*shape, generator=g) * 3)
    targets = torch.randint(0, shape[1] // 3, (shape[0],), generator=g)
    mask = draw_channel_mask(3, shape[1], generator=g)
    dis, div = mutual_channel_loss(feats, targets, 3, mask=mask)
    ref_dis, ref_div = official_transcription(feats, targets, 3, mask)
    torch.testing.assert_close(dis, ref_dis, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(div, ref_div, rtol=1e-5, atol=1e-6)


def test_uneven_groups_match_loop_reference_resnet50_split():
    sizes = split_channels(2048, 200)
    assert sizes.count(10) == 152 and sizes.count(11) == 48 and sum(sizes) == 2048
    g = torch.Generator().manual_seed(1)
    feats = torch.relu(torch.randn(2, 2048, 4, 3, generator=g))
    targets = torch.tensor([5, 199])
    mask = draw_channel_mask(sizes, generator=g)
    dis, div = mutual_channel_loss(feats, targets, sizes, mask=mask)
    ref = loop_reference(feats, targets, sizes, mask)
    torch.testing.assert_close(dis, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(div, ref[1], rtol=1e-5, atol=1e-6)


def test_per_sample_mask_and_shared_mask_agree():
    g = torch.Generator().manual_seed(2)
    feats = torch.rand(3, 12, 5, 5, generator=g)
    targets = torch.tensor([0, 1, 3])
    mask = draw_channel_mask(3, 12, generator=g)
    shared = mutual_channel_loss(feats, targets, 3, mask=mask)
    per_sample = mutual_channel_loss(feats, targets, 3, mask=mask.expand(3, 12).clone())
    torch.testing.assert_close(shared, per_sample)
    # and a per-sample mask really applies per sample (matches the loop reference)
    masks = torch.stack([draw_channel_mask(3, 12, generator=g) for _ in range(3)])
    torch.testing.assert_close(
        mutual_channel_loss(feats, targets, 3, mask=masks), loop_reference(feats, targets, [3] * 4, masks)
    )


def test_mask_statistics():
    g = torch.Generator().manual_seed(3)
    masks = torch.stack([draw_channel_mask(3, 600, generator=g) for _ in range(400)])
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert (masks.view(400, 200, 3).sum(-1) == 2).all()  # exactly one of three dropped
    keep_rate = masks.mean(0)
    assert keep_rate.min() > 0.55 and keep_rate.max() < 0.78  # each channel kept ~2/3 of the time
    # position within the group is uniform
    per_pos = masks.view(400, 200, 3).mean((0, 1))
    torch.testing.assert_close(per_pos, torch.full((3,), 2 / 3), atol=0.02, rtol=0)
    uneven = draw_channel_mask([10] * 152 + [11] * 48, generator=g)
    assert uneven[:1520].view(152, 10).sum(-1).eq(6).all()
    assert uneven[1520:].view(48, 11).sum(-1).eq(7).all()
    assert [default_drop(x) for x in (1, 2, 3, 10, 11)] == [0, 1, 1, 4, 4]
    fixed = draw_channel_mask(4, 40, drop=2, generator=g)
    assert fixed.view(10, 4).sum(-1).eq(2).all()
    capped = draw_channel_mask(3, 9, drop=5, generator=g)
    assert capped.view(3, 3).sum(-1).eq(1).all()  # never drops a whole group


def test_mask_is_redrawn_and_reproducible():
    a = draw_channel_mask(3, 60, generator=torch.Generator().manual_seed(7))
    b = draw_channel_mask(3, 60, generator=torch.Generator().manual_seed(7))
    c = draw_channel_mask(3, 60, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradients_are_finite_including_extremes():
    feats = torch.cat([torch.zeros(1, 6, 4, 4), torch.full((1, 6, 4, 4), 80.0)]).requires_grad_(True)
    feats.data[1, 0, 0, 0] = 1000.0
    dis, div = mutual_channel_loss(feats, torch.tensor([0, 1]), 3)
    (dis + div).backward()
    assert torch.isfinite(dis) and torch.isfinite(div)
    assert torch.isfinite(feats.grad).all()
    assert feats.grad.abs().sum() > 0


def test_div_bounds():
    # all channels of a group peaking on the same cell → spread 1 → div = 1 - 1/ξ; disjoint peaks → spread ξ → 0
    same = torch.zeros(1, 3, 2, 2)
    same[0, :, 0, 0] = 50.0
    disjoint = torch.zeros(1, 3, 2, 2)
    disjoint[0, 0, 0, 0] = disjoint[0, 1, 0, 1] = disjoint[0, 2, 1, 0] = 50.0
    _, div_same = mutual_channel_loss(same, torch.tensor([0]), 3, mask=torch.ones(3))
    _, div_disjoint = mutual_channel_loss(disjoint, torch.tensor([0]), 3, mask=torch.ones(3))
    assert div_same.item() == pytest.approx(1 - 1 / 3, abs=1e-6)
    assert div_disjoint.item() == pytest.approx(0.0, abs=1e-6)


def test_ccmp_even_and_uneven():
    x = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    torch.testing.assert_close(ccmp(x, [2, 3]), torch.stack([x[:, :2].amax(1), x[:, 2:].amax(1)], 1))
    y = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(ccmp(y, 3), torch.stack([y[:, :3].amax(1), y[:, 3:].amax(1)], 1))
    assert group_index([1, 3]).tolist() == [[0, 4, 4], [1, 2, 3]]


def test_bad_inputs():
    with pytest.raises(ValueError, match="do not split"):
        mutual_channel_loss(torch.rand(1, 10, 2, 2), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="sum to"):
        normalize_groups([3, 3], 7)
    with pytest.raises(ValueError, match="mask must be"):
        mutual_channel_loss(torch.rand(2, 6, 2, 2), torch.tensor([0, 1]), 3, mask=torch.ones(5))
    with pytest.raises(ValueError, match=r"\[B, K, H, W\]"):
        mutual_channel_loss(torch.rand(6, 2, 2), torch.tensor([0]), 3)


def test_mcloss_combines_with_recipe_weights():
    g = torch.Generator().manual_seed(4)
    feats = torch.rand(2, 9, 3, 3, generator=g)
    logits = torch.randn(2, 3, generator=g)
    targets = torch.tensor([2, 0])
    mask = draw_channel_mask(3, 9, generator=g)
    loss = MCLoss(3, *RECIPE_WEIGHTS["official-scratch"])
    out = loss(logits, feats, targets, mask=mask)
    dis, div = mutual_channel_loss(feats, targets, 3, mask=mask)
    ce = F.cross_entropy(logits, targets)
    torch.testing.assert_close(out.total, ce + 1.5 * dis + 20.0 * div)
    torch.testing.assert_close(out.ce, ce)
    pre = MCLoss(3, *RECIPE_WEIGHTS["official-pretrained"])(logits, feats, targets, mask=mask)
    torch.testing.assert_close(pre.total, ce + 0.0005 * (dis + 10 * div))
    assert RECIPE_WEIGHTS["official-scratch"] == (1.5, 20.0)
    ce_only = MCLoss(3, 0.0, 0.0)(logits, feats, targets, mask=mask)
    torch.testing.assert_close(ce_only.total, ce)


def test_dis_topk_pools_the_largest_share_of_each_class_map():
    # two classes of one channel each, 2 x 2 maps: class 0 = [1, 2, 3, 4], class 1 = [0, 0, 0, 8]
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]])
    target, mask = torch.tensor([0]), torch.ones(2)
    cases = {1.0: math.log1p(math.exp(-0.5)), 0.5: math.log1p(math.exp(0.5)), 0.25: math.log1p(math.exp(4.0))}
    for share, want in cases.items():  # logits (2.5, 2), (3.5, 4), (4, 8): mean, mean of top 2, max
        dis, _ = mutual_channel_loss(features, target, 1, mask=mask, dis_topk=share)
        assert dis.item() == pytest.approx(want, rel=1e-6), share
    default, _ = mutual_channel_loss(features, target, 1, mask=mask)
    assert default.item() == pytest.approx(cases[1.0], rel=1e-6)  # the official spatial mean
    assert top_share_mean(torch.tensor([[1.0, 5.0, 3.0]]), 0.01).item() == 5.0  # at least one position
    with pytest.raises(ValueError, match="share"):
        top_share_mean(torch.ones(1, 4), 0.0)
    loss = MCLoss(1, 1.5, 20.0, dis_topk=0.5)
    out = loss(torch.zeros(1, 2), features, target, mask=mask)
    assert out.dis.item() == pytest.approx(cases[0.5], rel=1e-6) and "dis_topk=0.5" in repr(loss)


def test_top_share_mean_on_the_cpu_equals_topk_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    relu_f = torch.relu(torch.randn(4, 36, 56, 56, generator=gen)).contiguous(memory_format=torch.channels_last)
    cases = [
        relu_f.flatten(2),  # a strided view of post-ReLU F: many exact zeros (ties), as the domain check pools it
        torch.randint(0, 5, (3, 7, 50), generator=gen).float(),  # nothing but ties
        torch.randn(2, 3, 1000, generator=gen, dtype=torch.float64),
        torch.randn(17, generator=gen),  # one row
    ]
    with_nan = torch.randn(64, 3000, generator=gen)
    with_nan[5, 17] = float("nan")  # topk counts NaN as the largest: that row's mean is NaN
    cases.append(with_nan)
    for values in cases:
        rows = values.reshape(-1, values.shape[-1])
        for share in (0.01, 0.07, 0.5, 0.93):
            count = max(1, round(share * values.shape[-1]))
            want = values.topk(count, dim=-1).values.mean(dim=-1)
            got = top_share_mean(values, share)  # the 4-image F and the NaN case are large enough to be timed
            selected = _selected_mean(rows, count).reshape(want.shape)  # whichever way this machine picks
            for out in (got, selected):  # bit for bit, NaN where topk gives NaN
                torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True, msg=f"{values.shape} {share}")
    assert top_share_mean(with_nan, 0.07)[5].isnan() and not top_share_mean(with_nan, 0.07)[4].isnan()
    # with autograd it is torch.topk, whose gradient reaches the largest values only
    x = torch.tensor([[1.0, 5.0, 3.0, 4.0]], requires_grad=True)
    top_share_mean(x, 0.5).sum().backward()
    assert x.grad.tolist() == [[0.0, 0.5, 0.0, 0.5]]
