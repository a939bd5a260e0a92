"""mcloss channel explorer: what each class's channel group sees, next to Grad-CAM, and why one class and not
another (Finer-CAM and the group contrast, in the "Why A, not B?" view).

Run: ``streamlit run app/streamlit_app.py``. ``MCLOSS_CHECKPOINT`` overrides the default checkpoint
(the project's ``checkpoints/default.safetensors``), ``MCLOSS_SAMPLES`` the gallery folder (``checkpoints/samples``).

The model is loaded once per checkpoint (``st.cache_resource``) and every call into it holds that
model's lock, so concurrent sessions are safe. Explanations are cached (``st.cache_data``) by image bytes,
checkpoint and classes: display controls re-render from the cached maps without running the model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import altair as alt
import pandas as pd
import streamlit as st
import torch

_APP_DIR = str(Path(__file__).resolve().parent)
if _APP_DIR not in sys.path:
    sys.path.insert(0, _APP_DIR)

import view  # noqa: E402

from mcloss.core.checkpoint import CheckpointError  # noqa: E402
from mcloss.core.device import resolve_device  # noqa: E402
from mcloss.core.errors import first_line  # noqa: E402
from mcloss.data.annotations import PartAnnotations  # noqa: E402
from mcloss.data.io import DEFAULT_QUALITY, IMAGE_FORMATS, ImageLoadError, encode_image  # noqa: E402
from mcloss.explainability import kinds, render  # noqa: E402
from mcloss.explainability.defining import (  # noqa: E402
    DefiningSummary,
    defining_summary,
    has_defining_parts,
    part_regions,
)
from mcloss.explainability.explanation import Explanation, GroupMaps  # noqa: E402
from mcloss.explainability.gradcam import GRADCAM_METHODS  # noqa: E402
from mcloss.explainability.outputs import Comparison  # noqa: E402
from mcloss.metrics.localization import DEFAULT_HIT_RADIUS, hit_radius  # noqa: E402

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

__all__ = ["main"]

log = logging.getLogger("mcloss.app")

UPLOAD_CHOICE = "Upload a checkpoint…"
TOPK = 5
#: The two views under the prediction panel.
GROUPS_VIEW = "Channel groups"
WHY_VIEW = "Why A, not B?"


def _configure_threads() -> None:
    """CPU threads for inference: ``MCLOSS_APP_THREADS`` (default 1).

    One intra-op thread per inference: batch-1 explanations gain little from more, and on a small shared
    machine OpenMP threads that wait on busy cores make a call up to ~20× slower (measured on 2 cores).
    """
    try:
        threads = max(1, int(os.environ.get("MCLOSS_APP_THREADS", "1")))
    except ValueError:
        threads = 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@st.cache_resource(max_entries=4, show_spinner=False)
def _load_model(key: str, path: str, label: str) -> view.LoadedModel:
    """Load and validate a checkpoint once per process (``key`` changes when the file does)."""
    return view.load_model(path, label, key, resolve_device("auto"))


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"


@st.cache_resource(max_entries=2, show_spinner=False)
def _load_uploaded(
    key: str, label: str, _data: bytes, names: tuple[str, ...] | None, prefix: str | None
) -> view.LoadedModel:
    """Load (or import) uploaded checkpoint bytes once per content hash, names and key prefix (``key``); no
    copy stays on disk."""
    return view.load_uploaded(_data, label, key, resolve_device("auto"), names, prefix)


def sidebar_model() -> view.LoadedModel | None:
    """Model section: choose, load and describe a checkpoint; errors go to st.error."""
    st.sidebar.subheader("Model")
    default = view.default_checkpoint()
    choices = [str(p) for p in view.list_checkpoints(default)] + [UPLOAD_CHOICE]

    def label(c: str) -> str:
        if c == UPLOAD_CHOICE:
            return c
        name = Path(c).name
        return f"{name} (default)" if c == str(default) else name

    choice = st.sidebar.selectbox("Checkpoint", choices, format_func=label, key="checkpoint")
    try:
        if choice == UPLOAD_CHOICE:
            up = st.sidebar.file_uploader(
                "Checkpoint file (.safetensors, or a .pth / .pt / .ckpt state dict to import)",
                type=["safetensors", "pth", "pt", "ckpt"], key="ckpt_upload", max_upload_size=view.MAX_CHECKPOINT_MB,
            )  # fmt: skip
            if up is None:
                st.sidebar.info(
                    f"Upload an mcloss `.safetensors` checkpoint, or a state dict saved by the official MC-Loss "
                    f"scripts, FGVCLib, Kurumi233's code or torchvision, also inside a Lightning `.ckpt` (up to {view.MAX_CHECKPOINT_MB} MB; import a "
                    "larger file with `mcloss import` first, which leaves out FGVCLib's unused classifier)."
                )
                return None
            too_large = view.upload_error(up.name, up.size, view.MAX_CHECKPOINT_MB)
            if too_large:
                raise CheckpointError(too_large)
            names, prefix = _import_options() if Path(up.name).suffix.lower() in view.IMPORT_SUFFIXES else (None, None)
            data = up.getvalue()
            digest = hashlib.sha256(data).hexdigest()
            key = f"sha256:{digest}:{hashlib.sha256(repr((names, prefix)).encode()).hexdigest()[:16]}"
            with st.spinner(f"Loading {view.text(up.name)}…"):
                return _described(_load_uploaded(key, up.name, data, names, prefix))
        else:
            p = Path(choice)
            if not p.is_file():
                raise CheckpointError(
                    f"{p}: no such checkpoint file (train one with `mcloss train`, set MCLOSS_CHECKPOINT, "
                    "or upload one)"
                )
            key, path, shown = _file_key(p), str(p), p.name
        with st.spinner(f"Loading {view.text(shown)}…"):
            return _described(_load_model(key, path, shown))
    except CheckpointError as exc:
        st.sidebar.error(f"Checkpoint not usable: {view.text(exc)}")
        return None
    except Exception as exc:
        log.exception("checkpoint load failed")
        st.sidebar.error(f"Could not load the checkpoint: {type(exc).__name__}: {first_line(exc)}")
        return None


def _import_options() -> tuple[tuple[str, ...] | None, str | None]:
    """What goes with an imported state dict: the optional class-names file (None: ``class_000``, …) and the
    optional key prefix (None: the keys as saved, or a prefix they all share)."""
    up = st.sidebar.file_uploader(
        "Class names (optional: a text file, one per line, in the source's class order)", type=["txt"],
        key="names_upload", max_upload_size=1,
    )  # fmt: skip
    prefix = st.sidebar.text_input(
        "Key prefix (optional)", key="prefix_upload", placeholder="e.g. model_ema.", max_chars=200,
        help="As `mcloss import --prefix`: read only the keys under this prefix, where the file holds more than "
        "the model (an EMA copy, a loss's weights); the message says which prefixes fit.",
    ).strip() or None  # fmt: skip
    if up is None:
        return None, prefix
    too_large = view.upload_error(up.name, up.size, 1)
    if too_large:
        raise CheckpointError(too_large)
    return tuple(view.read_names(up.getvalue(), up.name)), prefix


def sidebar_compare(first: view.LoadedModel | None) -> view.LoadedModel | None:
    """A second checkpoint with the same classes, shown under each group (off by default)."""
    if first is None or not st.sidebar.toggle("Compare with a second model", value=False, key="compare_model_on"):
        return None
    chosen = st.session_state.get("checkpoint")
    first_path = Path(chosen) if chosen and chosen != UPLOAD_CHOICE else None  # an upload excludes no file
    options = [str(p) for p in view.compare_choices(first_path)]
    if not options:
        st.sidebar.info("No second checkpoint found beside this one or in checkpoints/.")
        return None
    choice = st.sidebar.selectbox(
        "Second model", options, format_func=lambda c: Path(c).name, key="compare_checkpoint",
        help="the CE-only twin (ce-baseline.safetensors) by default: the same model trained without MC-Loss",
    )  # fmt: skip
    try:
        p = Path(choice)
        with st.spinner(f"Loading {view.text(p.name)}…"):
            second = _load_model(_file_key(p), str(p), p.name)
    except CheckpointError as exc:
        st.sidebar.error(f"Second model not usable: {view.text(exc)}")
        return None
    if list(second.model.class_names) != list(first.model.class_names):
        st.sidebar.warning(f"{view.text(Path(choice).name)} has other classes than {view.text(first.label)}: nothing to compare.")
        return None
    return second


def _described(loaded: view.LoadedModel) -> view.LoadedModel:
    """Caption the loaded model in the sidebar."""
    m = loaded.model
    xi = sorted(set(m.groups))
    feat = m.config.get("feature_hw") or ["?", "?"]
    st.sidebar.caption(
        f"{m.config['backbone']} · {m.num_classes} classes · ξ = {'/'.join(map(str, xi))} · "
        f"input {m.config['img_size']} px · maps {feat[0]}×{feat[1]}"
    )
    source = m.card.get("source") if m.card.get("imported") else None
    if isinstance(source, dict):
        st.sidebar.caption(
            f"imported from {view.text(source.get('layout'))} ({view.text(source.get('file'))}) · no training record · "
            f"input {view.text(m.card.get('transform_preset', '?'))}"
        )
        assumed = source.get("assumed")  # the card is the file's metadata: read, never trusted to be well formed
        for said in assumed if isinstance(assumed, list) else []:
            st.sidebar.warning(f"Assumed: {view.text(said)}")
    return loaded


def device_caption(device: torch.device) -> str:
    """The device in words."""
    if device.type == "cuda":
        return f"CUDA · {torch.cuda.get_device_name(device)}"
    n = torch.get_num_threads()
    return f"CPU · {n} thread{'s' if n > 1 else ''}"


# --------------------------------------------------------------------------------------------- input


def _on_upload() -> None:
    """File-uploader callback: keep the bytes (the app reads ``st.session_state['upload']``)."""
    f = st.session_state.get("uploader")
    st.session_state["upload"] = None if f is None else view.upload_record(f.name, f.size, f.getvalue)


@st.cache_data(max_entries=4, show_spinner=False)
def _gallery(folder: str, mtime_ns: int) -> view.Gallery:
    return view.load_gallery(Path(folder))


def sidebar_input() -> dict | None:
    """Input section: a gallery sample or an upload, as {"name", "data", "sample"}."""
    st.sidebar.subheader("Image")
    gallery, gallery_error = None, None
    folder = view.samples_dir()
    index = folder / "index.json"
    if index.is_file():
        try:
            gallery = _gallery(str(folder), index.stat().st_mtime_ns)
        except view.GalleryError as exc:
            gallery_error = str(exc)
    sources = (["Gallery"] if gallery else []) + ["Upload"]
    source = st.sidebar.segmented_control("Source", sources, default=sources[0], key="source", required=True)
    if gallery_error:
        st.sidebar.warning(f"Gallery unavailable: {gallery_error}")
    if source == "Gallery" and gallery:
        # the uploader is not drawn here, so Streamlit drops its file: drop the bytes kept from it too, or the
        # page would go on explaining an upload that an empty uploader no longer shows
        st.session_state.pop("upload", None)
        i = st.sidebar.selectbox(
            "Sample (with ground-truth parts)",
            range(len(gallery.samples)),
            format_func=lambda j: gallery.samples[j].title,
            key="sample",
        )
        sample = gallery.samples[i]
        return {"name": sample.path.name, "data": sample.path.read_bytes(), "sample": sample, "gallery": gallery}
    st.sidebar.file_uploader(
        "Image",
        type=list(view.IMAGE_TYPES),
        key="uploader",
        on_change=_on_upload,
        max_upload_size=view.MAX_UPLOAD_MB,
        label_visibility="collapsed",
    )
    st.sidebar.caption(
        f"PNG, JPEG, WebP, BMP, TIFF, GIF (first frame) · up to {view.MAX_UPLOAD_MB} MB and "
        f"{view.MAX_PIXELS // 1_000_000} MP · shown downscaled to {view.DISPLAY_MAX_SIDE} px"
    )
    up = st.session_state.get("upload")
    if up is None:
        return None
    return {"name": up["name"], "data": up["data"], "error": up.get("error"), "sample": None, "gallery": None}


def sidebar_controls() -> tuple[render.Style, dict]:
    """Display controls (re-render only) and extra-map options (part of the explanation's cache key)."""
    st.sidebar.subheader("Display")
    colormap = st.sidebar.selectbox("Colormap", view.COLORMAPS, key="colormap")
    alpha = st.sidebar.slider("Heatmap opacity (alpha)", 0.0, 1.0, 0.5, 0.05, key="alpha")
    scale = st.sidebar.segmented_control(
        "Scale", ["per map", "shared group"], default="per map", key="scale", required=True,
        help="shared group: one maximum for the class's channels, so their strengths compare",
    )
    scale_bar = st.sidebar.container()  # the colour scale under the scale it reads, drawn once the maps are chosen
    upsampling = st.sidebar.segmented_control(
        "Upsampling", ["bilinear", "nearest"], default="bilinear", key="upsampling", required=True,
        help="nearest shows the raw feature cells",
    )
    peaks = st.sidebar.toggle("Peak markers", value=True, key="peaks")
    with st.sidebar.expander("More maps"):
        maps = kinds.default_names() + tuple(
            k.name for k in view.optional_kinds() if st.toggle(view.kind_label(k), value=False, key=view.toggle_key(k))
        )
        method = st.radio(
            "Grad-CAM engine", list(GRADCAM_METHODS), key="method", horizontal=True,
            help="fused: gradients of the same forward pass; captum: Captum LayerGradCam (the reference)",
        )
        radius = st.number_input(
            "Part hit radius (× image size)", 0.01, 1.0, DEFAULT_HIT_RADIUS, 0.01, key="radius",
            help="a channel peak hits a ground-truth part within this fraction of max(width, height)",
        )
    scale_bar.markdown(view.colour_scales(colormap, scale == "shared group", maps), unsafe_allow_html=True)
    style = view.style_for(colormap, float(alpha), scale == "shared group", bool(peaks), upsampling == "nearest")
    return style, {"maps": maps, "method": method, "radius": float(radius)}


# ----------------------------------------------------------------------------------------- pipeline


#: Images whose decoded pixels stay cached: a session looks at one image at a time, and a decoded photo can take
#: 120 MB (:data:`view.MAX_PIXELS`).
DECODED_CACHE = 4
#: Explanations kept (~130 KB each on the default checkpoint): every class and "Why A, not B?" pair looked at on
#: the last few images.
EXPLAIN_CACHE = 32


@st.cache_resource(max_entries=DECODED_CACHE, show_spinner=False)
def _decoded(digest: str, name: str, _data: bytes):
    """Decoded image and its display copy (shared read-only)."""
    image = view.decode_image(_data, name)
    return image, view.display_image(image)


@st.cache_data(max_entries=EXPLAIN_CACHE, show_spinner=False)
def _explain(
    model_key: str, digest: str, targets: tuple, method: str, maps: tuple[str, ...], _loaded: view.LoadedModel, _image,
    contrast: int | None = None,
) -> tuple[Explanation, float]:
    """One explanation, cached by checkpoint, image bytes, classes, map options and contrast class, with its
    seconds."""
    return view.explain_locked(_loaded, _image, targets, method=method, maps=maps, contrast=contrast)


# ------------------------------------------------------------------------------------------- layout


def show_tiles(tiles: list[render.Tile], ncols: int | None = None) -> None:
    """A row of images with captions (an image beyond 4:1 either way letterboxed, as in the montage)."""
    cols = st.columns(ncols or len(tiles), gap="small")
    for col, t in zip(cols, tiles, strict=False):
        col.image(render.pad_to_aspect(t.image), caption=view.text(t.caption), width="stretch", alt=t.alt)


def prediction_panel(expl: Explanation, class_names: list[str], base, title: str, label: int | None) -> None:
    """Original image beside the top-k of both heads and their agreement."""
    left, right = st.columns([4, 7], gap="large")
    left.image(render.pad_to_aspect(base), caption=view.text(title), width="stretch", alt="input image")
    with right:
        agree, sentence = view.agreement(expl, class_names)
        level, note = view.domain_note(expl)
        if level == "warning":  # no tick for an image the model does not know
            st.warning(f"{note}\n\n{sentence}", icon=":material/warning:")
        else:
            (st.success if agree else st.warning)(sentence, icon=":material/check_circle:" if agree else ":material/compare_arrows:")
            st.caption(note)
        if label is not None:
            ok = expl.prediction == label
            st.markdown(
                f"Ground truth: **{view.text(class_names[label])}** — FC head {'correct' if ok else 'wrong'}"
                f" · MC head {'correct' if expl.prediction_mc == label else 'wrong'}"
            )
        df = pd.DataFrame(view.topk_rows(expl, class_names, TOPK))
        order = list(dict.fromkeys(df["class"]))
        bars = (
            alt.Chart(df)
            .mark_bar(cornerRadiusEnd=2)
            .encode(
                x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), title="probability"),
                y=alt.Y("class:N", sort=order, title=None, axis=alt.Axis(labelLimit=220)),
                yOffset=alt.YOffset("head:N", sort=["FC head", "MC head"]),
                color=alt.Color(
                    "head:N",
                    scale=alt.Scale(domain=["FC head", "MC head"], range=["#4c78a8", "#f58518"]),
                    legend=alt.Legend(orient="top", title=None),
                ),
                tooltip=["class", "head", alt.Tooltip("probability:Q", format=".3f")],
            )
        )
        text = bars.mark_text(align="left", dx=3, fontSize=11).encode(
            text=alt.Text("probability:Q", format=".2f"), color=alt.value("#333")
        )
        # a step per bar (the heads are offsets within a class): Vega-Lite sizes a band scale by its step, and a fixed
        # height here left 10 px per bar, under the 11 px labels
        st.altair_chart((bars + text).properties(height=alt.Step(15)), width="stretch")


def defining_view(
    expl: Explanation,
    summary: DefiningSummary,
    base,
    annotations: PartAnnotations | None,
    options: dict,
    ncols: int,
    note: str | None,
) -> render.Tile | None:
    """The class's defining parts: marked on the image when its parts are annotated (else named), beside
    how much the maps prefer them; returns the picture's tile (for the downloads), if one was drawn."""
    if not summary.located or annotations is None:
        st.markdown(view.defining_note(summary))
        return None
    from_masks = annotations.labels is not None
    picture = render.draw_defining_parts(
        base, summary.regions, summary.indices, annotations.part_names, None if from_masks else annotations.keypoints
    )
    radius_px = hit_radius(*expl.image_size, options["radius"])
    caption = view.defining_caption(summary, from_masks, radius_px)
    alt = f"defining parts of {summary.class_name} marked on the image"
    left, right = st.columns([2, max(2, ncols - 2)], gap="medium")
    left.image(picture, caption=view.text(caption), width="stretch", alt=alt)
    right.markdown(view.defining_note(summary))
    if note:
        right.caption(note)
    return render.Tile(picture, "defining parts", caption, alt, "defining_parts")


def group_view(
    expl: Explanation,
    group: GroupMaps,
    base,
    style: render.Style,
    sample: view.Sample | None,
    part_names: tuple[str, ...] | None,
    options: dict,
    heading: str,
    defining: tuple[DefiningSummary | None, PartAnnotations | None, str | None] = (None, None, None),
) -> list[render.Tile]:
    """One class's channel group: overlays, CCMP, parts, Grad-CAM, ground-truth hits and, when the card
    knows them, the class's defining parts (``defining``: its summary, the image's annotations, a note)."""
    st.markdown(heading, unsafe_allow_html=True)
    parts = None
    if sample is not None and part_names is not None:
        parts, radius_px = view.channel_parts(group, sample.keypoints, part_names, expl.image_size, options["radius"])
    tiles = render.group_tiles(base, expl, group, style)
    if parts is not None:
        tiles = view.part_captions(tiles, parts)
    show_tiles(tiles)
    extra = []
    for row in render.side_rows(base, expl, group, style):  # the computed kinds montages leave out
        show_tiles(row, ncols=len(tiles))
        extra += row
    if parts is not None:
        hits = sum(p.hit for p in parts)
        distinct = len({p.part for p in parts if p.hit})
        st.caption(
            f"{hits}/{len(parts)} channel peaks on a ground-truth part (within {radius_px:.0f} px = "
            f"{options['radius']:.2f} × image size) · {distinct} distinct parts"
        )
    summary, annotations, note = defining
    if summary is not None:
        marked = defining_view(expl, summary, base, annotations, options, len(tiles), note)
        if marked is not None:
            extra = [*extra, marked]
    return tiles + extra


@st.cache_data(max_entries=64, show_spinner=False)
def _atlas(model_key: str, gallery_folder: str, target: int, _loaded: view.LoadedModel, _gallery: view.Gallery):
    return view.gallery_atlas(_loaded, _gallery, target)


def atlas_panel(loaded: view.LoadedModel, gallery: view.Gallery, group: GroupMaps) -> None:
    """The class's channels across the gallery, each with its top patches (built only when asked for)."""
    label = f"Atlas: where {view.text(group.name)}'s channels fire most across the gallery"
    if not st.toggle(label, value=False, key=f"atlas_{loaded.key[-16:]}_{group.target}"):
        return
    result = _atlas(loaded.key, str(gallery.folder), int(group.target), _loaded=loaded, _gallery=gallery)
    if result is None:
        st.caption("No gallery image is of a class of this checkpoint.")
        return
    sheet, line = result
    st.image(sheet, caption=view.text(line), width="stretch", alt=f"atlas of {group.name}")


def compare_row(second: view.LoadedModel, expl: Explanation, group: GroupMaps, base, style: render.Style) -> list[render.Tile]:
    """The second model's group of the same class, drawn as the first's (one scale with "shared group"); returns
    its tiles (for the downloads)."""
    st.markdown(view.compare_heading(second.label, expl, group), unsafe_allow_html=True)
    tiles = render.group_tiles(base, expl, group, style)
    show_tiles(tiles)
    return tiles


def downloads(
    inputs: Inputs, expl: Explanation, groups: list[GroupMaps], tiles: dict, style: render.Style, options: dict,
    *, maps: tuple[str, ...], defining: list[DefiningSummary | None] | None = None, contrast: str | None = None,
    compare: Comparison | None = None,
) -> None:
    """The montage (PNG, JPEG or WebP) and a ZIP of overlays, raw maps and the export JSON (both built on click);
    with ``compare`` (the second model's explanation of the shown classes), both models in each, as
    ``mcloss export --compare`` writes them."""
    source_name, base, label = inputs.name, inputs.view, inputs.label
    stem = Path(source_name).stem
    row = st.container(horizontal=True)
    chosen = row.segmented_control(
        "Montage format", tuple(IMAGE_FORMATS), default="png", key="montage_format", required=True,
        format_func=lambda f: f.upper(), label_visibility="collapsed",
        help=f"PNG is lossless; JPEG (quality {DEFAULT_QUALITY}, 4:4:4) and WebP are smaller and lossy",
    )  # fmt: skip
    fmt = IMAGE_FORMATS[chosen or "png"]

    def montage() -> bytes:  # one row per class shown (the top-2 compare, A and B): the page's groups
        picture = view.download_montage(source_name, base, expl, groups, style, label=label, compare=compare)
        return encode_image(picture, fmt.name, full_chroma=True)

    def bundle() -> bytes:
        record = view.download_record(
            inputs.loaded, style, maps=maps, method=options["method"], topk=TOPK, contrast=contrast, compare=compare
        )
        made_from = {"name": source_name, "size": inputs.size, "sha256": inputs.digest}
        return view.export_zip(
            source_name, base, expl, groups, style, tiles, label=label, topk=TOPK, defining=defining, options=record,
            input=made_from, compare=compare,
        )

    row.download_button(
        f"Montage ({fmt.name.upper()})", montage, file_name=f"{stem}_montage{fmt.suffix}", mime=fmt.mime,
        icon=":material/image:", on_click="ignore", key="dl_montage", help=view.MONTAGE_HELP,
    )
    row.download_button(
        "Everything (ZIP)", bundle, file_name=f"{stem}_mcloss.zip", mime="application/zip",
        icon=":material/folder_zip:", on_click="ignore", key="dl_zip",
        help="every overlay (PNG), plus the montage, raw maps (NPZ) and JSON as `mcloss export` writes them, the "
        "JSON recording the checkpoint's sha256, the image's and the settings that made them",
    )


def explain_and_show(
    loaded: view.LoadedModel, source: dict, style: render.Style, options: dict, second: view.LoadedModel | None = None
) -> None:
    """The whole pipeline for one input; every failure becomes one st.error sentence."""
    t_start = time.perf_counter()
    if source.get("error"):
        raise ImageLoadError(source["error"])
    data, name = source["data"], source["name"]
    digest = hashlib.sha256(data).hexdigest()
    image, view_copy = _decoded(digest, name, data)
    base = view.page_image(view_copy)
    model = loaded.model
    names = list(model.class_names)
    opts = (options["method"], options["maps"])
    top = min(2, model.num_classes)
    expl, secs = _explain(loaded.key, digest, (f"top{top}",), *opts, _loaded=loaded, _image=image)
    sample: view.Sample | None = source.get("sample")
    gallery: view.Gallery | None = source.get("gallery")
    label = None
    if sample is not None and sample.class_name in names:
        label = names.index(sample.class_name)

    shown = base
    if sample is not None and gallery is not None:
        k = base.shape[1] / expl.image_size[0]
        kps = sample.keypoints
        shown = render.draw_keypoints(base, kps[:, :2] * k, kps[:, 2] > 0, gallery.part_names)
    w, h = expl.image_size
    prediction_panel(expl, names, shown, f"{name} · {w}×{h} px", label)
    if sample is not None and label is None:
        st.caption(f"Ground truth {view.text(sample.class_name)} is not a class of this checkpoint.")

    st.divider()
    mode = st.segmented_control(
        "View", (GROUPS_VIEW, WHY_VIEW), default=GROUPS_VIEW, key="view_mode", required=True,
        label_visibility="collapsed",
        help="Channel groups: what a class's channels see. Why A, not B?: what tells two classes apart.",
    )  # fmt: skip
    inputs = Inputs(loaded, digest, len(data), image, base, view_copy, name, label, sample, gallery)
    if mode == WHY_VIEW:
        secs += why_view(inputs, expl, style, options)
    else:
        secs += groups_view(inputs, expl, style, options, second)
    st.caption(
        f"model {secs:.2f} s (cached until the image, checkpoint, class or map options change) · "
        f"page {time.perf_counter() - t_start:.2f} s · {device_caption(loaded.device)}"
    )


#: The class selectors' session keys: one per widget, never one per image (see :func:`_reset_on`).
TARGET_KEY, WHY_A_KEY, WHY_B_KEY = "target_class", "why_a_class", "why_b_class"


def _reset_on(key: str, context: str, default: int) -> str:
    """``key``, with its widget's value set to ``default`` whenever ``context`` (the image and checkpoint, or
    class A) differs from the last run's, so a new image starts at its own prediction.

    A widget keeps one key for every image: Streamlit keeps the metadata of every keyed widget a session has
    shown, with its ``format_func`` and all that it holds (the image's explanation), until the session ends, so
    a key per image kept every uploaded image's explanation (issue 26: +10.9 % memory over 200 uploads).
    """
    seen = f"{key}__context"
    if st.session_state.get(seen) != context:
        st.session_state[key] = default
        st.session_state[seen] = context
    return key


@dataclass(frozen=True)
class Inputs:
    """The input being explained, as the views below the prediction panel need it."""

    loaded: view.LoadedModel
    digest: str  # sha256 of the image bytes (the caches' key)
    size: int  # of the image bytes
    image: Image.Image  # decoded, EXIF orientation applied
    base: np.ndarray  # the copy the page draws on (RGB uint8; :func:`view.page_image`)
    view: np.ndarray  # the copy the downloads draw on, as mcloss export draws on the image (the display copy)
    name: str
    label: int | None  # the gallery sample's class, if it is one of the model's
    sample: view.Sample | None
    gallery: view.Gallery | None


def groups_view(inputs: Inputs, expl: Explanation, style: render.Style, options: dict, second: view.LoadedModel | None) -> float:
    """The channel groups of the chosen class (or of the top 2), each with its tiles, defining parts, second
    model and atlas, then the downloads; returns the seconds spent in the model beyond ``expl``."""
    loaded, digest, image, base, name = inputs.loaded, inputs.digest, inputs.image, inputs.base, inputs.name
    label, sample, gallery = inputs.label, inputs.sample, inputs.gallery
    model = loaded.model
    names = list(model.class_names)
    opts = (options["method"], options["maps"])
    secs = 0.0
    order = [int(i) for i in (-expl.probs_fc).argsort(kind="stable")]
    c1, c2 = st.columns([3, 2], vertical_alignment="bottom")
    can_compare = model.num_classes >= 2
    target = c1.selectbox(
        "Class whose channel group to show (sorted by FC probability; type to search)",
        order,
        format_func=lambda c: f"{names[c]}  ·  FC {expl.probs_fc[c]:.2f} · MC {expl.probs_mc[c]:.2f}",
        key=_reset_on(TARGET_KEY, f"{digest}:{loaded.key}", order[0]),
        disabled=can_compare and bool(st.session_state.get("compare")),
    )
    compare = c2.toggle("Compare the top-2 classes", value=False, key="compare", disabled=not can_compare)
    held = expl  # the explanation that holds the shown groups (the downloads draw from it)
    if compare and can_compare:
        groups = expl.groups[:2]
    else:
        match = [g for g in expl.groups if g.target == target]
        if match:
            groups = match
        else:
            held, s2 = _explain(loaded.key, digest, (int(target),), *opts, _loaded=loaded, _image=image)
            groups, secs = held.groups, secs + s2
    annotations, note = None, None
    if sample is not None and gallery is not None and has_defining_parts(model.card):
        annotations, note = view.sample_annotations(sample, gallery.part_names, expl.image_size)
    all_tiles, summaries, pairs = {}, [], []
    for rank, g in enumerate(groups):
        role = "prediction" if g.target == expl.prediction else ("runner-up" if compare and rank else "selected")
        drops = _knockout(loaded.key, digest, g.target, _loaded=loaded, _image=image)
        heading = (
            f"#### {view.text(g.name)} <span style='color:#888;font-size:0.8em'>— {role} · FC {g.prob:.2f} · "
            f"MC {g.prob_mc:.2f} · channels {_channel_range(model, g.target)}</span>\n\n"
            f"<span style='color:#888;font-size:0.8em'>{view.knockout_note(drops, len(g.channels))}</span>"
        )
        summary = defining_summary(model.card, g, expl.geometry, annotations, radius=options["radius"])
        summaries.append(summary)
        pair = None
        if second is not None:
            one, s2 = _explain(second.key, digest, (int(g.target),), *opts, _loaded=second, _image=image)
            pair, secs = (one, one.groups[0]), secs + s2
        shown_style = render.common_style(style, g, None if pair is None else pair[1])
        all_tiles[g.name] = group_view(
            expl, g, base, shown_style, sample, gallery.part_names if gallery else None, options, heading,
            (summary, annotations, note),
        )
        if pair is not None:
            all_tiles[f"{g.name} ({Path(second.label).stem})"] = compare_row(second, pair[0], pair[1], base, shown_style)
            pairs.append(pair)
        if gallery is not None:
            atlas_panel(loaded, gallery, g)
    st.divider()
    compare = None
    if pairs:  # the second model's groups, in the shown order, as one explanation
        both = pairs[0][0].with_groups([p[1] for p in pairs], label=label, source=name)
        compare = Comparison(both, (loaded.label, second.label), second.sha256)
    downloads(inputs, held, groups, all_tiles, style, options, maps=options["maps"], defining=summaries, compare=compare)
    return secs


# ------------------------------------------------------------------------------------ why A, not B


def why_view(inputs: Inputs, expl: Explanation, style: render.Style, options: dict) -> float:
    """Why A, not B?: A's Grad-CAM, Finer-CAM of A against B and the group contrast, the defining parts the two
    classes share and those that tell them apart (marked when the image's parts are known), then both groups;
    one explain call per pair (targets A and B, ``contrast=B``). Returns the seconds spent in the model."""
    loaded, model = inputs.loaded, inputs.loaded.model
    names = list(model.class_names)
    if model.num_classes < 2:
        st.info("This checkpoint has one class: there is no other class to tell it from.")
        return 0.0
    ctx = f"{inputs.digest}:{loaded.key}"
    order = [int(i) for i in (-expl.probs_fc).argsort(kind="stable")]
    c1, c2 = st.columns(2)
    a = c1.selectbox(
        "A: the class to explain (default: the prediction; sorted by FC probability)", order,
        format_func=lambda c: f"{names[c]}  ·  FC {expl.probs_fc[c]:.2f} · MC {expl.probs_mc[c]:.2f}",
        key=_reset_on(WHY_A_KEY, ctx, order[0]),
    )  # fmt: skip
    closest = view.closest_classes(expl.probs_fc, a)

    def b_label(c: int) -> str:
        if c == a:
            return f"{names[c]}  (= A)"
        return f"{names[c]}  ·  FC {expl.probs_fc[c]:.2f}" + ("  ·  closest to A" if c == closest[0] else "")

    b = c2.selectbox(
        "B: the class to tell it from (default: the closest, the FC logit nearest A's)", closest,
        format_func=b_label, key=_reset_on(WHY_B_KEY, f"{ctx}:{a}", closest[0]),
    )  # fmt: skip
    if a == b:
        st.warning(
            f"A and B are the same class ({view.text(names[a])}): pick another class B to see what tells them apart.",
            icon=":material/block:",
        )
        return 0.0
    ex, secs = _explain(
        loaded.key, inputs.digest, (a, b), options["method"], view.WHY_MAPS, _loaded=loaded, _image=inputs.image,
        contrast=b,
    )  # fmt: skip
    ga, gb = ex.groups
    st.markdown(f"### Why {view.text(ga.name)}, not {view.text(gb.name)}?")
    pictures, words = _tell_apart_parts(inputs, ex, ga, gb, options)
    maps = [kinds.get(k).tiles(inputs.base, ex, ga, style)[0] for k in ("gradcam", "finer", "contrast")]
    notes = (view.GRADCAM_NOTE, view.FINER_NOTE, view.CONTRAST_NOTE)
    cols = st.columns(len(maps) + len(pictures) if pictures else [1, 1, 1, 2], gap="small")
    for col, tile, note in zip(cols, maps, notes, strict=False):
        col.image(render.pad_to_aspect(tile.image), caption=view.text(tile.caption), width="stretch", alt=tile.alt)
        col.caption(note)
    for col, tile in zip(cols[3:], pictures, strict=False):
        col.image(tile.image, caption=view.text(tile.caption), width="stretch", alt=tile.alt)
    (st.container() if pictures else cols[3]).markdown("\n\n".join(words))

    group_style = render.common_style(style, ga, gb)  # "shared group": both groups on one scale
    closest_note = " · the FC logit nearest A's" if b == closest[0] else ""
    all_tiles = {ga.name: maps + pictures, gb.name: []}
    for g, role in ((ga, "A, the class to explain"), (gb, f"B, the class to tell it from{closest_note}")):
        if g.target == ex.prediction:
            role += " · the prediction"
        st.markdown(view.why_heading(g, role, _channel_range(model, g.target)), unsafe_allow_html=True)
        tiles = kinds.get(kinds.CHANNELS).tiles(inputs.base, ex, g, group_style)
        if inputs.sample is not None and inputs.gallery is not None:
            parts, _ = view.channel_parts(g, inputs.sample.keypoints, inputs.gallery.part_names, ex.image_size, options["radius"])
            tiles = view.part_captions(tiles, parts)
        show_tiles(tiles)
        all_tiles[g.name] = tiles + all_tiles[g.name]
    st.divider()
    downloads(inputs, ex, [ga, view.without_contrast(gb)], all_tiles, style, options, maps=view.WHY_MAPS, contrast=gb.name)
    return secs


def _tell_apart_parts(
    inputs: Inputs, ex: Explanation, ga: GroupMaps, gb: GroupMaps, options: dict
) -> tuple[list[render.Tile], list[str]]:
    """The pictures of the parts that tell A from B and of the parts they share (when the card knows the
    classes' defining parts and the image's parts are annotated), and the Markdown paragraphs beside them."""
    card = inputs.loaded.model.card
    pc = view.parts_contrast(card, ga.name, gb.name)
    if pc is None:
        why = "lists no defining parts for them" if has_defining_parts(card) else "does not record its classes' defining parts"
        return [], [f"The checkpoint's card {why}, so which parts the two classes share is unknown."]
    words = [view.parts_contrast_note(pc)]
    if inputs.sample is None or inputs.gallery is None:
        words.append("Where these parts are in this image is unknown (no part annotations), so they are not marked.")
        return [], words
    annotations, note = view.sample_annotations(inputs.sample, inputs.gallery.part_names, ex.image_size)
    regions = part_regions(annotations, ex.geometry, options["radius"])
    shared, differing = pc.indices(annotations.part_names)
    if regions is None or not (shared or differing):
        words.append("None of these parts is among this image's annotated parts, so they are not marked.")
        return [], words
    from_masks = annotations.labels is not None
    keypoints = None if from_masks else annotations.keypoints
    how = "part masks" if from_masks else f"keypoints within {hit_radius(*ex.image_size, options['radius']):.0f} px"
    sets = [("tell apart", differing, render.DEFINING_RGB), ("shared", shared, render.SHARED_RGB)]
    image = render.draw_part_sets(inputs.base, regions, sets, annotations.part_names, keypoints)
    what = "the parts that tell them apart and the shared parts, marked"
    pictures = [render.Tile(image, "parts", view.parts_caption(pc, how), what, "parts_ab")]
    ratios = view.tell_apart_ratios(ga, ex.geometry, regions, shared, differing, len(annotations.part_names))
    sentence = view.tell_apart_note(ratios)
    words += [view.text(w) for w in (sentence, note) if w]
    return pictures, words


@st.cache_data(max_entries=256, show_spinner=False)
def _knockout(model_key: str, digest: str, target: int, _loaded: view.LoadedModel, _image) -> dict[str, float]:
    return view.knockout_locked(_loaded, _image, target)


def _channel_range(model, cls: int) -> str:
    sl = model.group_slice(cls)
    return f"{sl.start}–{sl.stop - 1}"


# --------------------------------------------------------------------------------------------- main

_CSS = """<style>
[data-testid="stMainBlockContainer"] {padding-top: 4rem; padding-bottom: 2rem;}
[data-testid="stImageCaption"] {font-size: 0.8rem;}
</style>"""


def main() -> None:
    """The app; any failure not handled below ends as one st.error sentence."""
    st.set_page_config(page_title="mcloss · channel explorer", page_icon="🔬", layout="wide")
    try:
        _page()
    except Exception as exc:  # the last guard: a sentence, never a traceback
        log.exception("the app failed")
        st.error(f"Something went wrong: {type(exc).__name__}: {first_line(exc)}")



def _page() -> None:
    """Sidebar (model, device, input, controls), then the prediction panel and the group view."""
    _configure_threads()
    view.limit_heap_growth()
    st.html(_CSS)
    st.sidebar.title("mcloss explorer")
    st.sidebar.caption("What each class's channel group sees (Mutual-Channel Loss), next to Grad-CAM.")
    loaded = sidebar_model()
    second = sidebar_compare(loaded)
    st.sidebar.caption(
        f"Device: {device_caption(resolve_device('auto'))}",
        help="CUDA when available. CPU inference threads: MCLOSS_APP_THREADS (default 1).",
    )
    source = sidebar_input()
    style, options = sidebar_controls()

    if loaded is None:
        st.info("Choose a usable checkpoint in the sidebar to start.")
        return
    if source is None:
        st.info("Upload an image or pick a gallery sample in the sidebar.")
        return
    try:
        explain_and_show(loaded, source, style, options, second)
    except ImageLoadError as exc:
        st.error(f"Cannot read the image: {view.text(exc)}")
    except Exception as exc:
        log.exception("explaining %s failed", source.get("name"))
        st.error(f"Could not explain {view.text(source.get('name'))}: {type(exc).__name__}: {view.text(first_line(exc))}")


main()
