"""Grad-CAM for MCModel: Captum as the reference, plus a fused path that reuses the prediction pass.

Every Grad-CAM here explains the **FC-head logit** of the target class (``model.forward`` returns the FC
head's logits, which is what Captum sees), taken at ``model.feature_layer`` (F), with ReLU
(``relu_attributions=True``). Maps stay at feature resolution; :func:`mcloss.explainability.geometry.to_original` upsamples
them bilinearly onto the original image.

Hooks exist only inside Captum calls, which remove them in their own ``finally``. Each call runs under
:func:`model_guard`, which restores the model's train/eval mode and its parameters' ``requires_grad`` flags.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from mcloss.core.errors import ParameterError
from mcloss.core.model import model_guard

__all__ = [
    "GRADCAM_METHODS",
    "model_guard",
    "fused_gradcam",
    "gradcam_from_weights",
    "captum_gradcam",
    "captum_channel_gradcam",
    "captum_guided_gradcam",
]

#: The Grad-CAM implementations: gradients w.r.t. F from the prediction pass, or Captum's LayerGradCam.
GRADCAM_METHODS = ("fused", "captum")


def gradcam_from_weights(features: torch.Tensor, weights: torch.Tensor, *, per_channel: bool = False) -> torch.Tensor:
    """ReLU Grad-CAM from F [B, K, h, w] and channel weights [B, K] (the spatial mean of dScore/dF).

    Returns [B, h, w] (summed over channels), or [B, K, h, w] with ``per_channel``.
    """
    scaled = weights[:, :, None, None] * features
    if per_channel:
        return torch.relu(scaled)
    return torch.relu(scaled.sum(dim=1))

def fused_gradcam(
    features: torch.Tensor, logits: torch.Tensor, targets: Sequence[int], *, retain_graph: bool = False
) -> torch.Tensor:
    """Grad-CAM channel weights from an existing forward pass, with gradients w.r.t. F only.

    Args:
        features: F [B, K, h, w], a tensor that requires grad and produced ``logits``.
        logits: FC-head logits [B, C] computed from ``features``.
        targets: one class index per image; the score is the FC-head logit of that class.
        retain_graph: keep the graph for another call (several targets per image).

    Returns:
        weights [B, K] (float32): the spatial mean of d logit[b, target_b] / dF[b]. Feed them to
        :func:`gradcam_from_weights` with F to get the map; samples are independent (eval-mode BN).
    """
    index = torch.as_tensor(list(targets), dtype=torch.long, device=logits.device)
    if index.shape[0] != logits.shape[0]:
        raise ParameterError(f"targets: {index.shape[0]} targets for a batch of {logits.shape[0]}", parameter="targets")
    score = logits.gather(1, index[:, None]).sum()
    (grad,) = torch.autograd.grad(score, features, retain_graph=retain_graph)
    return grad.float().mean(dim=(2, 3))


def _target_list(targets: int | Sequence[int], batch: int) -> list[int]:
    if isinstance(targets, int):
        return [targets] * batch
    out = [int(t) for t in targets]
    if len(out) != batch:
        raise ParameterError(f"targets: {len(out)} targets for a batch of {batch}", parameter="targets")
    return out


def captum_gradcam(model: nn.Module, x: torch.Tensor, targets: int | Sequence[int]) -> torch.Tensor:
    """Captum ``LayerGradCam`` on ``model.feature_layer`` for the FC-head logit of each target: [B, h, w].

    ReLU is applied (``relu_attributions=True``); the result stays at feature resolution.
    """
    from captum.attr import LayerGradCam

    with model_guard(model):
        cam = LayerGradCam(model, model.feature_layer).attribute(
            x, target=_target_list(targets, x.shape[0]), relu_attributions=True
        )
    return cam[:, 0].detach()


def captum_channel_gradcam(
    model: nn.Module, x: torch.Tensor, targets: int | Sequence[int], channels: slice | None = None
) -> torch.Tensor:
    """Captum per-channel Grad-CAM (``attr_dim_summation=False``, ReLU): [B, K, h, w], or [B, ξ, h, w]
    restricted to ``channels`` (e.g. ``model.group_slice(target)``)."""
    from captum.attr import LayerGradCam

    with model_guard(model):
        cam = LayerGradCam(model, model.feature_layer).attribute(
            x, target=_target_list(targets, x.shape[0]), relu_attributions=True, attr_dim_summation=False
        )
    cam = cam.detach()
    return cam if channels is None else cam[:, channels]


def captum_guided_gradcam(model: nn.Module, x: torch.Tensor, targets: int | Sequence[int]) -> torch.Tensor:
    """Captum ``GuidedGradCam`` (guided backprop × Grad-CAM) for the FC-head logit: signed [B, 3, H, W]
    at input resolution."""
    from captum.attr import GuidedGradCam

    with model_guard(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        inputs = x.detach().clone().requires_grad_(True)
        attr = GuidedGradCam(model, model.feature_layer).attribute(
            inputs, target=_target_list(targets, x.shape[0]), interpolate_mode="bilinear"
        )
    return attr.detach()
