"""Fused Grad-CAM equals Captum; no hook survives a call (even one that raised); train/eval mode and
requires_grad are always restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hooks_left, tiny_model
from PIL import Image

import mcloss
from mcloss import explain
from mcloss.explainability.gradcam import (
    captum_channel_gradcam,
    captum_gradcam,
    captum_guided_gradcam,
    model_guard,
)

ALL_MAPS = ("channels", "gradcam", "channel_gradcam")


def _model(classes: int = 6) -> mcloss.MCModel:
    model = tiny_model(classes)
    # make the FC head's BN statistics non-trivial so gradients differ per class
    with torch.no_grad():
        for m in model.head.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _images(n: int, w: int = 64, h: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def _assert_rel(a: np.ndarray, b: np.ndarray) -> None:
    scale = max(float(np.abs(b).max()), 1e-12)
    assert float(np.abs(a - b).max()) <= 1e-5 * scale, (np.abs(a - b).max(), scale)


def test_fused_equals_captum_batch_with_different_targets():
    model = _model()
    images = _images(3, 80, 60)
    targets = [0, 4, "class_002"]
    fused = explain(model, images, targets, method="fused", maps=ALL_MAPS)
    ref = explain(model, images, targets, method="captum", maps=ALL_MAPS)
    x = torch.stack([model.transform(im) for im in images])
    direct = captum_gradcam(model, x, [0, 4, 2]).numpy()
    per_channel = captum_channel_gradcam(model, x, [0, 4, 2]).numpy()
    for b, (f, r) in enumerate(zip(fused, ref, strict=True)):
        gf, gr = f.groups[0], r.groups[0]
        assert gf.target == gr.target == [0, 4, 2][b]
        assert gr.gradcam.max() > 0  # a real, non-empty reference
        _assert_rel(gf.gradcam, gr.gradcam)
        _assert_rel(gf.gradcam, direct[b])
        _assert_rel(gf.channel_gradcam, gr.channel_gradcam)
        _assert_rel(gf.channel_gradcam, per_channel[b, model.group_slice(gf.target)])
        np.testing.assert_allclose(gf.gradcam_peak_xy, gr.gradcam_peak_xy)
    # different targets give different maps (the target is really used)
    other = explain(model, images[:1], 1, method="fused")[0].groups[0].gradcam
    assert np.abs(other - fused[0].groups[0].gradcam).max() > 1e-4


def test_fused_equals_captum_for_topk_and_matches_logit_gradient():
    model = _model()
    images = _images(2)
    fused = explain(model, images, "top3")
    x = torch.stack([model.transform(im) for im in images])
    for r in range(3):
        targets = [e.groups[r].target for e in fused]
        ref = captum_gradcam(model, x, targets).numpy()
        for b, e in enumerate(fused):
            _assert_rel(e.groups[r].gradcam, ref[b])
    # by hand: ReLU(Σ_k mean(dlogit/dF_k) · F_k) for image 0's best class
    f = model.forward_features(x[:1]).detach().requires_grad_(True)
    t = fused[0].groups[0].target
    (g,) = torch.autograd.grad(model.head_logits(f)[0, t], f)
    want = torch.relu((g.mean((2, 3), keepdim=True) * f).sum(1))[0].detach().numpy()
    _assert_rel(fused[0].groups[0].gradcam, want)


def test_no_parameter_gradients_and_state_restored():
    model = _model()
    model.train()
    model.features[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    for method in ("fused", "captum"):
        maps = ALL_MAPS + (("guided",) if method == "captum" else ())
        explain(model, _images(2), "pred", method=method, maps=maps)
        assert model.training and all(m.training for m in model.modules())
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())
        assert hooks_left(model) == 0


def test_eval_mode_is_used_inside_and_running_stats_untouched():
    model = _model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explain(model, _images(2), "pred", method="fused")
    explain(model, _images(2), "pred", method="captum")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("call", ["captum", "channel", "guided", "explain_captum", "explain_fused"])
def test_hooks_removed_and_state_restored_after_exception(call, monkeypatch):
    model = _model()
    model.train()
    model.head.classifier[1].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.stack([model.transform(im) for im in _images(2)])
    real_forward = model.head.forward

    def exploding(features):
        # the feature-layer hook of Captum has fired by now
        if call.startswith("explain_fused") or model.feature_layer._forward_hooks:
            raise RuntimeError("boom")
        return real_forward(features)

    monkeypatch.setattr(model.head, "forward", exploding)
    with pytest.raises(RuntimeError, match="boom"):
        if call == "captum":
            captum_gradcam(model, x, [0, 1])
        elif call == "channel":
            captum_channel_gradcam(model, x, 0)
        elif call == "guided":
            captum_guided_gradcam(model, x, [1, 0])
        else:
            explain(model, _images(2), "pred", method=call.split("_")[1], maps=("channels", "gradcam", "guided"))
    assert not model.feature_layer._forward_hooks
    assert hooks_left(model) == 0
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_guided_gradcam_shape_and_sign():
    model = _model()
    (e,) = explain(model, _images(1, 72, 48), 3, method="fused", maps=("channels", "gradcam", "guided"))
    g = e.groups[0]
    assert g.guided.shape == (64, 64) and g.guided.dtype == np.float32
    assert (g.guided < 0).any() or (g.guided > 0).any()
    x = model.transform(_images(1, 72, 48)[0])[None]
    np.testing.assert_allclose(g.guided, captum_guided_gradcam(model, x, 3)[0].sum(0).numpy(), rtol=1e-5, atol=1e-7)


def test_model_guard_restores_mode_and_flags_and_leaves_hooks_to_their_owner():
    model = _model()
    model.train()
    model.features[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError), model_guard(model, freeze=True):
        assert not model.training and not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        handle = model.feature_layer.register_forward_hook(lambda *a: None)
        raise ValueError("inside")
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    # the guard does not reach into torch's hook registries; whoever added a hook removes it
    assert hooks_left(model) == 1
    handle.remove()
    assert hooks_left(model) == 0


def test_model_guard_restores_a_mix_of_modes_module_by_module():
    model = _model()  # in eval mode
    model.head.train()  # one part training, the rest not
    modes = [m.training for m in model.modules()]
    with model_guard(model, freeze=True):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == modes and not model.training and model.head.training
    model.eval()
    with model_guard(model):  # nothing to change: nothing changes
        assert not any(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())


def test_no_hook_survives_any_explain_path(random_images):
    model = _model()
    for method in ("fused", "captum"):
        explain(model, random_images(2), "top2", method=method, maps=ALL_MAPS + ("guided",))
        assert hooks_left(model) == 0
