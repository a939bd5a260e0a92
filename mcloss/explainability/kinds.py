"""The map kinds an explanation can hold: one table, read by ``explain``, the renderer, the output writer,
the app and the CLI's ``--maps``.

Each :class:`MapKind` says once what a kind needs, how it is computed inside the one fused pass, where it
is kept (``GroupMaps.maps[name]``, also ``group.<name>``), how its tiles are titled and coloured, its npz key
and its label in the app. Adding a kind is one :func:`register` call: the maps it computes then appear in
``explain``'s results, the montage, the npz, the json (kinds with a peak) and the app's toggles.

Built in, in this order (the order of tiles, npz arrays and json keys):

- ``channels``: the target's slice of F (always computed; its tiles are the ξ channels, CCMP and the part
  composite).
- ``gradcam``: ReLU Grad-CAM of the FC-head logit, from the same pass (fused) or Captum's ``LayerGradCam``.
- ``channel_gradcam``: per-channel Grad-CAM of the group's channels (shown by the app, not in montages).
- ``guided``: Captum's Guided Grad-CAM at input resolution, signed (extra passes through the input).
- ``finer``: Finer-CAM of the FC head, the target against its contrast's references (from the same pass).
- ``contrast``: the group contrast, the target's channel group against class B's (no gradient).

The last two are contrastive (:mod:`mcloss.explainability.contrast`): they need a class to contrast with,
and their tiles are titled "A vs B".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mcloss.core.errors import ParameterError
from mcloss.explainability.contrast import finer_weights, group_contrast
from mcloss.explainability.gradcam import (
    captum_channel_gradcam,
    captum_gradcam,
    captum_guided_gradcam,
    fused_gradcam,
    gradcam_from_weights,
)
from mcloss.explainability.render.tiles import channel_group_tiles, map_tile, per_channel_tiles

if TYPE_CHECKING:
    import numpy as np

    from mcloss.core.model import MCModel
    from mcloss.explainability.contrast import Contrast
    from mcloss.explainability.explanation import Explanation, GroupMaps
    from mcloss.explainability.render.tiles import Style, Tile

__all__ = [
    "CHANNELS",
    "RESERVED",
    "ExplainPass",
    "MapKind",
    "contrast_maps",
    "default_names",
    "get",
    "kinds",
    "names",
    "parse_maps",
    "register",
    "register_map_kind",
    "unregister",
]

#: The kind every explanation holds.
CHANNELS = "channels"


@dataclass
class ExplainPass:
    """What a kind's ``compute`` reads inside the one pass of :func:`~mcloss.explainability.explanation.explain_tensor`.

    Attributes:
        model: the model (frozen, in eval mode).
        x: [B, 3, H, W] the inputs, on the model's device.
        features: F [B, K, h, w] float32 (requires grad when a fused Grad-CAM is asked for).
        logits: [B, C] FC-head logits computed from ``features``.
        method: ``"fused"`` or ``"captum"`` Grad-CAM.
        depth: the number of target ranks.
        contrasts: per image, one :class:`~mcloss.explainability.contrast.Contrast` per target (empty when
            no contrastive kind is computed).
    """

    model: MCModel
    x: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    method: str
    depth: int
    contrasts: list[list[Contrast]] = field(default_factory=list)
    _weights: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def gradcam_weights(self, rank: int, targets: Sequence[int]) -> torch.Tensor:
        """[B, K] Grad-CAM channel weights of the FC-head logits of ``targets`` (rank ``rank``), computed once
        per rank from this pass (the graph lives as long as the pass)."""
        if rank not in self._weights:
            self._weights[rank] = fused_gradcam(self.features, self.logits, list(targets), retain_graph=True)
        return self._weights[rank]

    def rank_contrasts(self, rank: int) -> list[Contrast]:
        """Each image's contrast at ``rank`` (images with fewer targets repeat their last one)."""
        if not self.contrasts:
            raise ParameterError("a contrastive map needs a class to contrast with (contrast=)", parameter="contrast")
        return [c[min(rank, len(c) - 1)] for c in self.contrasts]


Compute = Callable[[ExplainPass, int, list[int]], torch.Tensor]
Draw = Callable[["np.ndarray", "Explanation", "GroupMaps", "MapKind", "Style"], "list[Tile]"]


@dataclass(frozen=True)
class MapKind:
    """One kind of map.

    Attributes:
        name: its name in ``--maps``, its ``GroupMaps.maps`` key (also ``group.<name>``), its npz key and
            its json key.
        label: its name in the app (a toggle for kinds not computed by default).
        compute: ``(pass, rank, targets) -> tensor`` for the targets of one rank, one per image: [B, h, w]
            at feature resolution, [B, K, h, w] when ``per_channel`` (the target's group is kept), or
            [B, H, W] at input resolution when ``at_input``.
        title, caption, alt, slug: its tile's short title (montages), caption (the app), alternative text and
            file stem, formatted with ``name`` (the class), ``prob`` (FC-head probability), ``channel``
            (1-based), ``xi`` (group size) and ``peak`` (the channel's peak value).
        needs_gradients: computed from gradients w.r.t. F (the pass keeps F's graph when the method is fused).
        fused_only: computed from this pass's gradients whatever the Grad-CAM method (Finer-CAM).
        contrastive: needs a class to contrast with (``explain(contrast=)``); its templates may use ``other``
            (class B's name), ``versus`` (B, with "+n" for Finer-CAM's further references) and ``versus_all``
            (B "and n more near classes").
        extra_passes: runs passes of its own through the input with hooks on the model (slower, and an export
            then explains one batch at a time).
        per_channel: one map per channel of the target's group.
        at_input: at input resolution (warped bilinearly), else at feature resolution.
        signed: a signed map, drawn with the diverging colormap centred on 0.
        peak: its argmax cell is kept (``GroupMaps.map_peaks``), marked on its tile and written to the json.
        in_montage: drawn in montages (else shown by the app only, on a row of its own).
        default: computed unless maps are chosen (the CLI's and ``explain``'s default ``maps``).
        extra_tiles: tiles drawn beside its maps (``channels``: CCMP and the part composite).
        draw: ``(view, explanation, group, kind, style) -> tiles``; default by ``per_channel``
            (:func:`~mcloss.explainability.render.tiles.per_channel_tiles` or
            :func:`~mcloss.explainability.render.tiles.map_tile`).
    """

    name: str
    label: str
    compute: Compute
    title: str
    caption: str
    alt: str
    slug: str
    needs_gradients: bool = False
    fused_only: bool = False
    contrastive: bool = False
    extra_passes: bool = False
    per_channel: bool = False
    at_input: bool = False
    signed: bool = False
    peak: bool = False
    in_montage: bool = True
    default: bool = False
    extra_tiles: int = 0
    draw: Draw | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ParameterError(f"map kind name must be an identifier, got {self.name!r}")
        if self.peak and (self.per_channel or self.at_input):
            raise ParameterError(f"map kind {self.name!r}: a peak is kept only for one map at feature resolution")

    def tiles(self, view: np.ndarray, explanation: Explanation, group: GroupMaps, style: Style) -> list[Tile]:
        """This kind's tiles of one target, drawn at the size of ``view``."""
        if self.draw is not None:
            return self.draw(view, explanation, group, self, style)
        if self.per_channel:
            return per_channel_tiles(view, explanation, group, self, style)
        return [map_tile(view, explanation, group, self, style)]

    def tile_count(self, xi: int) -> int:
        """How many tiles it draws for a group of ``xi`` channels."""
        return (xi if self.per_channel else 1) + self.extra_tiles


# ------------------------------------------------------------------------------------------ built-ins


def _features(p: ExplainPass, rank: int, targets: list[int]) -> torch.Tensor:
    return p.features.detach()


def _gradcam(p: ExplainPass, rank: int, targets: list[int]) -> torch.Tensor:
    if p.method == "fused":
        return gradcam_from_weights(p.features.detach(), p.gradcam_weights(rank, targets))
    return captum_gradcam(p.model, p.x, targets).float()


def _channel_gradcam(p: ExplainPass, rank: int, targets: list[int]) -> torch.Tensor:
    if p.method == "fused":
        return gradcam_from_weights(p.features.detach(), p.gradcam_weights(rank, targets), per_channel=True)
    return captum_channel_gradcam(p.model, p.x, targets).float()


def _guided(p: ExplainPass, rank: int, targets: list[int]) -> torch.Tensor:
    return captum_guided_gradcam(p.model, p.x, targets).float().sum(dim=1)


def _finer(p: ExplainPass, rank: int, targets: list[int]) -> torch.Tensor:
    references = [c.references for c in p.rank_contrasts(rank)]
    weights = finer_weights(p.features, p.logits, targets, references)
    return gradcam_from_weights(p.features.detach(), weights)


def _contrast(p: ExplainPass, rank: int, targets: list[int]) -> torch.Tensor:
    feats, group = p.features.detach(), p.model.group_slice
    pairs = zip(targets, p.rank_contrasts(rank), strict=True)
    return torch.stack([group_contrast(feats[b, group(t)], feats[b, group(c.other)]) for b, (t, c) in enumerate(pairs)])


_TABLE: dict[str, MapKind] = {}

#: Names a kind cannot take: they already mean something in GroupMaps, the npz, the json or ``map_overlay``.
RESERVED = frozenset({
    "target", "name", "ccmp", "peaks_feature", "peaks_xy", "peak_values", "maps", "map_peaks", "prob", "prob_mc",
    "channel", "probs", "probs_mc", "targets", "rank", "index", "png", "montage", "defining_parts", "defining_mass_ratio",
    "file", "image_size", "prediction", "prediction_mc", "topk", "label", "feature_hw", "geometry", "outputs",
    "options", "compare", "versus", "references",
})  # fmt: skip


def _check_name(name: str) -> None:
    """Refuse a kind name that is taken, reserved, or would read as another key (``compare_…``, ``…_r2``,
    ``…_peak_xy``)."""
    if name in _TABLE:
        raise ParameterError(f"map kind {name!r} is already registered", parameter="kind")
    clash = re.fullmatch(r"compare_.*|.*_r\d+|.*_peak_xy", name)
    if name in RESERVED or clash:
        raise ParameterError(f"map kind name {name!r} is reserved (it names something else in the outputs)", parameter="kind")


def register(kind: MapKind) -> MapKind:
    """Add a kind after the others (its name must be new and not reserved); returns it. Also
    ``mcloss.register_map_kind``."""
    _check_name(kind.name)
    _TABLE[kind.name] = kind
    return kind


register_map_kind = register


def unregister(name: str) -> None:
    """Remove a kind added by :func:`register` (the built-in ones stay)."""
    if name in _BUILT_IN:
        raise ParameterError(f"map kind {name!r} is built in", parameter="name")
    _TABLE.pop(name, None)


def kinds() -> tuple[MapKind, ...]:
    """Every kind, in table order (``channels`` first)."""
    return tuple(_TABLE.values())


def names() -> tuple[str, ...]:
    """Every kind's name, in table order (the ``maps`` vocabulary)."""
    return tuple(_TABLE)


def default_names() -> tuple[str, ...]:
    """The kinds computed by default."""
    return tuple(k.name for k in _TABLE.values() if k.default)


def get(name: str) -> MapKind:
    """The kind called ``name``."""
    try:
        return _TABLE[name]
    except KeyError:
        raise ParameterError(f"unknown map kind {name!r} (choose from {', '.join(_TABLE)})") from None


def parse_maps(maps: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"channels,gradcam"`` or a sequence of names → a tuple of known names in table order (``channels``
    always first); None → the kinds computed by default (:func:`default_names`).

    Raises:
        ParameterError: an unknown kind (the message names ``maps`` and lists the known kinds).
    """
    if maps is None:
        return default_names()
    items = maps.split(",") if isinstance(maps, str) else list(maps)
    wanted = [str(m).strip() for m in items if str(m).strip()]
    unknown = sorted(set(wanted) - set(_TABLE))
    if unknown:
        raise ParameterError(f"maps: unknown {', '.join(unknown)} (choose from {', '.join(_TABLE)})", parameter="maps")
    return tuple(name for name in _TABLE if name == CHANNELS or name in wanted)


def contrast_maps(names: Sequence[str], contrast: object | None) -> tuple[tuple[str, ...], object | None]:
    """Kinds and contrast spec made consistent: a contrast adds every contrastive kind when none is chosen;
    a contrastive kind without a contrast gets ``"auto"``. Returns (kind names in table order, contrast)."""
    chosen = {k.name for k in kinds() if k.name in names and k.contrastive}
    if contrast is None:
        return tuple(names), ("auto" if chosen else None)
    if not chosen:
        names = [*names, *(k.name for k in kinds() if k.contrastive)]
    return tuple(n for n in _TABLE if n in names), contrast


_BUILT_IN_KINDS = (
    MapKind(
        CHANNELS, "Channels", _features, "ch {channel}/{xi}  peak {peak}", "channel {channel}/{xi} · peak {peak}",
        "channel {channel} of {name}", "ch{channel}", per_channel=True, default=True, extra_tiles=2,
        draw=channel_group_tiles,
    ),
    MapKind(
        "gradcam", "Grad-CAM", _gradcam, "Grad-CAM {name} {prob:.2f}", "Grad-CAM (FC head) · p {prob:.2f}",
        "Grad-CAM of {name}", "gradcam", needs_gradients=True, peak=True, default=True,
    ),
    MapKind(
        "channel_gradcam", "Per-channel Grad-CAM", _channel_gradcam, "Grad-CAM ch {channel}",
        "Grad-CAM · channel {channel}", "per-channel Grad-CAM {channel} of {name}", "gradcam_ch{channel}",
        needs_gradients=True, per_channel=True, in_montage=False,
    ),
    MapKind(
        "guided", "Guided Grad-CAM", _guided, "Guided Grad-CAM", "Guided Grad-CAM (signed)",
        "Guided Grad-CAM of {name}", "guided_gradcam", extra_passes=True, at_input=True, signed=True,
    ),
    MapKind(
        "finer", "Finer-CAM", _finer, "Finer vs {versus}", "Finer-CAM · {name} vs {versus_all}",
        "Finer-CAM of {name} against {versus_all}", "finer", needs_gradients=True, fused_only=True, contrastive=True,
        peak=True,
    ),
    MapKind(
        "contrast", "Group contrast", _contrast, "groups vs {other}", "group contrast · {name} vs {other}",
        "group contrast of {name} against {other}", "contrast", contrastive=True, peak=True,
    ),
)
for _kind in _BUILT_IN_KINDS:
    register(_kind)
_BUILT_IN = frozenset(k.name for k in _BUILT_IN_KINDS)
