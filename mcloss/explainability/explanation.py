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
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from mcloss.core.device import autocast
from mcloss.core.domain import DomainVerdict
from mcloss.core.errors import OutputError, ParameterError
from mcloss.core.model import model_guard
from mcloss.core.transforms import Geometry, features_to_original
from mcloss.data.inputs import PreparedImage, ViewMaker, prepare_image
from mcloss.data.io import DEFAULT_QUALITY
from mcloss.explainability import kinds, render
from mcloss.explainability.contrast import Contrast, ContrastSpec, check_contrast, resolve_contrasts
from mcloss.explainability.geometry import channel_peaks
from mcloss.explainability.gradcam import GRADCAM_METHODS
from mcloss.explainability.kinds import ExplainPass, parse_maps
from mcloss.explainability.targets import TargetSpec, per_image, resolve_targets, spec_error

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mcloss.core.model import MCModel
    from mcloss.core.transforms import EvalTransform
    from mcloss.explainability.defining import DefiningSummary
    from mcloss.explainability.kinds import MapKind
    from mcloss.explainability.outputs import Comparison

__all__ = [
    "Explanation",
    "GroupMaps",
    "PreparedImage",
    "explain",
    "explain_tensor",
    "parse_maps",
    "prepare",
    "view_maker",
]

@dataclass(init=False)
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
        maps: the other computed kinds' maps by kind name (:mod:`mcloss.explainability.kinds`). Each is also
            an attribute (None when not computed; assigning one sets or, with None, removes it, and the
            constructor takes them as keywords): ``gradcam`` [h, w] float32 ReLU Grad-CAM of the FC-head
            logit of ``target``; ``channel_gradcam`` [ξ, h, w] float32 per-channel ReLU Grad-CAM of the
            group's channels; ``guided`` [H_in, W_in] float32 signed Guided Grad-CAM at input resolution
            (summed over RGB).
        map_peaks: [2] (x, y) in original pixels of the argmax cell of each computed kind that keeps a peak;
            also the attribute ``<kind>_peak_xy`` (``gradcam_peak_xy``).
        prob: FC-head probability of ``target``.
        prob_mc: MC-head probability of ``target``.
        versus: what the contrastive maps (``finer``, ``contrast``) contrast ``target`` with, or None.
    """

    target: int
    name: str
    channels: np.ndarray
    ccmp: np.ndarray
    peaks_feature: np.ndarray
    peaks_xy: np.ndarray
    peak_values: np.ndarray
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    map_peaks: dict[str, np.ndarray] = field(default_factory=dict)
    prob: float = float("nan")
    prob_mc: float = float("nan")
    versus: Contrast | None = None

    if TYPE_CHECKING:  # the built-in kinds, read and written through maps / map_peaks
        gradcam: np.ndarray | None
        gradcam_peak_xy: np.ndarray | None
        channel_gradcam: np.ndarray | None
        guided: np.ndarray | None
        finer: np.ndarray | None
        finer_peak_xy: np.ndarray | None
        contrast: np.ndarray | None
        contrast_peak_xy: np.ndarray | None

    def __init__(
        self,
        target: int,
        name: str,
        channels: np.ndarray,
        ccmp: np.ndarray,
        peaks_feature: np.ndarray,
        peaks_xy: np.ndarray,
        peak_values: np.ndarray,
        maps: dict[str, np.ndarray] | None = None,
        map_peaks: dict[str, np.ndarray] | None = None,
        prob: float = float("nan"),
        prob_mc: float = float("nan"),
        versus: Contrast | None = None,
        **kind_maps: np.ndarray | None,
    ) -> None:
        self.target, self.name, self.channels, self.ccmp = target, name, channels, ccmp
        self.peaks_feature, self.peaks_xy, self.peak_values = peaks_feature, peaks_xy, peak_values
        self.maps, self.map_peaks = dict(maps or {}), dict(map_peaks or {})  # a copy shares no dict
        self.prob, self.prob_mc, self.versus = prob, prob_mc, versus
        for key, value in kind_maps.items():
            if _kind_slot(key) is None:
                raise TypeError(f"GroupMaps() got an unexpected keyword argument {key!r}")
            setattr(self, key, value)

    def __getattr__(self, name: str) -> Any:  # only when the usual lookup fails
        slot = _kind_slot(name)
        if slot is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        store, key = slot
        return self.__dict__.get(store, {}).get(key)

    def __setattr__(self, name: str, value: Any) -> None:
        slot = None if name in _GROUP_FIELDS else _kind_slot(name)  # the fields: every image sets them all
        if slot is None:
            object.__setattr__(self, name, value)
            return
        store, key = slot
        if value is None:
            self.__dict__[store].pop(key, None)
        else:
            self.__dict__[store][key] = value

    def __copy__(self) -> GroupMaps:
        return dataclasses.replace(self)


#: GroupMaps's own fields: none is a kind's slot (kinds.RESERVED holds every name but ``channels``, which
#: :func:`_kind_slot` leaves alone too).
_GROUP_FIELDS = frozenset(f.name for f in dataclasses.fields(GroupMaps))


def _kind_slot(name: str) -> tuple[str, str] | None:
    """Where the attribute ``name`` of a GroupMaps lives: ("maps", kind) for a kind's map, ("map_peaks",
    kind) for ``<kind>_peak_xy`` of a kind that keeps a peak; None for any other name."""
    if name.startswith("_") or name == kinds.CHANNELS:
        return None
    if name in kinds.names():
        return "maps", name
    kind = name.removesuffix("_peak_xy")
    if kind != name and kind in kinds.names() and kinds.get(kind).peak:
        return "map_peaks", kind
    return None


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
        domain: the domain check of the image (:class:`mcloss.core.domain.DomainVerdict`: its score, the
            threshold and whether it is in the domain), from the same pass; None when the model has no domain
            check (domain check unavailable).
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
    domain: DomainVerdict | None = None

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
            raise ParameterError("image: this explanation holds no view of its image; pass image=", parameter="image")
        return self.view

    def tiles(
        self, group: int = 0, style: render.Style | None = None, *, image: np.ndarray | Image.Image | None = None
    ) -> list[render.Tile]:
        """The montage tiles of one target (rank ``group``): ξ channels, CCMP, parts, Grad-CAM, Guided Grad-CAM.

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
            kind: a map kind (``"channels"``, ``"gradcam"``, ``"channel_gradcam"``, ``"guided"``, any
                registered one) or ``"ccmp"``; ``"channel"`` means ``"channels"``.
            group: rank of the target.
            channel: channel within the group (for per-channel kinds).
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
        montage_format: str = "png",
        quality: int = DEFAULT_QUALITY,
        input: dict | None = None,  # noqa: A002 (the json's key)
    ) -> dict:
        """Write ``<path>.png`` (one montage per target), ``<path>.npz`` (raw maps) and, last, ``<path>.json``.

        ``path`` is a stem: ``out/bird.jpg`` writes ``out/bird.jpg.png`` etc., as ``mcloss export`` does.
        Every file is written atomically. ``defining`` as for :meth:`record`; ``options`` (the settings
        that made the outputs) goes into the json as ``options``; ``compare`` adds a second model
        (:class:`mcloss.explainability.outputs.Comparison`); ``clean_temps=False`` skips removing the temps a
        killed run left for these outputs (an export sweeps each folder once); ``montage=False`` writes no
        montage (no view is needed then); ``montage_format`` ``jpg`` or ``webp`` (at ``quality``) writes
        ``<path>.jpg`` / ``<path>.webp`` instead of the PNG. A save over an earlier one removes the files of the
        earlier that this one does not write (its other targets' montages, another format). ``input``: what the
        json records of the input under ``input`` (``mcloss export``: its path, size and modification time).
        Returns the JSON record.

        Raises:
            ParameterError: ``path`` is empty or a folder; OutputError: the files cannot be written.
        """
        from mcloss.explainability.outputs import OutputOptions, read_record, write_explanation

        text = os.fspath(path)
        if not text or text.endswith(("/", os.sep)) or Path(text).is_dir():
            raise ParameterError(
                f"path {text!r}: is a folder or empty, not an output stem ('out/bird.jpg' writes out/bird.jpg.png, "
                ".npz and .json)",
                parameter="path",
            )
        output = OutputOptions(
            style=style or render.Style(), topk=topk, options=options, clean_temps=clean_temps, montage=montage,
            montage_format=montage_format, quality=quality,
        )
        view = self._view(image) if montage else None
        base = Path(text)
        try:  # an earlier save's files that these outputs do not replace (more targets, another format) go
            return write_explanation(
                self, base, view=view, output=output, defining=defining, compare=compare, input_stamp=input,
                old=read_record(base),
            )
        except OSError as exc:
            raise OutputError(f"{text}: cannot write the explanation ({exc})") from None


# ------------------------------------------------------------------------------------------- explain


ImageInput = Image.Image | str | os.PathLike | PreparedImage
_IMAGE_TYPES = (Image.Image, str, os.PathLike, PreparedImage)


def _thumbnail_view(image: np.ndarray, *, height: int) -> np.ndarray:
    return render.thumbnail(image, height)[0]


def view_maker(view: str | None, view_size: int = render.VIEW_MAX_SIDE) -> ViewMaker | None:
    """The function that makes the view :func:`prepare` keeps (picklable, for DataLoader workers): ``"fit"``
    (long side at most ``view_size``), ``"height"`` (a montage thumbnail of ``view_size`` rows, see
    :func:`mcloss.explainability.render.thumbnail`), or None (no view).

    Raises:
        ParameterError: another ``view``.
    """
    if view == "fit":
        return functools.partial(render.fit_view, max_side=view_size)
    if view == "height":
        return functools.partial(_thumbnail_view, height=view_size)
    if view is not None:
        raise ParameterError(f"view must be 'fit', 'height' or None, got {view!r}", parameter="view")
    return None


def prepare(
    model: MCModel | EvalTransform,
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
    return prepare_image(getattr(model, "transform", model), image, view_maker(view, view_size))


def _as_items(images: Any) -> tuple[bool, list]:
    """(single, items): one image (PIL, path or PreparedImage) or any iterable of them."""
    if isinstance(images, _IMAGE_TYPES):
        return True, [images]
    try:
        items = list(images)
    except TypeError:
        raise ParameterError(
            f"images must be a PIL image, a path, a PreparedImage or a list of them, not {type(images).__name__}",
            parameter="images",
        ) from None
    bad = [type(it).__name__ for it in items if not isinstance(it, _IMAGE_TYPES)]
    if bad:
        raise ParameterError(f"images must be PIL images, paths or PreparedImages, got {bad[0]}", parameter="images")
    return False, items


def explain(
    model: MCModel,
    images: ImageInput | Sequence[ImageInput],
    targets: TargetSpec | Sequence[TargetSpec] = "pred",
    *,
    maps: str | Sequence[str] | None = None,
    labels: Sequence[int | None] | None = None,
    method: str = "fused",
    device: torch.device | str | None = None,
    amp: bool | None = None,
    batch_size: int | None = None,
    contrast: ContrastSpec | None = None,
) -> Explanation | list[Explanation]:
    """Explain one image or a list of them.

    Args:
        model: an MCModel.
        images: a PIL RGB image (EXIF applied), an image path, a :class:`PreparedImage`, or a list of them.
        targets: one spec for every image, or one per image (:mod:`mcloss.explainability.targets`); for a
            single image, a list of specs asks for several targets.
        maps: which maps, e.g. ``("channels", "gradcam")`` or ``"channels,gradcam,guided"`` (default: the
            kinds computed by default, :func:`mcloss.explainability.kinds.default_names`).
        labels: true classes (one per image, or one int for a single image), for ``"label"`` targets and
            ``Explanation.label``.
        method: ``"fused"`` or ``"captum"`` Grad-CAM.
        device: where to run (default: the model's device).
        amp: bf16 autocast (default: on for CUDA).
        batch_size: most images per forward pass (default: all images of one input shape at once). Every
            image is decoded first; for long lists, call once per chunk.
        contrast: why each target and not class B: ``"auto"`` (B is the class whose FC-head logit is nearest
            the target's; Finer-CAM also takes the next two), a class name or a 0-based index. It adds the
            contrastive maps (``finer``, ``contrast``) when ``maps`` names neither; naming one of them in
            ``maps`` without a contrast means ``"auto"``. See :mod:`mcloss.explainability.contrast`.

    Returns:
        An Explanation for a single image, else a list in input order. Images whose inputs have the same
        shape share forward passes.
    """
    single, items = _as_items(images)
    scalar = (str, int, np.integer)
    if not isinstance(targets, (*scalar, list, tuple)):
        raise spec_error(targets)
    if single and not isinstance(targets, scalar) and all(isinstance(s, scalar) for s in targets):
        targets = [list(targets)]  # several targets for the one image
    if single and labels is not None and not isinstance(labels, (list, tuple)):
        labels = [labels]
    if batch_size is not None and batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1, got {batch_size}", parameter="batch_size")
    names, contrast = kinds.contrast_maps(parse_maps(maps), contrast)
    if contrast is not None:
        check_contrast(model, contrast)
    prepared = [it if isinstance(it, PreparedImage) else prepare(model, it) for it in items]
    batch_targets = per_image(targets, len(items))
    batch_labels = list(labels) if labels is not None else [None] * len(items)
    if len(batch_labels) != len(items):
        raise ParameterError(f"labels: {len(batch_labels)} labels for {len(items)} images", parameter="labels")
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
                maps=names,
                method=method,
                device=device,
                amp=amp,
                contrast=contrast,
            )
            for i, e in zip(idx, out, strict=True):
                e.view, e.source = prepared[i].view, prepared[i].source
                results[i] = e
    return results[0] if single else results


def explain_tensor(
    model: MCModel,
    x: torch.Tensor,
    geometries: Sequence[Geometry],
    targets: TargetSpec | Sequence[TargetSpec] = "pred",
    *,
    labels: Sequence[int | None] | None = None,
    maps: str | Sequence[str] | None = None,
    method: str = "fused",
    device: torch.device | str | None = None,
    amp: bool | None = None,
    contrast: ContrastSpec | None = None,
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
        amp: bf16 autocast (default: on for CUDA). The backbone runs the batch channels-last
            (:meth:`~mcloss.core.model.MCModel.forward_features`).
        contrast: the class each target is contrasted with (see :func:`explain`).

    Returns:
        One Explanation per image (without a view; :func:`explain` adds it).
    """
    if method not in GRADCAM_METHODS:
        raise ParameterError(f"method must be one of {', '.join(GRADCAM_METHODS)}, got {method!r}", parameter="method")
    batch = x.shape[0]
    if len(geometries) != batch:
        raise ParameterError(f"geometries: {len(geometries)} for a batch of {batch}", parameter="geometries")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    amp = dev.type == "cuda" if amp is None else amp
    x = x.to(dev, non_blocking=True)
    names, contrast = kinds.contrast_maps(parse_maps(maps), contrast)
    chosen = [kinds.get(name) for name in names]
    fused = any(k.needs_gradients and (method == "fused" or k.fused_only) for k in chosen)

    with model_guard(model, freeze=True):
        feats, logits = _forward(model, x, dev, amp=amp, fused=fused)
        with torch.no_grad():
            probs_fc = torch.softmax(logits, dim=1).cpu().numpy()
            probs_mc = torch.softmax(model.mc_logits(feats.detach()), dim=1).float().cpu().numpy()
        verdicts = model.domain.verdicts(feats) if model.domain is not None else [None] * batch
        per_image = resolve_targets(model, targets, probs_fc, probs_mc, labels)
        depth = max(len(t) for t in per_image)
        contrasts = []
        if contrast is not None:
            contrasts = resolve_contrasts(model, contrast, logits.detach().float().cpu().numpy(), per_image)
        computed = _compute_maps(ExplainPass(model, x, feats, logits, method, depth, contrasts), chosen, per_image)

    picked = [(b, r, model.group_slice(t)) for b in range(batch) for r, t in enumerate(per_image[b])]
    host = {k.name: _to_host(computed[k.name], k, picked) for k in chosen}
    feature_hw = (int(feats.shape[2]), int(feats.shape[3]))
    peaks = _group_peaks(host[kinds.CHANNELS], geometries, feature_hw)
    label_list = list(labels) if labels is not None else [None] * batch
    results = []
    for b, geo in enumerate(geometries):
        groups = [_group_maps(model, host, peaks, (b, r, t), geo, feature_hw) for r, t in enumerate(per_image[b])]
        for r, gm in enumerate(groups):
            gm.prob, gm.prob_mc = float(probs_fc[b, gm.target]), float(probs_mc[b, gm.target])
            gm.versus = contrasts[b][r] if contrasts else None
        label = None if label_list[b] is None else int(label_list[b])
        results.append(
            Explanation(
                tuple(geo.original), geo, feature_hw, probs_fc[b], probs_mc[b], groups, label, tuple(model.class_names),
                domain=verdicts[b],
            )
        )
    return results


def _forward(model: MCModel, x: torch.Tensor, dev: torch.device, *, amp: bool, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """F (float32; a leaf that requires grad when ``fused``) and the FC-head logits computed from it."""
    with torch.no_grad(), autocast(dev, enabled=amp):
        feats = model.forward_features(x)
    feats = feats.float().contiguous()
    if fused:
        feats = feats.detach().requires_grad_(True)
    with torch.set_grad_enabled(fused), autocast(dev, enabled=amp):
        logits = model.head_logits(feats)
    return feats, logits.float()


def _compute_maps(p: ExplainPass, chosen: Sequence[MapKind], per_image: list[list[int]]) -> dict[str, list[torch.Tensor]]:
    """{kind: one batch of maps per target rank}, rank by rank, in table order."""
    out: dict[str, list[torch.Tensor]] = {k.name: [] for k in chosen}
    for r in range(p.depth):
        # images with fewer targets repeat their last one at deeper ranks (the result is discarded)
        rank_targets = [t[min(r, len(t) - 1)] for t in per_image]
        for k in chosen:
            out[k.name].append(k.compute(p, r, rank_targets))
    return out


def _to_host(per_rank: list[torch.Tensor], kind: MapKind, picked: list[tuple[int, int, slice]]) -> dict:
    """{(image, rank): that target's map of ``kind`` as numpy}: of a per-channel kind only the target's group
    leaves the device."""
    if kind.per_channel:
        return _target_groups(per_rank, picked)
    on_host = [m.cpu().numpy() for m in per_rank]
    return {(b, r): on_host[r][b] for b, r, _ in picked}


def _group_peaks(groups: dict, geometries: Sequence[Geometry], feature_hw: tuple[int, int]) -> dict:
    """{(image, rank): (peak cells, their original pixels, values)} of each target group's channels, for all
    groups in one pass (per image, the host's work would outweigh a GPU's forward)."""
    keys = list(groups)
    if not keys:
        return {}
    cells, values = channel_peaks(np.concatenate([groups[k] for k in keys]))
    rows = [geometries[b] for b, r in keys for _ in range(len(groups[b, r]))]
    xy = features_to_original(cells, rows, feature_hw)
    bounds = _row_bounds([len(groups[k]) for k in keys])
    return {k: (cells[i:j], xy[i:j], values[i:j]) for k, (i, j) in zip(keys, bounds, strict=True)}


def _row_bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(start, stop) of consecutive blocks of ``sizes`` rows (np.split's pieces, as slices: much faster)."""
    ends = np.cumsum(sizes).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _group_maps(
    model: MCModel, host: dict[str, dict], peaks: dict, key: tuple[int, int, int], geo: Geometry, feature_hw: tuple[int, int]
) -> GroupMaps:
    """The GroupMaps of target ``t`` at rank ``r`` of image ``b`` (``key``), its peaks (``peaks``, of
    :func:`_group_peaks`) in original pixels."""
    b, r, t = key
    chans = np.ascontiguousarray(host[kinds.CHANNELS][b, r], dtype=np.float32)
    cells, cells_xy, values = peaks[b, r]
    gm = GroupMaps(t, model.class_names[t], chans, chans.max(axis=0), cells, cells_xy, values)
    for name, maps in host.items():
        if name == kinds.CHANNELS:
            continue
        gm.maps[name] = np.ascontiguousarray(maps[b, r], dtype=np.float32)
        if kinds.get(name).peak:
            xy, _ = channel_peaks(gm.maps[name][None])
            gm.map_peaks[name] = geo.feature_to_original(xy, feature_hw)[0]
    return gm


def _target_groups(maps: Sequence[torch.Tensor], picked: list[tuple[int, int, slice]]) -> dict:
    """{(image, rank): that target's group of ``maps[rank]`` [B, K, h, w] as numpy}: only the target groups
    leave the device, in one copy; all of [B, K, h, w] would be K / ξ times more."""
    flat = torch.cat([maps[r][b, sl] for b, r, sl in picked]).cpu().numpy()
    bounds = _row_bounds([sl.stop - sl.start for _, _, sl in picked])
    return {(b, r): flat[i:j] for (b, r, _), (i, j) in zip(picked, bounds, strict=True)}
