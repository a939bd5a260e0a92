"""mcloss maps in Captum's shape: a layer attribution of the feature layer F, so Captum's tools work on them.

``ChannelGroupAttribution(model).attribute(inputs, target=..., kind="ccmp")`` returns what a Captum layer
attribution of ``model.feature_layer`` returns, a float tensor ``[B, C, h, w]`` on the inputs' device: C = 1 for one
map per image (``ccmp``, ``gradcam``, one channel), C = ξ for a group's channels. ``LayerAttribution.interpolate``
brings them to the input size and ``captum.attr.visualization`` draws them. The maps are mcloss's, from its one
forward pass (:func:`mcloss.explainability.explanation.explain_tensor`), not recomputed by Captum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from captum.attr import LayerAttribution

from mcloss.core.errors import ParameterError
from mcloss.core.model import MCModel
from mcloss.core.transforms import Geometry
from mcloss.explainability import kinds
from mcloss.explainability.explanation import GroupMaps, explain_tensor

__all__ = ["ChannelGroupAttribution", "KINDS", "input_geometry"]

#: The kinds besides the map table's: the group's maximum over channels, and one channel of the group.
KINDS = ("ccmp", "channel")


def input_geometry(height: int, width: int) -> Geometry:
    """The geometry of an input tensor taken as the image itself (no resize, no crop)."""
    return Geometry((width, height), (width, height), (0, 0, width, height))


class ChannelGroupAttribution(LayerAttribution):
    """Channel-group maps of an MCModel as a Captum layer attribution of its feature layer F.

    Args:
        model: an MCModel (its mode and ``requires_grad`` flags are restored after each call).
        method: Grad-CAM's ``"fused"`` or ``"captum"`` path, for kinds that need gradients.
    """

    def __init__(self, model: MCModel, method: str = "fused") -> None:
        super().__init__(model, model.feature_layer)
        self.model = model
        self.method = method

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def attribute(
        self,
        inputs: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        kind: str = "ccmp",
        channel: int | None = None,
    ) -> torch.Tensor:
        """The ``kind`` map of ``target``'s channel group for each input.

        Args:
            inputs: [B, 3, H, W] inputs, normalized as the model expects.
            target: a class index for every input, one per input (list or tensor), or None for the FC head's
                prediction.
            kind: ``ccmp`` (the group's maximum over channels), ``channels`` (each of the group's channels),
                ``channel`` (one of them, ``channel`` 0-based), or any map kind (``gradcam``,
                ``channel_gradcam``, ``guided`` at the input's resolution, or a registered one).
            channel: the channel of ``kind="channel"`` within the group.

        Returns:
            float32 [B, 1, h, w] for one map per input, [B, ξ, h, w] for per-channel kinds (a class with fewer
            channels than the largest group is padded with zero maps), [B, 1, H, W] for input-resolution kinds.
        """
        if inputs.dim() != 4:
            raise ParameterError(f"inputs must be [B, 3, H, W], got shape {tuple(inputs.shape)}", parameter="inputs")
        name = _table_kind(kind, channel)
        batch, _, height, width = inputs.shape
        targets = _targets(target, batch)
        geos = [input_geometry(int(height), int(width))] * batch
        exps = explain_tensor(self.model, inputs, geos, targets, maps=(name,), method=self.method)
        maps = [_one(e.groups[0], kind, channel) for e in exps]
        return torch.from_numpy(_stack(maps)).to(inputs.device)


def _table_kind(kind: str, channel: int | None) -> str:
    """The map-table kind that ``kind`` is read from."""
    if kind in ("ccmp", "channel", "channels"):
        if kind == "channel" and channel is None:
            raise ParameterError("kind 'channel' needs channel (0-based, within the group)", parameter="channel")
        return "channels"
    if kind not in kinds.names():
        raise ParameterError(f"kind must be one of {', '.join((*KINDS, *kinds.names()))}, got {kind!r}", parameter="kind")
    return kind


def _targets(target: int | Sequence[int] | torch.Tensor | None, batch: int) -> str | list[int]:
    if target is None:
        return "pred"
    if isinstance(target, torch.Tensor):
        target = target.reshape(-1).tolist()
    if isinstance(target, int | np.integer):
        return [int(target)] * batch
    values = [int(t) for t in target]
    if len(values) != batch:
        raise ParameterError(f"target: {len(values)} classes for a batch of {batch}", parameter="target")
    return values


def _one(group: GroupMaps, kind: str, channel: int | None) -> np.ndarray:
    """[C, h, w] of one input."""
    if kind == "ccmp":
        return group.ccmp[None]
    if kind == "channel":
        if not 0 <= int(channel) < len(group.channels):
            raise ParameterError(f"channel {channel} outside the group's {len(group.channels)}", parameter="channel")
        return group.channels[int(channel)][None]
    values = group.channels if kind == "channels" else group.maps[kind]
    return values if values.ndim == 3 else values[None]


def _stack(maps: list[np.ndarray]) -> np.ndarray:
    depth = max(m.shape[0] for m in maps)
    out = np.zeros((len(maps), depth, *maps[0].shape[1:]), np.float32)
    for i, m in enumerate(maps):
        out[i, : m.shape[0]] = m
    return out
