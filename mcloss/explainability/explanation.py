"""Channel maps, CCMP maps, peaks and Grad-CAM of an MCModel, mapped back onto the original image.

One forward pass per batch: ``F = model.forward_features(x)``; the FC head (``model.head_logits``) and
the MC head (``model.mc_logits``: CCMP + GAP) both read F; a class's channel maps are slices of F (no
hooks). The fused Grad-CAM differentiates the FC-head logit of the target class w.r.t. F only, reusing
that same pass. ``method="captum"`` runs Captum's ``LayerGradCam`` instead (the reference).

Targets (per image): ``"pred"`` (FC-head argmax), ``"pred_mc"`` (MC-head argmax), ``"topK"`` (e.g.
``"top3"``: the K most probable FC-head classes, best first), ``"label"`` (needs ``labels``), a 0-based
class index, a class name, or a list of those (several targets for one image). A single spec applies
to every image; a list must hold one spec per image.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from mcloss.core.device import autocast
from mcloss.core.transforms import Geometry
from mcloss.explainability.geometry import channel_peaks, crop_mask, to_original
from mcloss.explainability.gradcam import (
    captum_channel_gradcam,
    captum_gradcam,
    captum_guided_gradcam,
    frozen_parameters,
    fused_gradcam,
    gradcam_from_weights,
    model_guard,
)
from mcloss.explainability.targets import TargetSpec, per_image, resolve_targets

__all__ = [
    "GroupMaps",
    "Explanation",
    "TargetSpec",
    "explain",
    "explain_tensor",
    "preprocess",
    "resolve_targets",
    "channel_peaks",
    "to_original",
    "crop_mask",
]

_TOPK = re.compile(r"^top(\d+)$", re.IGNORECASE)


@dataclass
class GroupMaps:
    """The maps of one target class for one image (raw values, feature resolution unless noted).

    Attributes:
        target: 0-based class index.
        name: class name.
        channels: [ξ, h, w] float32, the class's slice of F.
        ccmp: [h, w] float32, the maximum over the group's channels.
        peaks_feature: [ξ, 2] int (x, y) argmax cell of each channel.
        peaks_xy: [ξ, 2] float (x, y) of those cell centres in original-image pixels.
        peak_values: [ξ] float32.
        gradcam: [h, w] float32 ReLU Grad-CAM of the FC-head logit of ``target``, or None.
        gradcam_peak_xy: [2] float, its argmax cell centre in original pixels, or None.
        channel_gradcam: [ξ, h, w] float32 per-channel ReLU Grad-CAM of the group's channels, or None.
        guided: [H_in, W_in] float32 signed Guided Grad-CAM at input resolution (summed over RGB), or None.
        prob: FC-head probability of ``target``.
        prob_mc: MC-head probability of ``target``.
    """

    target: int
    name: str
    channels: np.ndarray
    ccmp: np.ndarray
    peaks_feature: np.ndarray
    peaks_xy: np.ndarray
    peak_values: np.ndarray
    gradcam: np.ndarray | None = None
    gradcam_peak_xy: np.ndarray | None = None
    channel_gradcam: np.ndarray | None = None
    guided: np.ndarray | None = None
    prob: float = float("nan")
    prob_mc: float = float("nan")


@dataclass
class Explanation:
    """Everything explained about one image.

    Attributes:
        image_size: (width, height) of the original after EXIF orientation.
        geometry: how the original lands on the network input.
        feature_hw: (h, w) of F.
        probs_fc: [C] softmax of the FC head.
        probs_mc: [C] softmax of the MC head (CCMP + GAP).
        groups: one GroupMaps per requested target, in request order.
        label: the true class when known.
    """

    image_size: tuple[int, int]
    geometry: Geometry
    feature_hw: tuple[int, int]
    probs_fc: np.ndarray
    probs_mc: np.ndarray
    groups: list[GroupMaps] = field(default_factory=list)
    label: int | None = None

    @property
    def prediction(self) -> int:
        """FC-head argmax (0-based)."""
        return int(np.argmax(self.probs_fc))

    @property
    def prediction_mc(self) -> int:
        """MC-head argmax (0-based)."""
        return int(np.argmax(self.probs_mc))


# ------------------------------------------------------------------------------------------- explain


def preprocess(model, image: Image.Image) -> tuple[torch.Tensor, Geometry]:
    """The eval transform of ``model`` applied to one RGB image, with its geometry."""
    geo = model.transform.geometry(*image.size)
    return model.transform.apply(image, geo), geo


def explain(
    model,
    images: Sequence[Image.Image],
    targets: TargetSpec | Sequence[TargetSpec] = "pred",
    *,
    labels: Sequence[int | None] | None = None,
    gradcam: bool = True,
    method: str = "fused",
    channel_gradcam: bool = False,
    guided: bool = False,
    device: torch.device | str | None = None,
    amp: bool | None = None,
) -> list[Explanation]:
    """Explain PIL RGB images (EXIF already applied, e.g. by :func:`mcloss.io.load_image`).

    Images whose inputs have the same shape share one forward pass. See :func:`explain_tensor` for the
    arguments.
    """
    images = list(images)
    if not images:
        return []
    prepared = [preprocess(model, img) for img in images]
    batch_targets = per_image(targets, len(images))
    batch_labels = list(labels) if labels is not None else [None] * len(images)
    results: list[Explanation | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, (x, _) in enumerate(prepared):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    for idx in by_shape.values():
        x = torch.stack([prepared[i][0] for i in idx])
        out = explain_tensor(
            model,
            x,
            [prepared[i][1] for i in idx],
            [batch_targets[i] for i in idx],
            labels=[batch_labels[i] for i in idx],
            gradcam=gradcam,
            method=method,
            channel_gradcam=channel_gradcam,
            guided=guided,
            device=device,
            amp=amp,
        )
        for i, e in zip(idx, out, strict=True):
            results[i] = e
    return [r for r in results if r is not None]


def explain_tensor(
    model,
    x: torch.Tensor,
    geometries: Sequence[Geometry],
    targets: TargetSpec | Sequence[TargetSpec] = "pred",
    *,
    labels: Sequence[int | None] | None = None,
    gradcam: bool = True,
    method: str = "fused",
    channel_gradcam: bool = False,
    guided: bool = False,
    device: torch.device | str | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
) -> list[Explanation]:
    """Explain a preprocessed batch with one forward pass.

    Args:
        model: an MCModel (its train/eval mode and ``requires_grad`` flags are restored afterwards).
        x: [B, 3, H, W] normalized inputs.
        geometries: one Geometry per image (from ``model.transform.geometry``).
        targets: see the module docstring.
        labels: true classes, for ``"label"`` targets and ``Explanation.label``.
        gradcam: compute Grad-CAM of the FC-head logit of each target.
        method: ``"fused"`` (gradients w.r.t. F from the same pass) or ``"captum"`` (Captum LayerGradCam).
        channel_gradcam: also per-channel Grad-CAM of the group's channels.
        guided: also Captum Guided Grad-CAM (extra passes; input resolution).
        device: where to run (default: the model's device).
        amp: bf16 autocast (default: on for CUDA).
        channels_last: channels-last memory format (default: on for CUDA).
    """
    if method not in ("fused", "captum"):
        raise ValueError(f"method must be 'fused' or 'captum', got {method!r}")
    batch = x.shape[0]
    if len(geometries) != batch:
        raise ValueError(f"{len(geometries)} geometries for a batch of {batch}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    amp = dev.type == "cuda" if amp is None else amp
    channels_last = dev.type == "cuda" if channels_last is None else channels_last
    x = x.to(dev, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fused = gradcam and method == "fused"

    with model_guard(model), frozen_parameters(model):
        with torch.no_grad(), autocast(dev, enabled=amp):
            feats = model.forward_features(x)
        feats = feats.float().contiguous()
        if fused:
            feats = feats.detach().requires_grad_(True)
        with torch.set_grad_enabled(fused), autocast(dev, enabled=amp):
            logits = model.head_logits(feats)
        logits = logits.float()
        with torch.no_grad():
            probs_fc = torch.softmax(logits, dim=1).cpu().numpy()
            probs_mc = torch.softmax(model.mc_logits(feats.detach()), dim=1).float().cpu().numpy()
        per_image = resolve_targets(model, targets, probs_fc, probs_mc, labels)
        depth = max(len(t) for t in per_image)

        cams: list[torch.Tensor | None] = [None] * depth  # per rank: [B, h, w]
        chan_cams: list[torch.Tensor | None] = [None] * depth  # per rank: [B, K, h, w]
        guided_maps: list[torch.Tensor | None] = [None] * depth
        for r in range(depth):
            # images with fewer targets repeat their last one at deeper ranks (the result is discarded)
            rank_targets = [t[min(r, len(t) - 1)] for t in per_image]
            if fused:
                weights = fused_gradcam(feats, logits, rank_targets, retain_graph=r < depth - 1)
                f = feats.detach()
                cams[r] = gradcam_from_weights(f, weights)
                if channel_gradcam:
                    chan_cams[r] = gradcam_from_weights(f, weights, per_channel=True)
            elif gradcam:
                cams[r] = captum_gradcam(model, x, rank_targets).float()
                if channel_gradcam:
                    chan_cams[r] = captum_channel_gradcam(model, x, rank_targets).float()
            if guided:
                guided_maps[r] = captum_guided_gradcam(model, x, rank_targets).float().sum(dim=1)

    f_np = feats.detach().cpu().numpy()
    cams_np = [None if c is None else c.cpu().numpy() for c in cams]
    chan_np = [None if c is None else c.cpu().numpy() for c in chan_cams]
    guided_np = [None if g is None else g.cpu().numpy() for g in guided_maps]
    feature_hw = (int(f_np.shape[2]), int(f_np.shape[3]))
    label_list = list(labels) if labels is not None else [None] * batch
    results = []
    for b in range(batch):
        geo = geometries[b]
        groups = []
        for r, t in enumerate(per_image[b]):
            sl = model.group_slice(t)
            chans = np.ascontiguousarray(f_np[b, sl], dtype=np.float32)
            peaks, values = channel_peaks(chans)
            gm = GroupMaps(
                target=t,
                name=model.class_names[t],
                channels=chans,
                ccmp=chans.max(axis=0),
                peaks_feature=peaks,
                peaks_xy=geo.feature_to_original(peaks, feature_hw),
                peak_values=values,
                prob=float(probs_fc[b, t]),
                prob_mc=float(probs_mc[b, t]),
            )
            if cams_np[r] is not None:
                gm.gradcam = np.ascontiguousarray(cams_np[r][b], dtype=np.float32)
                gxy, _ = channel_peaks(gm.gradcam[None])
                gm.gradcam_peak_xy = geo.feature_to_original(gxy, feature_hw)[0]
            if chan_np[r] is not None:
                gm.channel_gradcam = np.ascontiguousarray(chan_np[r][b, sl], dtype=np.float32)
            if guided_np[r] is not None:
                gm.guided = np.ascontiguousarray(guided_np[r][b], dtype=np.float32)
            groups.append(gm)
        results.append(
            Explanation(
                image_size=tuple(geo.original),
                geometry=geo,
                feature_hw=feature_hw,
                probs_fc=probs_fc[b],
                probs_mc=probs_mc[b],
                groups=groups,
                label=None if label_list[b] is None else int(label_list[b]),
            )
        )
    return results
