"""UI glue for the Streamlit app: input decoding, gallery index, display tiles. No model logic here.

Everything in this module is pure (arrays and bytes in, arrays and bytes out) except the small file
readers (:func:`load_gallery`, :func:`list_checkpoints`), so the app script stays a thin layout layer
and the tests can call the same functions the app calls.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from mcloss.core.checkpoint import CheckpointError, load_checkpoint
from mcloss.data.io import ImageLoadError, load_image
from mcloss.evaluation import metrics
from mcloss.explainability import explanation as maps
from mcloss.explainability import render
from mcloss.explainability.explanation import Explanation, GroupMaps
from mcloss.explainability.geometry import crop_mask, to_original

__all__ = [
    "REPO_ROOT",
    "IMAGE_TYPES",
    "MAX_UPLOAD_MB",
    "MAX_PIXELS",
    "DISPLAY_MAX_SIDE",
    "TILE_HEIGHT",
    "HIT_RADIUS",
    "COLORMAPS",
    "default_checkpoint",
    "samples_dir",
    "list_checkpoints",
    "LoadedModel",
    "load_model",
    "explain_locked",
    "GalleryError",
    "Sample",
    "Gallery",
    "load_gallery",
    "decode_image",
    "display_image",
    "map_to_view",
    "draw_keypoints",
    "ChannelPart",
    "channel_parts",
    "Tile",
    "Style",
    "group_tiles",
    "channel_gradcam_tiles",
    "topk_rows",
    "agreement",
    "png_bytes",
    "export_zip",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Upload types offered by the file uploader (GIF and multi-page TIFF: first frame).
IMAGE_TYPES = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif")
MAX_UPLOAD_MB = 50
#: Larger images are refused before decoding (a decompression-bomb guard as well).
MAX_PIXELS = 40_000_000
#: Originals are shown downscaled to this long side.
DISPLAY_MAX_SIDE = 1024
#: Rows of each overlay tile.
TILE_HEIGHT = 320
#: Default hit radius for ground-truth parts, as a fraction of max(width, height).
HIT_RADIUS = 0.12
COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "jet")


# ------------------------------------------------------------------------------------------ locations


def default_checkpoint() -> Path:
    """``$MCLOSS_CHECKPOINT`` or ``checkpoints/default.safetensors`` of the repository."""
    env = os.environ.get("MCLOSS_CHECKPOINT")
    return Path(env) if env else REPO_ROOT / "checkpoints" / "default.safetensors"


def samples_dir() -> Path:
    """``$MCLOSS_SAMPLES`` or ``checkpoints/samples`` of the repository."""
    env = os.environ.get("MCLOSS_SAMPLES")
    return Path(env) if env else REPO_ROOT / "checkpoints" / "samples"


def list_checkpoints(default: Path, folder: Path | None = None) -> list[Path]:
    """The default checkpoint (even if missing, so the UI can say so) then every other ``*.safetensors``
    in ``folder`` (default: the repository's ``checkpoints/``), sorted by name."""
    folder = folder or REPO_ROOT / "checkpoints"
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file()) if folder.is_dir() else []
    default_resolved = default.resolve()
    return [default] + [p for p in found if p.resolve() != default_resolved]


# ---------------------------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    """A checkpoint loaded once and shared by every session; every call into it holds ``lock``."""

    model: torch.nn.Module
    lock: threading.Lock
    device: torch.device
    key: str
    label: str
    load_s: float


def load_model(path: str, label: str, key: str, device: torch.device) -> LoadedModel:
    """Load a checkpoint safely (:func:`mcloss.load_checkpoint`), then validate it end to end by explaining
    a grey image (which also warms the kernels up).

    Raises:
        CheckpointError: the file is not a usable mcloss checkpoint; the message names ``label``.
    """
    t0 = time.perf_counter()
    try:
        model = load_checkpoint(path, device=device)
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace(str(path), label)) from None
    size = int(model.config.get("img_size", 224))
    try:
        maps.explain(model, [Image.new("RGB", (size, size), (128, 128, 128))], "pred", device=device)
    except Exception as exc:  # loads but cannot run
        raise CheckpointError(f"{label}: the model does not run ({type(exc).__name__}: {exc})") from None
    return LoadedModel(model, threading.Lock(), device, key, label, time.perf_counter() - t0)


def explain_locked(
    loaded: LoadedModel,
    image: Image.Image,
    targets: Sequence[int | str],
    *,
    method: str = "fused",
    channel_gradcam: bool = False,
    guided: bool = False,
) -> tuple[Explanation, float]:
    """Explain one image for ``targets`` (class indices or specs like ``"top2"``) under the model's lock
    (:func:`mcloss.maps.explain` toggles eval mode and ``requires_grad``, so calls must not interleave).

    Returns the explanation and its wall time in seconds.
    """
    t0 = time.perf_counter()
    with loaded.lock:
        out = maps.explain(
            loaded.model,
            [image],
            [list(targets)],
            method=method,
            channel_gradcam=channel_gradcam,
            guided=guided,
            device=loaded.device,
        )
    return out[0], time.perf_counter() - t0


# -------------------------------------------------------------------------------------------- gallery


class GalleryError(ValueError):
    """The gallery index cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Sample:
    """One gallery image with its ground truth."""

    path: Path
    label: int
    class_name: str
    keypoints: np.ndarray = field(compare=False)  # [P, 3] (x, y, visible) in original pixels

    @property
    def title(self) -> str:
        return f"{self.class_name} — {self.path.name}"


@dataclass(frozen=True)
class Gallery:
    """The shipped samples and their part names."""

    folder: Path
    part_names: tuple[str, ...]
    samples: tuple[Sample, ...]


def load_gallery(folder: Path) -> Gallery:
    """Read ``index.json`` of a samples folder.

    Raises:
        GalleryError: missing or malformed index, or an entry whose image file is missing.
    """
    index = folder / "index.json"
    if not index.is_file():
        raise GalleryError(f"{index}: no gallery index")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        part_names = tuple(str(p) for p in data["part_names"])
        samples = []
        for i, entry in enumerate(data["samples"]):
            kps = np.asarray(entry.get("parts", []), dtype=np.float64).reshape(-1, 3)
            if len(kps) != len(part_names):
                raise GalleryError(
                    f"{index}: sample {i} has {len(kps)} keypoints for {len(part_names)} part names"
                )
            path = folder / str(entry["file"])
            if not path.is_file():
                raise GalleryError(f"{index}: sample {i} image {entry['file']!r} is missing")
            samples.append(Sample(path, int(entry["label"]), str(entry["class_name"]), kps))
    except GalleryError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GalleryError(f"{index}: malformed gallery index ({type(exc).__name__}: {exc})") from None
    if not samples:
        raise GalleryError(f"{index}: the gallery has no samples")
    return Gallery(folder, part_names, tuple(samples))


# ---------------------------------------------------------------------------------------------- input


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode uploaded bytes to 8-bit RGB with EXIF orientation applied.

    Raises:
        ImageLoadError: empty, not an image, corrupt, truncated, or over :data:`MAX_PIXELS`.
    """
    if not data:
        raise ImageLoadError(f"{name}: empty file")
    return load_image(io.BytesIO(data), name=name, max_pixels=MAX_PIXELS)


def display_image(image: Image.Image, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """RGB uint8 array of the image, downscaled (area filter) so its long side is at most ``max_side``."""
    arr = np.asarray(image.convert("RGB"))
    h, w = arr.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return arr
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(arr, size, interpolation=cv2.INTER_AREA)


# ---------------------------------------------------------------------------------------------- maps


def map_to_view(map_hw: np.ndarray, explanation: Explanation, size: tuple[int, int], *, nearest: bool) -> np.ndarray:
    """A map on the network-input grid, undone through the eval crop onto a (W, H) view of the original.

    ``nearest`` keeps the feature cells visible as blocks (for inspecting raw cells); otherwise bilinear
    (:func:`mcloss.maps.to_original`).
    """
    if not nearest:
        return to_original(map_hw, explanation.geometry, size)
    src = np.ascontiguousarray(np.asarray(map_hw, dtype=np.float32))
    geo = explanation.geometry
    w0, h0 = geo.original
    w, h = size
    kx, ky = w0 / w, h0 / h
    view_to_orig = np.array([[kx, 0.0, 0.5 * kx - 0.5], [0.0, ky, 0.5 * ky - 0.5], [0.0, 0.0, 1.0]])
    m = geo.original_to_feature_affine(src.shape) @ view_to_orig
    # feature index j is the centre of cell j, so nearest (rounding) picks the cell a pixel lies in
    out = cv2.warpAffine(
        src, m, (int(w), int(h)), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
    )
    out[~crop_mask(geo, (w, h))] = 0.0
    return out


def draw_keypoints(
    image: np.ndarray, keypoints_xy: np.ndarray, visible: np.ndarray, names: Sequence[str], *, min_side: int = 640
) -> np.ndarray:
    """Ground-truth keypoints as white-ringed dots with their part name, on a new image.

    Images shorter than ``min_side`` are first enlarged by an integer factor (bicubic) so the labels stay
    legible; ``keypoints_xy`` are in the pixels of ``image`` (pixel i covers [i, i+1)); each dot is drawn
    on the pixel containing its point, as :func:`mcloss.render.draw_peaks` does.
    """
    out = np.ascontiguousarray(image)
    factor = max(1, int(np.ceil(min_side / max(1, min(out.shape[:2])))))
    if factor > 1:
        out = cv2.resize(out, (out.shape[1] * factor, out.shape[0] * factor), interpolation=cv2.INTER_CUBIC)
    else:
        out = out.copy()
    r = max(4, min(out.shape[:2]) // 100)
    scale = max(0.45, min(out.shape[:2]) / 800.0)
    pts = np.asarray(keypoints_xy, dtype=np.float64).reshape(-1, 2) * factor
    for (x, y), vis, name in zip(pts, visible, names, strict=True):
        if not vis:
            continue
        p = (int(np.floor(x)), int(np.floor(y)))
        cv2.circle(out, p, r + 2, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(out, p, r, (20, 20, 20), -1, cv2.LINE_AA)
        org = (p[0] + r + 5, p[1] + r // 2 + 4)
        cv2.putText(out, name, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 5, cv2.LINE_AA)
        cv2.putText(out, name, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), 2, cv2.LINE_AA)
    return out


@dataclass(frozen=True)
class ChannelPart:
    """The ground-truth part nearest to one channel's peak."""

    part: str | None  # None: no visible keypoint
    distance: float  # pixels of the original
    hit: bool


def channel_parts(
    group: GroupMaps,
    keypoints: np.ndarray,
    part_names: Sequence[str],
    image_size: tuple[int, int],
    radius: float = HIT_RADIUS,
) -> tuple[list[ChannelPart], float]:
    """Nearest visible part of each channel peak and whether it lies within ``radius × max(W, H)``.

    Uses :mod:`mcloss.metrics` (the same definitions as ``mcloss parts``). Returns the per-channel rows and
    the hit radius in pixels.
    """
    parts, dist = metrics.nearest_keypoints(group.peaks_xy, keypoints)
    radius_px = metrics.hit_radius(image_size[0], image_size[1], radius)
    hits = metrics.hit_mask(dist, radius_px)
    rows = [
        ChannelPart(part_names[p] if p >= 0 else None, float(d), bool(h)) for p, d, h in zip(parts, dist, hits, strict=True)
    ]
    return rows, radius_px


# --------------------------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class Style:
    """Display controls; changing them never re-runs the model."""

    colormap: str = "inferno"
    alpha: float = 0.5
    shared_scale: bool = False
    peaks: bool = True
    nearest: bool = False


@dataclass
class Tile:
    """One picture of the group view."""

    image: np.ndarray
    caption: str
    alt: str
    slug: str  # file-name stem in downloads


def _color_bar(image: np.ndarray, color: np.ndarray, height: int = 5) -> np.ndarray:
    out = image.copy()
    out[:height] = color
    return out


def group_tiles(
    base: np.ndarray,
    explanation: Explanation,
    group: GroupMaps,
    style: Style,
    *,
    parts: Sequence[ChannelPart] | None = None,
) -> list[Tile]:
    """The ξ channel overlays, CCMP, part composite and Grad-CAM (and Guided Grad-CAM when computed).

    Args:
        base: RGB uint8 view of the original (any size; maps are warped onto it).
        explanation: the image's explanation (for its geometry).
        group: the class's maps.
        style: display controls.
        parts: per-channel nearest ground-truth part (gallery images), for the captions.
    """
    h, w = base.shape[:2]
    k = w / explanation.image_size[0]
    size = (w, h)
    xi = len(group.channels)
    colors = render.part_colors(xi)
    chans = np.stack([map_to_view(c, explanation, size, nearest=style.nearest) for c in group.channels])
    vmax = float(group.channels.max()) if style.shared_scale else None
    tiles = []
    for i in range(xi):
        pk = group.peaks_xy[i : i + 1] * k if style.peaks else None
        img = render.overlay(base, chans[i], colormap=style.colormap, alpha=style.alpha, vmax=vmax, peaks_xy=pk)
        caption = f"channel {i + 1}/{xi} · peak {group.peak_values[i]:.3g}"
        if parts is not None:
            p = parts[i]
            where = "no visible part" if p.part is None else f"{p.part} {'hit' if p.hit else 'miss'} ({p.distance:.0f} px)"
            caption += f" · {where}"
        tiles.append(
            Tile(_color_bar(img, colors[i]), caption, f"channel {i + 1} of {group.name}", f"ch{i + 1}")
        )
    ccmp = map_to_view(group.ccmp, explanation, size, nearest=style.nearest)
    tiles.append(
        Tile(
            render.overlay(base, ccmp, colormap=style.colormap, alpha=style.alpha),
            f"CCMP (max over {xi} channels)",
            f"CCMP of {group.name}",
            "ccmp",
        )
    )
    comp = render.part_composite(base, chans, colors=colors, shared_scale=style.shared_scale)
    if style.peaks:
        comp = render.draw_peaks(comp, group.peaks_xy * k, colors)
    tiles.append(Tile(comp, "parts: each channel in its colour", f"part composite of {group.name}", "parts"))
    if group.gradcam is not None:
        cam = map_to_view(group.gradcam, explanation, size, nearest=style.nearest)
        pk = None
        if style.peaks and group.gradcam_peak_xy is not None:
            pk = np.asarray(group.gradcam_peak_xy)[None] * k
        tiles.append(
            Tile(
                render.overlay(base, cam, colormap=style.colormap, alpha=style.alpha, peaks_xy=pk),
                f"Grad-CAM (FC head) · p {group.prob:.2f}",
                f"Grad-CAM of {group.name}",
                "gradcam",
            )
        )
    if group.guided is not None:
        g = to_original(group.guided, explanation.geometry, size)
        tiles.append(
            Tile(
                render.overlay(base, g, alpha=max(style.alpha, 0.6), signed=True),
                "Guided Grad-CAM (signed)",
                f"Guided Grad-CAM of {group.name}",
                "guided_gradcam",
            )
        )
    return tiles


def channel_gradcam_tiles(base: np.ndarray, explanation: Explanation, group: GroupMaps, style: Style) -> list[Tile]:
    """Per-channel Grad-CAM of the group's channels (empty when not computed)."""
    if group.channel_gradcam is None:
        return []
    h, w = base.shape[:2]
    maps = [map_to_view(c, explanation, (w, h), nearest=style.nearest) for c in group.channel_gradcam]
    vmax = float(group.channel_gradcam.max()) if style.shared_scale else None
    colors = render.part_colors(len(maps))
    return [
        Tile(
            _color_bar(render.overlay(base, m, colormap=style.colormap, alpha=style.alpha, vmax=vmax), colors[i]),
            f"Grad-CAM · channel {i + 1}",
            f"per-channel Grad-CAM {i + 1} of {group.name}",
            f"gradcam_ch{i + 1}",
        )
        for i, m in enumerate(maps)
    ]


# ------------------------------------------------------------------------------------------ prediction


def topk_rows(explanation: Explanation, class_names: Sequence[str], k: int = 5) -> list[dict]:
    """Rows (class, head, probability, rank) of the union of both heads' top-k, ordered by FC probability."""
    k = min(k, len(class_names))
    fc, mc = explanation.probs_fc, explanation.probs_mc
    top_fc = np.argsort(-fc, kind="stable")[:k]
    top_mc = np.argsort(-mc, kind="stable")[:k]
    classes = list(dict.fromkeys([int(i) for i in top_fc] + [int(i) for i in top_mc]))
    classes.sort(key=lambda c: (-fc[c], -mc[c]))
    rows = []
    for rank, c in enumerate(classes):
        rows.append({"class": class_names[c], "head": "FC head", "probability": float(fc[c]), "rank": rank})
        rows.append({"class": class_names[c], "head": "MC head", "probability": float(mc[c]), "rank": rank})
    return rows


def agreement(explanation: Explanation, class_names: Sequence[str]) -> tuple[bool, str]:
    """Whether the FC and MC heads predict the same class, and a sentence saying so."""
    p, q = explanation.prediction, explanation.prediction_mc
    fc, mc = explanation.probs_fc, explanation.probs_mc
    if p == q:
        return True, f"Both heads predict **{class_names[p]}** (FC {fc[p]:.2f} · MC {mc[q]:.2f})."
    return False, (
        f"The heads disagree: FC → **{class_names[p]}** ({fc[p]:.2f}), MC → **{class_names[q]}** ({mc[q]:.2f})."
    )


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an RGB uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def export_zip(
    name: str,
    base: np.ndarray,
    explanation: Explanation,
    groups: Sequence[GroupMaps],
    class_names: Sequence[str],
    style: Style,
    tiles: dict[str, Sequence[Tile]],
    *,
    label: int | None = None,
    topk: int = 5,
) -> bytes:
    """A ZIP of every shown overlay (``overlays/*.png``) plus exactly what ``mcloss export`` writes for the
    shown classes (``export/<name>.png|.npz|.json``, via :func:`mcloss.export.write_outputs`)."""
    from mcloss.explainability import export

    shown = dataclasses.replace(explanation, groups=list(groups), label=label)
    options = {
        "colormap": style.colormap,
        "alpha": style.alpha,
        "shared_scale": style.shared_scale,
        "tile_height": TILE_HEIGHT,
        "topk": topk,
    }
    stem = export.sanitize_component(name)
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="mcloss-app-") as tmp, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        export.write_outputs(Path(tmp) / stem, name, base, shown, class_names, options)
        for f in sorted(Path(tmp).iterdir()):
            zf.write(f, f"export/{f.name}")
        for cls, cls_tiles in tiles.items():
            for t in cls_tiles:
                zf.writestr(f"overlays/{export.sanitize_component(cls)}_{t.slug}.png", png_bytes(t.image))
    return buf.getvalue()
