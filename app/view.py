"""UI glue for the Streamlit app: model loading, input decoding, gallery index, captions, downloads. No model
logic and no drawing of maps here: tiles come from :mod:`mcloss.explainability.render`.

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

from mcloss.core.checkpoint import CheckpointError, default_checkpoint, load_checkpoint, project_checkpoints
from mcloss.data.files import sanitize_component
from mcloss.data.io import ImageLoadError, encode_image, load_image
from mcloss.evaluation import metrics
from mcloss.explainability import render
from mcloss.explainability.explanation import Explanation, GroupMaps, explain, prepare

__all__ = [
    "IMAGE_TYPES",
    "MAX_UPLOAD_MB",
    "MAX_PIXELS",
    "DISPLAY_MAX_SIDE",
    "TILE_HEIGHT",
    "HIT_RADIUS",
    "COLORMAPS",
    "default_checkpoint",
    "samples_dir",
    "part_captions",
    "style_for",
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
    "draw_keypoints",
    "ChannelPart",
    "channel_parts",
    "topk_rows",
    "agreement",
    "export_zip",
]

#: Upload types offered by the file uploader (GIF and multi-page TIFF: first frame).
IMAGE_TYPES = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif")
MAX_UPLOAD_MB = 50
#: Larger images are refused before decoding (a decompression-bomb guard as well).
MAX_PIXELS = 40_000_000
#: Originals are shown downscaled to this long side.
DISPLAY_MAX_SIDE = render.VIEW_MAX_SIDE
#: Rows of each tile of the downloaded montage.
TILE_HEIGHT = 320
#: Default hit radius for ground-truth parts, as a fraction of max(width, height).
HIT_RADIUS = 0.12
COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "jet")


# ------------------------------------------------------------------------------------------ locations


def samples_dir() -> Path:
    """``$MCLOSS_SAMPLES`` or the default checkpoint's gallery (``samples/`` beside it in the project)."""
    env = os.environ.get("MCLOSS_SAMPLES")
    return Path(env) if env else project_checkpoints() / "samples"


def list_checkpoints(default: Path, folder: Path | None = None) -> list[Path]:
    """The default checkpoint (even if missing, so the UI can say so; :func:`mcloss.default_checkpoint`
    resolves it) then every other ``*.safetensors``
    in ``folder`` (default: the project's ``checkpoints/``), sorted by name."""
    folder = folder or project_checkpoints()
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
        explain(model, Image.new("RGB", (size, size), (128, 128, 128)), "pred", device=device)
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
    (:func:`mcloss.explain` toggles eval mode and ``requires_grad``, so calls must not interleave).

    Returns the explanation and its wall time in seconds.
    """
    t0 = time.perf_counter()
    kinds = ["channels", "gradcam"] + ["channel_gradcam"] * channel_gradcam + ["guided"] * guided
    prepared = prepare(loaded.model, image, view=None)  # the app draws on its own display copy
    with loaded.lock:
        out = explain(loaded.model, prepared, [list(targets)], maps=kinds, method=method, device=loaded.device)
    return out, time.perf_counter() - t0


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
    return render.fit_view(np.asarray(image.convert("RGB")), max_side)


# ---------------------------------------------------------------------------------------------- maps


def draw_keypoints(
    image: np.ndarray, keypoints_xy: np.ndarray, visible: np.ndarray, names: Sequence[str], *, min_side: int = 640
) -> np.ndarray:
    """Ground-truth keypoints as white-ringed dots with their part name, on a new image.

    Images shorter than ``min_side`` are first enlarged by an integer factor (bicubic) so the labels stay
    legible; ``keypoints_xy`` are in the pixels of ``image`` (pixel i covers [i, i+1)); each dot is drawn
    on the pixel containing its point, as :func:`mcloss.explainability.render.draw_peaks` does.
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

    Uses :mod:`mcloss.evaluation.metrics` (the same definitions as ``mcloss parts``). Returns the per-channel rows and
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


def style_for(colormap: str, alpha: float, shared_scale: bool, peaks: bool, nearest: bool) -> render.Style:
    """The display controls as a :class:`mcloss.explainability.render.Style` (montage tiles of
    :data:`TILE_HEIGHT` rows)."""
    return render.Style(
        colormap=colormap,
        alpha=alpha,
        shared_scale=shared_scale,
        peaks=peaks,
        interpolation="nearest" if nearest else "bilinear",
        tile_height=TILE_HEIGHT,
    )


def part_captions(tiles: Sequence[render.Tile], parts: Sequence[ChannelPart]) -> list[render.Tile]:
    """The group's tiles with each channel's nearest ground-truth part added to its caption."""
    out = list(tiles)
    for i, p in enumerate(parts):
        where = "no visible part" if p.part is None else f"{p.part} {'hit' if p.hit else 'miss'} ({p.distance:.0f} px)"
        out[i] = dataclasses.replace(out[i], caption=f"{out[i].caption} · {where}")
    return out


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


def export_zip(
    name: str,
    base: np.ndarray,
    explanation: Explanation,
    groups: Sequence[GroupMaps],
    style: render.Style,
    tiles: dict[str, Sequence[render.Tile]],
    *,
    label: int | None = None,
    topk: int = 5,
) -> bytes:
    """A ZIP of every shown overlay (``overlays/*.png``) plus exactly what ``mcloss export`` writes for the
    shown classes (``export/<name>.png|.npz|.json``, via :meth:`mcloss.Explanation.save`)."""
    shown = explanation.with_groups(groups, label=label, source=name)
    stem = sanitize_component(name)
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="mcloss-app-") as tmp, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        shown.save(Path(tmp) / stem, style, topk=topk, image=base)
        for f in sorted(Path(tmp).iterdir()):
            zf.write(f, f"export/{f.name}")
        for cls, cls_tiles in tiles.items():
            for t in cls_tiles:
                zf.writestr(f"overlays/{sanitize_component(cls)}_{t.slug}.png", encode_image(t.image))
    return buf.getvalue()
