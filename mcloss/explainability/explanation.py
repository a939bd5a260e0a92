"""Explanations of an MCModel: channel maps, CCMP maps, peaks and Grad-CAM, from one forward pass.

``F = model.forward_features(x)`` once per batch; the FC head (``model.head_logits``) and the MC head
(``model.mc_logits``: CCMP, then the pool L_dis was trained with) both read F; a class's channel maps are slices of F (no hooks). The
fused Grad-CAM differentiates the FC-head logit of the target class w.r.t. F only, reusing that same
pass. ``method="captum"`` runs Captum's ``LayerGradCam`` instead (the reference).

Which maps (``maps=``, the CLI's ``--maps``): ``channels`` (always; the F slices, free), ``gradcam``,
``channel_gradcam`` (per-channel Grad-CAM of the group's channels), ``guided`` (Captum Guided Grad-CAM;
extra passes). Which classes: see :mod:`mcloss.explainability.targets`.

An :class:`Explanation` carries the class names, the geometry and a view of the image, so it can draw
(:meth:`Explanation.overlay`, :meth:`Explanation.montage`) and save itself (:meth:`Explanation.save`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from mcloss.core.device import autocast
from mcloss.core.transforms import Geometry
from mcloss.data.io import load_image
from mcloss.explainability import render
from mcloss.explainability.geometry import channel_peaks
from mcloss.explainability.gradcam import (
    captum_channel_gradcam,
    captum_gradcam,
    captum_guided_gradcam,
    fused_gradcam,
    gradcam_from_weights,
    model_guard,
)
from mcloss.explainability.targets import TargetSpec, per_image, resolve_targets

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mcloss.explainability.defining import DefiningSummary
    from mcloss.explainability.outputs import Comparison

__all__ = [
    "DEFAULT_MAPS",
    "MAP_KINDS",
    "Explanation",
    "GroupMaps",
    "PreparedImage",
    "explain",
    "explain_tensor",
    "parse_maps",
    "prepare",
]

#: The maps an explanation can hold (the CLI's ``--maps`` vocabulary).
MAP_KINDS = ("channels", "gradcam", "channel_gradcam", "guided")
DEFAULT_MAPS = ("channels", "gradcam")


def parse_maps(maps: str | Sequence[str]) -> tuple[str, ...]:
    """``"channels,gradcam"`` or a sequence of kinds → a tuple of known kinds (``channels`` always first).

    Raises:
        ValueError: an unknown kind (the message lists the known ones).
    """
    items = maps.split(",") if isinstance(maps, str) else list(maps)
    kinds = [str(m).strip() for m in items if str(m).strip()]
    unknown = sorted(set(kinds) - set(MAP_KINDS))
    if unknown:
        raise ValueError(f"--maps: unknown {', '.join(unknown)} (choose from {', '.join(MAP_KINDS)})")
    return tuple(k for k in MAP_KINDS if k == "channels" or k in kinds)


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
        probs_mc: [C] softmax of the MC head (CCMP, then the pool of ``model.mc_pool_share``).
        groups: one GroupMaps per requested target, in request order (rank 1 first).
        label: the true class when known.
        class_names: the model's class names (0-based).
        source: the file the image came from, when known.
        view: an RGB uint8 view of the original (any size, same aspect ratio) that the drawing methods
            use unless given another; None when the explanation was made from tensors only.
    """

    image_size: tuple[int, int]
    geometry: Geometry
    feature_hw: tuple[int, int]
    probs_fc: np.ndarray
    probs_mc: np.ndarray
    groups: list[GroupMaps] = field(default_factory=list)
    label: int | None = None
    class_names: tuple[str, ...] = ()
    source: str | None = None
    view: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def prediction(self) -> int:
        """FC-head argmax (0-based)."""
        return int(np.argmax(self.probs_fc))

    @property
    def prediction_mc(self) -> int:
        """MC-head argmax (0-based)."""
        return int(np.argmax(self.probs_mc))

    def class_name(self, index: int) -> str:
        """The name of class ``index`` (its number when the names are unknown)."""
        return self.class_names[index] if index < len(self.class_names) else str(index)

    def with_groups(self, groups: Sequence[GroupMaps], **changes: Any) -> Explanation:
        """A copy holding only ``groups`` (e.g. the classes a user picked), with other fields changed."""
        return dataclasses.replace(self, groups=list(groups), **changes)

    def _view(self, image: np.ndarray | Image.Image | None) -> np.ndarray:
        if image is not None:
            return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if self.view is None:
            raise ValueError("this explanation holds no view of its image; pass image=")
        return self.view

    def tiles(
        self, group: int = 0, style: render.Style | None = None, *, image: np.ndarray | Image.Image | None = None
    ) -> list[render.Tile]:
        """The tiles of one target (rank ``group``): ξ channels, CCMP, parts, Grad-CAM, Guided Grad-CAM.

        Drawn at the size of the view (or of ``image``); see :func:`mcloss.explainability.render.group_tiles`.
        """
        return render.group_tiles(self._view(image), self, self.groups[group], style or render.Style())

    def overlay(
        self,
        kind: str = "ccmp",
        *,
        group: int = 0,
        channel: int = 0,
        style: render.Style | None = None,
        image: np.ndarray | Image.Image | None = None,
    ) -> np.ndarray:
        """One map over the image, RGB uint8 at the size of the view (or of ``image``).

        Args:
            kind: ``"channel"``, ``"ccmp"``, ``"gradcam"``, ``"channel_gradcam"`` or ``"guided"``.
            group: rank of the target.
            channel: channel within the group (for ``channel`` and ``channel_gradcam``).
            style: display settings (default :class:`~mcloss.explainability.render.Style`).
            image: another view of the original to draw on.
        """
        return render.map_overlay(self._view(image), self, self.groups[group], kind, channel, style or render.Style())

    def montage(
        self, group: int = 0, style: render.Style | None = None, *, image: np.ndarray | Image.Image | None = None
    ) -> np.ndarray:
        """One RGB uint8 picture of a target: a header over original | channels | CCMP | parts | Grad-CAM."""
        return render.explanation_montage(self._view(image), self, group, style or render.Style())

    def figure(
        self,
        group: int = 0,
        style: render.Style | None = None,
        *,
        image: np.ndarray | Image.Image | None = None,
        dpi: int = 100,
    ) -> Figure:
        """The montage as a matplotlib Figure (for reports; no pyplot state is touched)."""
        return render.explanation_figure(self._view(image), self, group, style or render.Style(), dpi=dpi)

    def record(self, topk: int = 5, name: str | None = None, *, defining: Sequence[DefiningSummary | None] | None = None) -> dict:
        """The JSON record that :meth:`save` writes (schema in :mod:`mcloss.explainability.outputs`).

        ``name`` is the output stem's file name (what :meth:`save` gets); default the source's file name.
        ``defining``: one defining-part summary (or None) per target
        (:func:`mcloss.explainability.defining.defining_summaries`).
        """
        from mcloss.explainability.outputs import explanation_record

        return explanation_record(self, topk, name, defining)

    def save(
        self,
        path: str | os.PathLike,
        style: render.Style | None = None,
        *,
        topk: int = 5,
        image: np.ndarray | Image.Image | None = None,
        defining: Sequence[DefiningSummary | None] | None = None,
        options: dict | None = None,
        compare: Comparison | None = None,
        clean_temps: bool = True,
        montage: bool = True,
    ) -> dict:
        """Write ``<path>.png`` (one montage per target), ``<path>.npz`` (raw maps) and, last, ``<path>.json``.

        ``path`` is a stem: ``out/bird.jpg`` writes ``out/bird.jpg.png`` etc., as ``mcloss export`` does.
        Every file is written atomically. ``defining`` as for :meth:`record`; ``options`` (the settings
        that made the outputs) goes into the json as ``options``; ``compare`` adds a second model
        (:class:`mcloss.explainability.outputs.Comparison`); ``clean_temps=False`` skips removing the temps a
        killed run left for these outputs (an export sweeps each folder once); ``montage=False`` writes no
        PNG (no view is needed then). Returns the JSON record.
        """
        from mcloss.explainability.outputs import write_explanation

        style = style or render.Style()
        view = self._view(image) if montage else None
        return write_explanation(self, Path(path), view, style, topk, defining, options, compare, clean_temps, montage)


# ------------------------------------------------------------------------------------------- explain


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the network.

    Attributes:
        x: [3, H, W] the eval transform's output.
        geometry: how the original lands on ``x``.
        view: RGB uint8 view of the original for drawing (any size, same aspect ratio), or None.
        source: the file it came from, or None.
    """

    x: torch.Tensor
    geometry: Geometry
    view: np.ndarray | None = None
    source: str | None = None


ImageInput = Image.Image | str | os.PathLike | PreparedImage
_IMAGE_TYPES = (Image.Image, str, os.PathLike, PreparedImage)


def prepare(
    model,
    image: Image.Image | str | os.PathLike,
    *,
    view: str | None = "fit",
    view_size: int = render.VIEW_MAX_SIDE,
) -> PreparedImage:
    """Apply the eval transform to a PIL RGB image or an image file (decoded by
    :func:`mcloss.data.io.load_image`: EXIF-rotated, safe against broken files).

    Args:
        model: an MCModel, or its :class:`~mcloss.core.transforms.EvalTransform` (what DataLoader workers get).
        image: the image, or its path.
        view: the view kept for drawing: ``"fit"`` (long side at most ``view_size``), ``"height"``
            (a montage thumbnail of ``view_size`` rows, see :func:`mcloss.explainability.render.thumbnail`), or None (no view).
        view_size: pixels of that side.
    """
    transform = getattr(model, "transform", model)
    source = None
    if not isinstance(image, Image.Image):
        source = os.fspath(image)
        image = load_image(image)
    geo = transform.geometry(*image.size)
    x = transform.apply(image, geo)
    kept = None
    if view == "fit":
        kept = render.fit_view(np.asarray(image), view_size)
    elif view == "height":
        kept = render.thumbnail(np.asarray(image), view_size)[0]
    elif view is not None:
        raise ValueError(f"view must be 'fit', 'height' or None, got {view!r}")
    return PreparedImage(x, geo, kept, source)


def _as_items(images: Any) -> tuple[bool, list]:
    """(single, items): one image (PIL, path or PreparedImage) or any iterable of them."""
    if isinstance(images, _IMAGE_TYPES):
        return True, [images]
    try:
        items = list(images)
    except TypeError:
        raise TypeError(f"images must be a PIL image, a path, a PreparedImage or a list of them, not {type(images).__name__}") from None
    bad = [type(it).__name__ for it in items if not isinstance(it, _IMAGE_TYPES)]
    if bad:
        raise TypeError(f"images must be PIL images, paths or PreparedImages, got {bad[0]}")
    return False, items


def explain(
    model,
    images: ImageInput | Sequence[ImageInput],
    targets: TargetSpec | Sequence[TargetSpec] = "pred",
    *,
    maps: str | Sequence[str] = DEFAULT_MAPS,
    labels: Sequence[int | None] | None = None,
    method: str = "fused",
    device: torch.device | str | None = None,
    amp: bool | None = None,
    batch_size: int | None = None,
) -> Explanation | list[Explanation]:
    """Explain one image or a list of them.

    Args:
        model: an MCModel.
        images: a PIL RGB image (EXIF applied), an image path, a :class:`PreparedImage`, or a list of them.
        targets: one spec for every image, or one per image (:mod:`mcloss.explainability.targets`); for a
            single image, a list of specs asks for several targets.
        maps: which maps, e.g. ``("channels", "gradcam")`` or ``"channels,gradcam,guided"``.
        labels: true classes (one per image, or one int for a single image), for ``"label"`` targets and
            ``Explanation.label``.
        method: ``"fused"`` or ``"captum"`` Grad-CAM.
        device: where to run (default: the model's device).
        amp: bf16 autocast (default: on for CUDA).
        batch_size: most images per forward pass (default: all images of one input shape at once). Every
            image is decoded first; for long lists, call once per chunk.

    Returns:
        An Explanation for a single image, else a list in input order. Images whose inputs have the same
        shape share forward passes.
    """
    single, items = _as_items(images)
    scalar = (str, int, np.integer)
    if single and not isinstance(targets, scalar) and all(isinstance(s, scalar) for s in targets):
        targets = [list(targets)]  # several targets for the one image
    if single and labels is not None and not isinstance(labels, (list, tuple)):
        labels = [labels]
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kinds = parse_maps(maps)
    prepared = [it if isinstance(it, PreparedImage) else prepare(model, it) for it in items]
    batch_targets = per_image(targets, len(items))
    batch_labels = list(labels) if labels is not None else [None] * len(items)
    if len(batch_labels) != len(items):
        raise ValueError(f"{len(batch_labels)} labels for {len(items)} images")
    results: list = [None] * len(items)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(prepared):
        by_shape.setdefault(tuple(item.x.shape), []).append(i)
    step = batch_size or len(items) or 1
    for same_shape in by_shape.values():
        for start in range(0, len(same_shape), step):
            idx = same_shape[start : start + step]
            out = explain_tensor(
                model,
                torch.stack([prepared[i].x for i in idx]),
                [prepared[i].geometry for i in idx],
                [batch_targets[i] for i in idx],
                labels=[batch_labels[i] for i in idx],
                maps=kinds,
                method=method,
                device=device,
                amp=amp,
            )
            for i, e in zip(idx, out, strict=True):
                e.view, e.source = prepared[i].view, prepared[i].source
                results[i] = e
    return results[0] if single else results


def explain_tensor(
    model,
    x: torch.Tensor,
    geometries: Sequence[Geometry],
    targets: TargetSpec | Sequence[TargetSpec] = "pred",
    *,
    labels: Sequence[int | None] | None = None,
    maps: str | Sequence[str] = DEFAULT_MAPS,
    method: str = "fused",
    device: torch.device | str | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
) -> list[Explanation]:
    """Explain a preprocessed batch with one forward pass.

    Args:
        model: an MCModel (its train/eval mode and ``requires_grad`` flags are restored afterwards).
        x: [B, 3, H, W] normalized inputs.
        geometries: one Geometry per image (from ``model.transform.geometry``).
        targets: see :mod:`mcloss.explainability.targets`.
        labels: true classes, for ``"label"`` targets and ``Explanation.label``.
        maps: which maps (see :func:`explain`).
        method: ``"fused"`` (gradients w.r.t. F from the same pass) or ``"captum"`` (Captum LayerGradCam).
        device: where to run (default: the model's device).
        amp: bf16 autocast (default: on for CUDA).
        channels_last: channels-last memory format (default: on for CUDA).

    Returns:
        One Explanation per image (without a view; :func:`explain` adds it).
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
    kinds = parse_maps(maps)
    gradcam, channel_gradcam, guided = ("gradcam" in kinds), ("channel_gradcam" in kinds), ("guided" in kinds)
    fused = (gradcam or channel_gradcam) and method == "fused"

    with model_guard(model, freeze=True):
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
                if gradcam:
                    cams[r] = gradcam_from_weights(f, weights)
                if channel_gradcam:
                    chan_cams[r] = gradcam_from_weights(f, weights, per_channel=True)
            elif gradcam or channel_gradcam:
                if gradcam:
                    cams[r] = captum_gradcam(model, x, rank_targets).float()
                if channel_gradcam:
                    chan_cams[r] = captum_channel_gradcam(model, x, rank_targets).float()
            if guided:
                guided_maps[r] = captum_guided_gradcam(model, x, rank_targets).float().sum(dim=1)

    f = feats.detach()
    picked = [(b, r, model.group_slice(t)) for b in range(batch) for r, t in enumerate(per_image[b])]
    group_np = _target_groups([f] * depth, picked)
    chan_np = _target_groups(chan_cams, picked) if channel_gradcam else {}
    cams_np = [None if c is None else c.cpu().numpy() for c in cams]
    guided_np = [None if g is None else g.cpu().numpy() for g in guided_maps]
    feature_hw = (int(f.shape[2]), int(f.shape[3]))
    label_list = list(labels) if labels is not None else [None] * batch
    results = []
    for b in range(batch):
        geo = geometries[b]
        groups = []
        for r, t in enumerate(per_image[b]):
            chans = np.ascontiguousarray(group_np[b, r], dtype=np.float32)
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
            if (b, r) in chan_np:
                gm.channel_gradcam = np.ascontiguousarray(chan_np[b, r], dtype=np.float32)
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
                class_names=tuple(model.class_names),
            )
        )
    return results


def _target_groups(maps: Sequence[torch.Tensor], picked: list[tuple[int, int, slice]]) -> dict:
    """{(image, rank): that target's group of ``maps[rank]`` [B, K, h, w] as numpy}: only the target groups
    leave the device, in one copy; all of [B, K, h, w] would be K / ξ times more."""
    flat = torch.cat([maps[r][b, sl] for b, r, sl in picked]).cpu().numpy()
    sizes = np.cumsum([sl.stop - sl.start for _, _, sl in picked])[:-1]
    return dict(zip(((b, r) for b, r, _ in picked), np.split(flat, sizes), strict=True))
