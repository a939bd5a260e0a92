"""UI glue for the Streamlit app: model loading, input decoding, gallery index, captions, downloads. No model
logic and no drawing here: every picture comes from :mod:`mcloss.explainability.render`.

Everything in this module is pure (arrays and bytes in, arrays and bytes out) except the small file
readers (:func:`load_gallery`, :func:`list_checkpoints`) and the allocator setting (:func:`limit_heap_growth`),
so the app script stays a thin layout layer and the tests can call the same functions the app calls.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import html
import io
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mcloss.core.checkpoint import CheckpointError, default_checkpoint, load_checkpoint, project_checkpoints
from mcloss.core.errors import DatasetError, MclossError
from mcloss.core.files import file_sha256
from mcloss.core.model import MCModel
from mcloss.data.annotations import PartAnnotations
from mcloss.data.cub import read_label_map
from mcloss.data.files import sanitize_component
from mcloss.data.io import ImageLoadError, encode_image, load_image
from mcloss.evaluation.sanity import group_knockout
from mcloss.explainability import kinds, render
from mcloss.explainability.atlas import AtlasInputs, build_atlas, contact_sheet
from mcloss.explainability.contrast import ContrastSpec, nearest_classes
from mcloss.explainability.defining import (
    SOURCE_IMAGE,
    DefiningSummary,
    defining_indices,
    format_ratio,
    join_names,
)
from mcloss.explainability.explanation import Explanation, GroupMaps, explain, prepare
from mcloss.explainability.geometry import to_original
from mcloss.explainability.outputs import Comparison
from mcloss.interop.sources import import_model, parse_class_names
from mcloss.metrics import localization as metrics
from mcloss.metrics import mass

__all__ = [
    "IMAGE_TYPES",
    "MAX_UPLOAD_MB",
    "MAX_CHECKPOINT_MB",
    "upload_error",
    "upload_record",
    "load_uploaded",
    "read_names",
    "text",
    "IMPORT_SUFFIXES",
    "knockout_locked",
    "knockout_note",
    "KNOCKOUT_DRAWS",
    "COMPARE_DEFAULT",
    "ATLAS_TOP",
    "gallery_atlas",
    "compare_choices",
    "compare_heading",
    "MONTAGE_HELP",
    "MAX_PIXELS",
    "DISPLAY_MAX_SIDE",
    "TILE_HEIGHT",
    "COLORMAPS",
    "default_checkpoint",
    "samples_dir",
    "part_captions",
    "style_for",
    "list_checkpoints",
    "LoadedModel",
    "load_model",
    "explain_locked",
    "optional_kinds",
    "kind_label",
    "toggle_key",
    "GalleryError",
    "Sample",
    "Gallery",
    "load_gallery",
    "decode_image",
    "display_image",
    "sample_annotations",
    "defining_caption",
    "defining_note",
    "ChannelPart",
    "channel_parts",
    "topk_rows",
    "agreement",
    "domain_note",
    "export_zip",
    "WHY_MAPS",
    "closest_classes",
    "PartsContrast",
    "parts_contrast",
    "parts_contrast_note",
    "parts_caption",
    "tell_apart_ratios",
    "tell_apart_note",
    "why_heading",
    "FINER_NOTE",
    "CONTRAST_NOTE",
    "GRADCAM_NOTE",
    "MMAP_THRESHOLD",
    "limit_heap_growth",
]

#: Upload types offered by the file uploader (GIF and multi-page TIFF: first frame).
IMAGE_TYPES = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif")
MAX_UPLOAD_MB = 50
#: Uploaded checkpoints may be this large; ``server.maxUploadSize`` in ``.streamlit/config.toml`` makes the
#: server refuse any larger request body (the image limit is checked on the server by :func:`upload_error`).
MAX_CHECKPOINT_MB = 200
#: Larger images are refused before decoding (a decompression-bomb guard as well).
MAX_PIXELS = 40_000_000
#: Originals are shown downscaled to this long side.
DISPLAY_MAX_SIDE = render.VIEW_MAX_SIDE
#: Rows of each tile of the downloaded montage.
TILE_HEIGHT = 320
MONTAGE_HELP = (
    f"one row of tiles per class shown, {TILE_HEIGHT} px tall; an image beyond {render.MAX_TILE_ASPECT:g}:1 is letterboxed and a "
    f"montage over {render.MONTAGE_MAX_PIXELS / 1e6:g} MP gets shorter tiles"
)
COLORMAPS = (render.DEFAULT_COLORMAP, "viridis", "magma", "plasma", "turbo", "jet")


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


# --------------------------------------------------------------------------------------------- memory

#: Buffers from this size up (decoded images, tiles, PNGs, pickled explanations, activations) get memory maps of
#: their own, returned to the system when freed: glibc's starting threshold, kept fixed. ``MCLOSS_APP_MMAP_KB``
#: overrides it (0: leave glibc's own, sliding threshold).
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def limit_heap_growth() -> bool:
    """Keep the server's heap from growing with every upload (once per process; glibc only): returns whether
    it applied.

    Streamlit runs each script run in a thread of its own, and glibc gives threads their own heaps; it also
    raises its memory-map threshold to the largest buffer freed so far, so after the first image, image-sized
    buffers come from those heaps and their freed space stays with the process (issue 26: +5 to +12 % RSS over
    200 uploads, about 70 MB of free space held in the threads' heaps). A fixed threshold returns them, at the
    cost of fresh pages for every large buffer (on a 2-core VM one explanation and its tiles took ~90 ms instead
    of ~45 ms; an upload in the browser was no slower, see BENCHMARKS.md).
    """
    try:
        threshold = int(os.environ.get("MCLOSS_APP_MMAP_KB", MMAP_THRESHOLD // 1024)) * 1024
    except ValueError:
        threshold = MMAP_THRESHOLD
    if threshold <= 0 or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


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
    sha256: str | None = None  # of the checkpoint file (or the uploaded bytes), for the downloads' record


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
    return _validated(model, label, key, device, t0, file_sha256(Path(path)))


def _validated(model: MCModel, label: str, key: str, device: torch.device, t0: float, sha256: str) -> LoadedModel:
    size = int(model.config.get("img_size", 224))
    try:
        explain(model, Image.new("RGB", (size, size), (128, 128, 128)), "pred", device=device)
    except Exception as exc:  # loads but cannot run
        raise CheckpointError(f"{label}: the model does not run ({type(exc).__name__}: {exc})") from None
    return LoadedModel(model, threading.Lock(), device, key, label, time.perf_counter() - t0, sha256)


#: Uploads imported on the fly (another project's state dict) rather than loaded as mcloss checkpoints.
IMPORT_SUFFIXES = (".pth", ".pt", ".ckpt")


def load_uploaded(
    data: bytes, label: str, key: str, device: torch.device, names: Sequence[str] | None = None,
    prefix: str | None = None,
) -> LoadedModel:
    """:func:`load_model` for uploaded bytes: they pass through a private temporary folder that is removed
    as soon as the model is loaded (or refused), so no uploaded checkpoint outlives the call.

    A ``.pth``, ``.pt`` or ``.ckpt`` upload is another project's state dict, imported on the fly
    (:func:`mcloss.interop.sources.import_model`, read with ``weights_only=True``, never unpickled), with
    ``names`` as its class names (default ``class_000``, …) and ``prefix`` as its key prefix
    (:func:`mcloss.interop.sources.unwrap_keys`).
    """
    t0 = time.perf_counter()
    suffix = Path(label).suffix.lower()
    with tempfile.TemporaryDirectory(prefix="mcloss-upload-") as tmp:
        if suffix not in IMPORT_SUFFIXES:
            path = Path(tmp) / "upload.safetensors"
            path.write_bytes(data)
            return load_model(str(path), label, key, device)
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            model = import_model(path, classes=names, prefix=prefix)
        except MclossError as exc:
            said = str(exc).replace(str(path), label).replace("mcloss import --prefix", "the Key prefix field")
            raise CheckpointError(said) from None
    model.card["source"]["file"] = Path(label).name  # the uploaded name, not the temporary copy's
    if "assumed" in model.card["source"]:  # the upload has no setting.txt beside it and no --img-size
        model.card["source"]["assumed"] = [
            said.replace("give --img-size or --setting", "import it with mcloss import --img-size (or --setting) and upload the .safetensors")
            for said in model.card["source"]["assumed"]
        ]
    return _validated(model.to(device), label, key, device, t0, hashlib.sha256(data).hexdigest())


def read_names(data: bytes, label: str) -> list[str]:
    """Class names from an uploaded text file, one per line (blank lines skipped).

    Raises:
        CheckpointError: not UTF-8 text, no names, or a name twice; the message names ``label``.
    """
    try:
        return parse_class_names(data, label)
    except MclossError as exc:
        raise CheckpointError(str(exc)) from None


def optional_kinds() -> list[kinds.MapKind]:
    """The map kinds the app offers as toggles: every kind not computed by default, in table order."""
    return [k for k in kinds.kinds() if not k.default]


def toggle_key(kind: kinds.MapKind) -> str:
    """The app's session key of a kind's toggle (``map_`` + its name: no kind can clash with another widget)."""
    return f"map_{kind.name}"


def kind_label(kind: kinds.MapKind) -> str:
    """A kind's toggle label (slow kinds say so)."""
    return f"{kind.label} (slower)" if kind.extra_passes else kind.label


def explain_locked(
    loaded: LoadedModel,
    image: Image.Image,
    targets: Sequence[int | str],
    *,
    method: str = "fused",
    maps: Sequence[str] | None = None,
    contrast: ContrastSpec | None = None,
) -> tuple[Explanation, float]:
    """Explain one image for ``targets`` (class indices or specs like ``"top2"``) under the model's lock
    (:func:`mcloss.explain` toggles eval mode and ``requires_grad``, so calls must not interleave); ``maps``
    default the kinds computed by default; ``contrast``: the class B of the contrastive maps (see
    :func:`mcloss.explain`).

    Returns the explanation and its wall time in seconds.
    """
    t0 = time.perf_counter()
    prepared = prepare(loaded.model, image, view=None)  # the app draws on its own display copy
    with loaded.lock:
        out = explain(
            loaded.model, prepared, [list(targets)], maps=maps, method=method, device=loaded.device, contrast=contrast
        )
    return out, time.perf_counter() - t0


#: Random draws of other classes' channels against which a group's knockout is compared.
KNOCKOUT_DRAWS = 10


def knockout_locked(loaded: LoadedModel, image: Image.Image, target: int) -> dict[str, float]:
    """How far ``target``'s FC- and MC-head logits drop on this image when its channel group is zeroed,
    against as many random channels of other classes (mean of :data:`KNOCKOUT_DRAWS` draws), under the lock."""
    x = prepare(loaded.model, image, view=None).x[None].to(loaded.device)
    with loaded.lock:
        drops = group_knockout(
            loaded.model, x, [int(target)], draws=KNOCKOUT_DRAWS, generator=torch.Generator().manual_seed(0)
        )
    return {k: float(v[0]) for k, v in drops.items()}


def knockout_note(drops: dict[str, float], xi: int) -> str:
    """The group's knockout as one line of the group heading."""
    return (
        f"knockout: zeroing these {xi} channels drops the FC logit by {drops['fc_own']:.2f} "
        f"({xi} random channels of other classes: {drops['fc_random']:.2f}) and the MC logit by "
        f"{drops['mc_own']:.2f} ({drops['mc_random']:.2f})"
    )


#: The second model the compare view offers first: the default's CE-only twin.
COMPARE_DEFAULT = "ce-baseline.safetensors"


def compare_choices(first: Path | None) -> list[Path]:
    """Second models to offer beside ``first``: the checkpoints in its folder, then the project's, without
    ``first``; the CE-only twin (:data:`COMPARE_DEFAULT`) of ``first``'s folder leads when there is one.
    ``first`` None (an uploaded model): the project's checkpoints, its twin first."""
    seen, out = ({Path(first).resolve()} if first is not None else set()), []
    home = project_checkpoints() if first is None else Path(first).parent
    for folder in (home, project_checkpoints()):
        for p in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            if p.is_file() and p.resolve() not in seen:
                seen.add(p.resolve())
                out.append(p)
    return sorted(out, key=lambda p: not (p.name == COMPARE_DEFAULT and p.parent == home))


#: Characters Streamlit's Markdown acts on inside a line: escapes, code, emphasis, links and images, strikethrough,
#: math, tables, and the ``:``, ``.`` and ``@`` of bare URLs, ``www.`` names and e-mail addresses, which it would
#: turn into links (``<``, ``>`` and ``&`` are HTML-escaped first).
_MARKDOWN = re.compile(r"([\\`*_\[\]~$|:.@])")
_WWW = re.compile(r"(?i)\bwww(?=\\\.)")
_SCHEME_COLON = re.compile(r"\\:(?=\S)")


def text(value: object) -> str:
    """``value`` as literal text inside one line of the app's Markdown (and its HTML, where a heading allows it):
    line breaks become spaces, HTML is escaped, then every inline Markdown mark is backslashed. Class names and
    file names are data from files: a checkpoint's names must never become markup, links or requests."""
    line = _MARKDOWN.sub(r"\\\1", html.escape(" ".join(str(value).splitlines()), quote=True))
    # GFM finds bare URLs, www. names and e-mail addresses after escapes are resolved: a word joiner (U+2060,
    # invisible) after each ``:`` that something follows (a URL's scheme; not "file.jpg: reason", which a copy
    # of the message should take as it reads), ``@`` and ``www`` keeps them text
    line = _SCHEME_COLON.sub("\\:\u2060", line).replace("\\@", "\\@\u2060")
    return _WWW.sub("\\g<0>\u2060", line)


def compare_heading(label: str, expl: Explanation, group: GroupMaps, k: int = 3) -> str:
    """The compare row's heading: the second model, its probabilities for the class, and its own top-k."""
    order = np.argsort(-expl.probs_fc, kind="stable")[:k]
    top = ", ".join(f"{text(expl.class_name(int(i)))} {expl.probs_fc[i]:.2f}" for i in order)
    return (
        f"##### {text(label)} <span style='color:#888;font-size:0.8em'>— the same class, {text(group.name)} · FC {group.prob:.2f} "
        f"· MC {group.prob_mc:.2f} · its top-{k}: {top}</span>"
    )


#: Patches per channel in the app's atlas of the gallery.
ATLAS_TOP = 8


def gallery_atlas(loaded: LoadedModel, gallery: Gallery, target: int) -> tuple[np.ndarray, str] | None:
    """The contact sheet of ``target``'s channels over the gallery (their top :data:`ATLAS_TOP` patches,
    labelled with the part under each peak) and a one-line summary; None when no sample is a class of the
    model. Computed under the model's lock."""
    names = list(loaded.model.class_names)
    kept = [smp for smp in gallery.samples if smp.class_name in names]
    if not kept:
        return None
    inputs = AtlasInputs([str(smp.path) for smp in kept], [names.index(smp.class_name) for smp in kept],
                         [smp.keypoints for smp in kept], list(gallery.part_names))  # fmt: skip
    with loaded.lock:
        summary = build_atlas(loaded.model, inputs, classes=[int(target)], top=min(ATLAS_TOP, len(kept)),
                              batch_size=8, device=loaded.device, noise=None)  # fmt: skip
    name = names[int(target)]
    rows = summary["classes"][name]["channels"]
    parts = ", ".join(
        f"ch {r['position']}: {r['part']} ({round(r['purity'] * len(r['top']))}/{len(r['top'])})" if r["part"] else f"ch {r['position']}: –"
        for r in rows
    )
    return contact_sheet(summary, name), f"Across the {len(kept)} gallery images: {parts}"


# -------------------------------------------------------------------------------------------- gallery


class GalleryError(MclossError, ValueError):
    """The gallery index cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Sample:
    """One gallery image with its ground truth."""

    path: Path
    label: int
    class_name: str
    keypoints: np.ndarray = field(compare=False)  # [P, 3] (x, y, visible) in original pixels
    mask: Path | None = None  # part label map (0 none, i part i, P + 1 body), when the index names one

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
    """Read ``index.json`` of a samples folder (entries: ``file``, ``label``, ``class_name``, ``parts``
    [P, 3] keypoints and, optionally, ``mask``: a part label map PNG).

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
            mask = folder / str(entry["mask"]) if entry.get("mask") else None
            if mask is not None and not mask.is_file():
                raise GalleryError(f"{index}: sample {i} mask {entry['mask']!r} is missing")
            samples.append(Sample(path, int(entry["label"]), str(entry["class_name"]), kps, mask))
    except GalleryError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GalleryError(f"{index}: malformed gallery index ({type(exc).__name__}: {exc})") from None
    if not samples:
        raise GalleryError(f"{index}: the gallery has no samples")
    return Gallery(folder, part_names, tuple(samples))


# ---------------------------------------------------------------------------------------------- input


def upload_error(name: str, size: int, limit_mb: int) -> str | None:
    """The one-line refusal of an upload of ``size`` bytes over ``limit_mb`` MB (as the uploader counts
    them, 2^20 bytes), or None when it fits; checked on the server before the bytes are used."""
    if size <= limit_mb * 1024 * 1024:
        return None
    return f"{name}: upload too large ({size / 2**20:.1f} MB, limit {limit_mb} MB)"


def upload_record(name: str, size: int, read: Callable[[], bytes]) -> dict:
    """What the app keeps of an image upload: ``{"name", "data", "error"}``; an upload over
    :data:`MAX_UPLOAD_MB` keeps no bytes (``read`` is not called) and carries its refusal instead."""
    error = upload_error(name, size, MAX_UPLOAD_MB)
    return {"name": name, "data": b"" if error else read(), "error": error}


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


#: The page draws an image whose shorter side is under this many pixels on a copy enlarged by whole pixels, so
#: that its maps, peak rings and marks have room (a 1 × 1 upload drew each map as one pixel under a ring).
PAGE_MIN_SIDE = 160


def page_image(view: np.ndarray, min_side: int = PAGE_MIN_SIDE, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """The copy the page draws on: ``view`` with each pixel repeated n × n (nearest: the image's own pixels, as
    blocks) for the smallest n that brings its shorter side to ``min_side``, its longer side staying within
    ``max_side``; ``view`` itself when it is large enough. The downloads draw on ``view``, as ``mcloss export``
    draws on the image."""
    h, w = view.shape[:2]
    n = min(-(-min_side // min(h, w)), max_side // max(h, w))
    return view if n <= 1 else np.repeat(np.repeat(view, n, axis=0), n, axis=1)


# ---------------------------------------------------------------------------------------------- maps


def sample_annotations(
    sample: Sample, part_names: Sequence[str], image_size: tuple[int, int]
) -> tuple[PartAnnotations, str | None]:
    """A gallery sample's part annotations (keypoints, and its label map when it has a usable one), and a
    note when its mask could not be used (then the keypoints stand in)."""
    labels, note = None, None
    if sample.mask is not None:
        try:
            labels = read_label_map(sample.mask, len(part_names))
        except DatasetError as exc:
            note = f"part mask not used ({exc}); regions from the keypoints"
        else:
            if labels.shape != (image_size[1], image_size[0]):
                note = (
                    f"part mask {sample.mask.name} is {labels.shape[1]}×{labels.shape[0]} px, the image "
                    f"{image_size[0]}×{image_size[1]}: regions from the keypoints"
                )
                labels = None
    return PartAnnotations(tuple(part_names), sample.keypoints, labels), note


def defining_caption(summary: DefiningSummary, from_masks: bool, radius_px: float | None = None) -> str:
    """How the picture's regions were found (the image caption)."""
    how = "part masks" if from_masks else f"keypoints within {radius_px:.0f} px" if radius_px else "keypoints"
    return f"defining parts of {summary.class_name}: {join_names(summary.parts)} · regions from the {how}"


def defining_note(summary: DefiningSummary) -> str:
    """The markdown beside the picture (or alone, when the image's parts are not located): the defining
    parts, where the figure comes from, and the ratio sentence."""
    names = join_names([f"**{text(p)}**" for p in summary.parts])
    lines = [f"Defining parts of **{text(summary.class_name)}**: {names}."]
    if summary.regions is not None and not summary.indices:
        lines[0] += " None of them is among this image's annotated parts, so they are not marked."
    elif not summary.located:
        lines[0] += " Where they are in this image is unknown (no part annotations), so they are not marked."
    if summary.located and summary.source != SOURCE_IMAGE:
        lines.append("No figure on this image: the network sees no defining part, or no other part, or empty maps.")
    sentence = summary.sentence
    lines.append(text(sentence) if sentence else "The checkpoint's card records no fresh-set mass ratio for this class.")
    return "\n\n".join(lines)


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
    radius: float = metrics.DEFAULT_HIT_RADIUS,
) -> tuple[list[ChannelPart], float]:
    """Nearest visible part of each channel peak and whether it lies within ``radius × max(W, H)``.

    Uses :mod:`mcloss.metrics.localization` (the same definitions as ``mcloss parts``). Returns the per-channel rows and
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


def _gradient_css(colormap: str, stops: int = 17) -> str:
    """A CSS linear gradient through ``stops`` entries of the colormap's lookup table, left to right as the
    overlays map the bottom of their scale (0, or -s if signed) to its top."""
    lut = render.colormap_lut(colormap)
    at = np.linspace(0, 255, stops).round().astype(int)
    colours = ", ".join(f"rgb({r},{g},{b}) {100 * i / 255:.1f}%" for i, (r, g, b) in zip(at, lut[at].tolist(), strict=True))
    return f"linear-gradient(to right, {colours})"


def colour_scales(colormap: str, shared_scale: bool, maps: Sequence[str]) -> str:
    """HTML for the sidebar: a bar of the colormap with what its ends mean under the display controls, and
    the diverging bar when a signed map (Guided Grad-CAM) is shown."""
    reach = (
        "the channel group's maximum for a class's channels, CCMP and parts; one maximum for its per-channel "
        "Grad-CAM; every other map to its own maximum"
        if shared_scale
        else "each map's own maximum"
    )
    bars = [(_gradient_css(colormap), f"Colour scale: 0 (left) to {reach} (right)")]
    signed = [k.label for k in map(kinds.get, maps) if k.signed]
    if signed:
        scale = f"the {render.SIGNED_CLIP_PERCENTILE:g}th percentile of |map|"
        bars.append((_gradient_css(render.DIVERGING), f"{' and '.join(signed)}: \u2212s through 0 to +s, s {scale}"))
    return "".join(
        f"<div role='img' aria-label='{html.escape(words, quote=True)}' style='height:10px;"
        f"border-radius:2px;background:{css}'></div><div style='color:#888;font-size:0.8em;margin:2px 0 8px'>"
        f"{html.escape(words)}</div>"
        for css, words in bars
    )


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


# ---------------------------------------------------------------------------------------- why A, not B

#: The maps of the "Why A, not B?" view, from one pass (targets A and B, ``contrast=B``): A's Grad-CAM for
#: reference, Finer-CAM of A against B alone, and the group contrast of A's group against B's.
WHY_MAPS = ("channels", "gradcam", "finer", "contrast")

GRADCAM_NOTE = "Plain Grad-CAM of A, for reference: evidence for A, including the parts A shares with B."
FINER_NOTE = (
    "Finer-CAM explains the FC head's preference for A over B: Grad-CAM of A's logit minus B's (B the only "
    "reference), so evidence both classes share cancels out."
)
CONTRAST_NOTE = (
    "The group contrast shows where A's channels respond and B's do not (each group over its maximum; A's "
    "channels that B's group also covers drop out). No gradient, no head."
)


def closest_classes(probs_fc: np.ndarray, target: int) -> list[int]:
    """Every other class, the one whose FC-head logit is nearest ``target``'s first (what ``contrast="auto"``
    picks as class B), then ``target`` itself.

    Read from the probabilities: ``log p_i − log p_t = logit_i − logit_t``, so the order is the logits' own.
    """
    p = np.asarray(probs_fc, np.float64)
    log_p = np.log(np.clip(p, np.finfo(np.float64).tiny, None))
    return [*nearest_classes(log_p, int(target), len(p) - 1), int(target)]


@dataclass(frozen=True)
class PartsContrast:
    """Which defining parts two classes share and which tell them apart (names as the card lists them).

    Attributes:
        a, b: the two classes.
        shared: parts defining for both (in A's order).
        only_a, only_b: parts defining for one of them only.
    """

    a: str
    b: str
    shared: tuple[str, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]

    @property
    def differing(self) -> tuple[str, ...]:
        """The parts that tell A from B (defining for exactly one of the two), A's first."""
        return self.only_a + self.only_b

    def indices(self, part_names: Sequence[str]) -> tuple[list[int], list[int]]:
        """(shared, differing) 0-based indices into an image's ``part_names`` (a region covers its parts)."""
        shared = defining_indices(self.shared, part_names)
        differing = [i for i in defining_indices(self.differing, part_names) if i not in shared]
        return shared, differing


def parts_contrast(card: Mapping | None, a: str, b: str) -> PartsContrast | None:
    """What the card's ``defining_parts`` say about A against B; None when it does not list both classes."""
    table = card.get("defining_parts") if isinstance(card, Mapping) else None
    if not isinstance(table, Mapping) or not all(isinstance(table.get(c), (list, tuple)) for c in (a, b)):
        return None
    pa, pb = [str(p) for p in table[a]], [str(p) for p in table[b]]
    return PartsContrast(
        a, b, tuple(p for p in pa if p in pb), tuple(p for p in pa if p not in pb), tuple(p for p in pb if p not in pa)
    )


def _parts_lists(pc: PartsContrast, esc: Callable[[object], str]) -> tuple[str, str]:
    """(shared, tell apart) as words, each name passed through ``esc``."""
    shared = join_names([esc(p) for p in pc.shared]) if pc.shared else "none"
    sides = [
        f"{join_names([esc(p) for p in parts])} ({esc(name)})" for parts, name in ((pc.only_a, pc.a), (pc.only_b, pc.b)) if parts
    ]
    return shared, ", ".join(sides) if sides else "none (the card lists the same defining parts for both)"


def parts_contrast_note(pc: PartsContrast) -> str:
    """The parts in one Markdown line (names escaped): ``Shared: head · Tell apart: belly (A), tail (B)``."""
    shared, apart = _parts_lists(pc, text)
    return f"Shared: {shared} · Tell apart: {apart}"


def parts_caption(pc: PartsContrast, how: str) -> str:
    """The caption (plain text: the app escapes every image caption with :func:`text`, as Streamlit renders them
    as Markdown) of the picture of the parts that tell A from B (orange) and the parts they share (blue); ``how``:
    where the regions come from."""
    shared, apart = _parts_lists(pc, str)
    return f"tell apart (orange): {apart} · shared (blue): {shared} · regions from the {how}"


#: The maps whose preference for the parts that tell A from B the view states, in its order.
_RATIO_MAPS = (("contrast", "group contrast"), ("finer", "Finer-CAM"), ("gradcam", "Grad-CAM of A"), ("ccmp", "CCMP of A"))


def tell_apart_ratios(
    group: GroupMaps, geometry, regions: np.ndarray, shared: Sequence[int], differing: Sequence[int], num_parts: int
) -> dict[str, float]:
    """Each of A's maps' mass per area on the parts that tell A from B ÷ on the parts they share, on this image
    (:func:`mcloss.metrics.mass.mass_ratio` with ``others``, as ``mcloss parts --contrast`` scores it); maps
    without a finite ratio (a kind of part not visible, no mass) are left out."""
    out = {}
    for name, label in _RATIO_MAPS:
        m = group.ccmp if name == "ccmp" else group.maps.get(name)
        if m is None:
            continue
        values = np.clip(to_original(m, geometry), 0, None)
        ratio = mass.mass_ratio(values, regions, differing, num_parts, others=shared)
        if np.isfinite(ratio):
            out[label] = float(ratio)
    return out


def tell_apart_note(ratios: dict[str, float]) -> str | None:
    """The ratios in one sentence, or None without any."""
    if not ratios:
        return None
    listed = ", ".join(f"{label} {format_ratio(r)}" for label, r in ratios.items())
    return (
        f"On this image, mass per area on the parts that tell them apart ÷ on the shared parts: {listed} "
        "(1× = no preference)."
    )


def why_heading(group: GroupMaps, role: str, channels: str) -> str:
    """A group's heading in the "Why A, not B?" view (HTML allowed; the name is escaped)."""
    return (
        f"#### {text(group.name)} <span style='color:#888;font-size:0.8em'>— {role} · FC {group.prob:.2f} · "
        f"MC {group.prob_mc:.2f} · channels {channels}</span>"
    )


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
        return True, f"Both heads predict **{text(class_names[p])}** (FC {fc[p]:.2f} · MC {mc[q]:.2f})."
    return False, (
        f"The heads disagree: FC → **{text(class_names[p])}** ({fc[p]:.2f}), MC → **{text(class_names[q])}** ({mc[q]:.2f})."
    )


def domain_note(explanation: Explanation) -> tuple[str, str]:
    """(level, Markdown) of the image's domain check: ``"warning"`` when the image is outside what the model
    was trained on, ``"ok"`` inside, ``"unavailable"`` when the checkpoint has no domain statistics."""
    verdict = explanation.domain
    if verdict is None:
        return "unavailable", "Domain check unavailable: this checkpoint holds no domain statistics (`mcloss domain` adds them)."
    numbers = f"domain score {verdict.score:.4f}, threshold {verdict.threshold:.4f}"
    if verdict.in_domain:
        return "ok", f"In the domain the model was trained on ({numbers})."
    return "warning", (
        f"**This image looks unlike anything the model was trained on** ({numbers}: 95 % of held-out training-domain "
        "images score below it). Its prediction and maps describe how the model reacts to it, not a class it knows."
    )


def without_contrast(group: GroupMaps) -> GroupMaps:
    """``group`` without its contrastive maps: the "Why A, not B?" view contrasts A with B only, so its downloads
    draw B's row without the maps an explanation with ``contrast=B`` gives B (against classes the page never names)."""
    drop = {k.name for k in kinds.kinds() if k.contrastive}
    return dataclasses.replace(
        group,
        maps={k: v for k, v in group.maps.items() if k not in drop},
        map_peaks={k: v for k, v in group.map_peaks.items() if k not in drop},
        versus=None,
    )


def download_record(
    loaded: LoadedModel,
    style: render.Style,
    *,
    maps: Sequence[str],
    method: str,
    topk: int,
    contrast: str | None = None,
    compare: Comparison | None = None,
) -> dict:
    """The ``options`` the app's ZIP records in its json: what made the files, under the keys ``mcloss export``
    records them by where they mean the same (the checkpoint's sha256, the maps, the drawing settings, topk,
    method), plus the checkpoint's name, the drawing settings only the app offers, and ``made_by``."""
    extra = {} if compare is None else {"compare": compare.titles[1], "compare_sha256": compare.sha256}
    return {
        "made_by": "mcloss app",
        "checkpoint": loaded.label,
        "checkpoint_sha256": loaded.sha256,
        **extra,
        "maps": list(maps),
        **({} if contrast is None else {"contrast": contrast}),
        "colormap": style.colormap,
        "alpha": style.alpha,
        "shared_scale": style.shared_scale,
        "tile_height": style.tile_height,
        "interpolation": style.interpolation,
        "peaks": style.peaks,
        "topk": topk,
        "method": method,
    }


def download_montage(
    name: str,
    base: np.ndarray,
    explanation: Explanation,
    groups: Sequence[GroupMaps],
    style: render.Style,
    *,
    label: int | None = None,
    compare: Comparison | None = None,
) -> np.ndarray:
    """The montage download: one row per shown class (with ``compare``, both models' rows, as ``mcloss export
    --compare`` draws them), each the montage :func:`export_zip` writes for it, header and label included."""
    shown = explanation.with_groups(groups, label=label, source=name)
    if compare is None:
        rows = [shown.montage(i, style, image=base) for i in range(len(groups))]
    else:
        rows = [render.compare_montage(base, shown, compare.explanation, i, style, compare.titles) for i in range(len(groups))]
    return render.stacked_rows(rows)


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
    defining: Sequence[DefiningSummary | None] | None = None,
    options: dict | None = None,
    input: dict | None = None,  # noqa: A002 (the json's key)
    compare: Comparison | None = None,
) -> bytes:
    """A ZIP of every shown overlay (``overlays/*.png``) plus what ``mcloss export`` writes for the shown
    classes (``export/<name>.png|.npz|.json``, via :meth:`mcloss.Explanation.save`); ``defining``: the shown
    classes' defining-part summaries, one per group, for the json; ``options`` and ``input``: the json's record of
    what made the files (:func:`download_record`) and of the image; ``compare``: the second model, as
    ``mcloss export --compare`` writes it (both models in each montage, its maps and record beside)."""
    shown = explanation.with_groups(groups, label=label, source=name)
    stem = sanitize_component(name)
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="mcloss-app-") as tmp, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        shown.save(Path(tmp) / stem, style, topk=topk, image=base, defining=defining, options=options, input=input, compare=compare)
        for f in sorted(Path(tmp).iterdir()):
            zf.write(f, f"export/{f.name}")
        for cls, cls_tiles in tiles.items():
            for t in cls_tiles:
                zf.writestr(f"overlays/{sanitize_component(cls)}_{t.slug}.png", encode_image(t.image))
    return buf.getvalue()
