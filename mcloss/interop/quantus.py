"""mcloss maps for Quantus: an ``explain_func`` that Quantus's metrics call, so that its localisation,
randomisation (MPRT, eMPRT) and faithfulness metrics run on channel-group maps.

    import quantus
    from mcloss.interop.quantus import explain_func

    quantus.PointingGame()(model=model, x_batch=x, y_batch=y, s_batch=masks, explain_func=explain_func,
                           explain_func_kwargs={"kind": "ccmp"})

The maps are brought to the input's size as ``mcloss parts`` brings them to the image (bilinear, cell centres on
pixel centres: :func:`mcloss.explainability.geometry.to_original`), so a metric that both compute gives the same
number on the same images and masks, when the model's transform is a plain resize to the input size (Quantus
scores on the input grid; ``mcloss parts`` on the original image, which a crop or an aspect change makes differ). Quantus itself is not imported here: install it to call its metrics
(``pip install --no-deps quantus``; see the README).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mcloss.core.errors import ParameterError
from mcloss.core.model import MCModel
from mcloss.explainability.geometry import to_original
from mcloss.interop.captum import ChannelGroupAttribution, input_geometry

__all__ = ["explain_func"]


def explain_func(model: MCModel, inputs: Any, targets: Any, **kwargs: Any) -> np.ndarray:
    """Quantus's explanation function: one map per input, at the input's size.

    Args:
        model: the MCModel Quantus evaluates (for MPRT, its randomized copy).
        inputs: [B, 3, H, W] inputs (numpy or tensor), normalized as the model expects.
        targets: class indices, one per input (or one for all).
        kind: ``ccmp`` (default), ``channel`` (with ``channel``), ``gradcam`` or any single-map kind of
            :class:`~mcloss.interop.captum.ChannelGroupAttribution`.
        channel: the channel of ``kind="channel"`` (0-based within the group).
        device: where to run (default: the model's device).
        method: Grad-CAM's ``"fused"`` (default) or ``"captum"``.

    Returns:
        float32 [B, 1, H, W].
    """
    kind = kwargs.get("kind", "ccmp")
    if kind in ("channels", "channel_gradcam"):
        raise ParameterError(f"kind {kind!r} gives several maps per input; Quantus takes one (use 'channel')", parameter="kind")
    if not isinstance(model, MCModel):
        raise ParameterError(f"model must be an MCModel, got {type(model).__name__}", parameter="model")
    device = torch.device(kwargs["device"]) if kwargs.get("device") else next(model.parameters()).device
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(targets)).reshape(-1).long()
    if y.numel() == 1 and x.shape[0] > 1:
        y = y.expand(x.shape[0])
    attribution = ChannelGroupAttribution(model, method=kwargs.get("method", "fused"))
    maps = attribution.attribute(x.to(device), target=y.tolist(), kind=kind, channel=kwargs.get("channel"))
    height, width = int(x.shape[2]), int(x.shape[3])
    geometry = input_geometry(height, width)
    out = np.zeros((x.shape[0], 1, height, width), np.float32)
    for i, m in enumerate(maps[:, 0].cpu().numpy()):
        out[i, 0] = m if m.shape == (height, width) else to_original(m, geometry)
    return out
