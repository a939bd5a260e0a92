"""The channel atlas: for every channel of the chosen classes, the images where it fires most across a
dataset, the part its top activations land on, and how consistent and stable that is.

One forward pass per batch (no gradients): F of the chosen groups stays on the device, each image's peak
per channel is merged into a running top-``top`` there (one patch per image and channel), and only the
winners travel to the CPU at the end. Where the dataset has part keypoints (CUB layout, ``mcloss synth``)
each top activation is labelled with the part whose keypoint is nearest to its peak, within the hit
radius (``radius`` × max(width, height)), and each channel with its most frequent part and its purity.

- **Part consistency** (after EvalProtoPNet): over the images of a channel's class, the part its peak hits
  most often relative to the images where that part is visible; the channel is consistent when that share
  is at least 0.8. Reported: the share of consistent channels.
- **Stability**: the share of (channel, image of its class) pairs whose peak hits a part and hits the same
  part when Gaussian noise (``noise`` × the normalized input's unit) is added to the input; a second
  forward pass over those images (``noise=None`` skips it). Each image's noise comes from ``(seed, its
  index)`` alone, so a resumed pass gives exactly the result of an uninterrupted one.
- **Distinct parts, counted** (``coverage``, :mod:`mcloss.metrics.coverage`): where the classes' defining
  parts are known (the inputs' ``defining``, else the checkpoint card's), each channel's part is the most
  frequent part its own-class peaks hit (within the hit radius; a miss is "no part", a tie is no part);
  per class, whether the channels' parts cover every defining part and how many channels share a part,
  with the chance of part-holding channels drawn from the visible part-area shares (each pixel within the
  hit radius of a visible keypoint belongs to the nearest one, limited to the network's crop). Images
  without a visible keypoint are left out.

The pass is resumable: ``state`` (a safetensors file of the running top-k plus a JSON sidecar of the
options and per-image peaks) is written every ``save_every`` batches and when the pass is interrupted;
a later call with the same options continues after the last saved batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from mcloss.core.errors import DatasetError, ParameterError, Progress, check_callback
from mcloss.core.files import atomic_path, atomic_write_json, json_safe
from mcloss.core.model import MCModel, model_guard
from mcloss.data.datasets import check_classes
from mcloss.data.defining import defining_parts, region_part_indices
from mcloss.data.files import InputFile
from mcloss.data.inputs import ImageFiles, collate_items
from mcloss.data.io import load_image
from mcloss.explainability.defining import crop_regions
from mcloss.metrics import coverage as C
from mcloss.metrics.localization import DEFAULT_HIT_RADIUS, hit_radius, nearest_keypoints
from mcloss.metrics.mass import region_areas

__all__ = ["CONSISTENT", "AtlasInputs", "build_atlas", "contact_sheet", "patch_box", "running_topk"]

#: A channel is consistent when its most frequent part is hit in at least this share of the images.
CONSISTENT = 0.8


def running_topk(
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], feats: torch.Tensor, ids: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge a batch into a running top-k, on the tensors' device.

    Args:
        state: (values, images, cells), each [C, k] (k ≤ top): peak value, image index, flat peak cell.
        feats: [B, C, h, w] the tracked channels of the batch.
        ids: [B] the images' dataset indices.
        top: how many to keep.

    Returns:
        The new state, [C, min(top, k + B)], best first; one entry per image and channel.
    """
    values, images, cells = state
    peak, cell = feats.flatten(2).max(dim=2)  # [B, C]
    all_v = torch.cat([values, peak.T.float()], dim=1)
    all_i = torch.cat([images, ids.to(images.device).expand(feats.shape[1], -1)], dim=1)
    all_c = torch.cat([cells, cell.T], dim=1)
    best = all_v.topk(min(top, all_v.shape[1]), dim=1)
    return best.values, all_i.gather(1, best.indices), all_c.gather(1, best.indices)


def patch_box(xy: Sequence[float], size: tuple[int, int], fraction: float) -> list[int]:
    """[x0, y0, x1, y1] of a square of side ``fraction`` × max(width, height) centred on ``xy``, shifted to
    lie inside the image (and cut to it when larger)."""
    w, h = size
    side = max(1, round(fraction * max(w, h)))
    sx, sy = min(side, w), min(side, h)
    x0 = int(min(max(round(xy[0] - sx / 2), 0), w - sx))
    y0 = int(min(max(round(xy[1] - sy / 2), 0), h - sy))
    return [x0, y0, x0 + sx, y0 + sy]


@dataclass(frozen=True)
class AtlasInputs:
    """The images of an atlas: paths, labels, part keypoints ([P, 3] x, y, visible; or None), part names,
    the classes' defining parts (class name → part or region names; None when the dataset does not say) and
    the dataset's class names (the model's must be the same; None: the labels are the model's classes)."""

    paths: list[str]
    labels: list[int]
    keypoints: list[np.ndarray | None]
    part_names: list[str]
    defining: dict[str, list[str]] | None = None
    class_names: list[str] | None = None

    @classmethod
    def from_cub(cls, dataset) -> AtlasInputs:
        """From a :class:`mcloss.data.cub.CUBDataset` split; the defining parts from its ``synth.json`` or
        CUB attribute files (:func:`mcloss.data.defining.defining_parts`)."""
        kps = [None if r.parts is None else np.asarray(r.parts, np.float64).reshape(-1, 3) for r in dataset.records]
        root = getattr(dataset, "root", None)
        return cls([str(r.path) for r in dataset.records], [int(r.label) for r in dataset.records], kps,
                   list(dataset.part_names), None if root is None else defining_parts(root),
                   list(dataset.class_names))  # fmt: skip


def _options(
    model: MCModel, inputs: AtlasInputs, classes: Sequence[int], top: int, noise: float | None, seed: int,
    model_id: str | None,
) -> dict:
    """What a saved state must match to be resumed: the model, every input and label, and the settings."""
    digest = hashlib.sha256(json.dumps([inputs.paths, inputs.labels]).encode()).hexdigest()
    return {"classes": list(classes), "top": top, "noise": noise, "seed": seed, "images": len(inputs.paths),
            "inputs": digest, "model_id": model_id, "model": model.class_names}  # fmt: skip


def _image_noise(shape: Sequence[int], seed: int, index: int) -> torch.Tensor:
    """The standard normal noise [*shape] (float32, CPU) of image ``index`` of an atlas pass with ``seed``.

    It depends on nothing else (not the batch, nor where a resumed pass started), so an interrupted and
    resumed pass adds the same noise to every image as an uninterrupted one.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))


def _load_state(path: Path | None, options: dict, device: torch.device):
    if path is None or not path.is_file() or not path.with_suffix(".json").is_file():
        return None
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    if meta.get("options") != options:
        return None
    t = load_file(str(path))
    return (t["values"].to(device), t["images"].to(device), t["cells"].to(device)), meta


def _save_state(path: Path | None, options: dict, state, meta: dict) -> None:
    if path is None:
        return
    values, images, cells = state
    with atomic_path(path) as tmp:
        save_file({"values": values.cpu().contiguous(), "images": images.cpu().contiguous(),
                   "cells": cells.cpu().contiguous()}, str(tmp))  # fmt: skip
    atomic_write_json(path.with_suffix(".json"), meta | {"options": options})


def _hit(xy: np.ndarray, kps: np.ndarray | None, size: tuple[int, int], radius: float) -> int | None:
    """The part (0-based) whose visible keypoint is nearest to ``xy`` within the hit radius, or None."""
    if kps is None or not len(kps):
        return None
    parts, dist = nearest_keypoints(np.asarray(xy, np.float64)[None], kps)
    if parts[0] < 0 or dist[0] > hit_radius(size[0], size[1], radius):
        return None
    return int(parts[0])


def build_atlas(
    model: MCModel,
    inputs: AtlasInputs,
    *,
    classes: Sequence[int] | None = None,
    top: int = 16,
    batch_size: int = 16,
    workers: int = 0,
    device: torch.device | None = None,
    noise: float | None = 0.2,
    radius: float = DEFAULT_HIT_RADIUS,
    patch: float = 0.25,
    state: str | Path | None = None,
    save_every: int = 20,
    seed: int = 0,
    progress: Progress | None = None,
    model_id: str | None = None,
) -> dict:
    """Run the atlas pass over ``inputs`` (see the module docstring); returns a JSON-friendly summary.

    ``model_id`` (e.g. the checkpoint's sha256) is part of what a saved ``state`` must match. Without a
    visible keypoint in ``inputs`` (a CUB layout without ``parts/part_locs.txt``, say) the summary's
    ``has_parts`` is false and its consistency counts are None: nothing was measured. Images that could not
    be read are listed in its ``skipped`` (index → reason).

    Raises:
        UnknownClassError, OutOfRangeError: an unknown class.
        ParameterError: ``top`` < 1 or ``progress`` not callable.
        DatasetError: the inputs' classes are not the model's, or no readable image.
    """
    check_callback(progress)
    if inputs.class_names is not None:
        check_classes("the atlas inputs", inputs.class_names, model.class_names)
    if not all(0 <= label < model.num_classes for label in inputs.labels):
        raise DatasetError(f"the atlas inputs: labels outside the checkpoint's {model.num_classes} classes")
    device = device or next(model.parameters()).device
    named = range(model.num_classes) if classes is None else (model.class_index(c, "classes") for c in classes)
    classes = list(dict.fromkeys(named))  # a class named twice (by index and by name) is one class
    if top < 1:
        raise ParameterError(f"top must be >= 1, got {top}", parameter="top")
    tracked = [ch for c in classes for ch in range(model.group_slice(c).start, model.group_slice(c).stop)]
    sel = torch.tensor(tracked, device=device)
    options = _options(model, inputs, classes, top, noise, seed, model_id)
    state_path = None if state is None else Path(state)
    loaded = _load_state(state_path, options, device)
    empty = torch.empty(len(tracked), 0, device=device)
    running = (empty.float(), empty.long(), empty.long()) if loaded is None else loaded[0]
    meta = {"done": 0, "sizes": {}, "own": {}, "noisy": {}, "skipped": {}} if loaded is None else loaded[1]
    start = int(meta["done"])
    files = [InputFile(p, p) for p in inputs.paths]
    loader = DataLoader(torch.utils.data.Subset(ImageFiles(files, model.transform, None), range(start, len(files))),
                        batch_size=batch_size, num_workers=workers, collate_fn=collate_items)  # fmt: skip
    position = {c: k for k, c in enumerate(classes)}
    feature_hw = None
    if progress is not None:
        progress(start, len(inputs.paths))
    committed = running  # the top-k as of the last finished batch: what an interrupt saves
    try:
        with model_guard(model, freeze=True), torch.no_grad():
            for step, items in enumerate(loader, start=1):
                good = [(i, item) for i, item in items if not isinstance(item, str)]
                for i, reason in (it for it in items if isinstance(it[1], str)):
                    meta["skipped"][str(i)] = reason
                if good:
                    x = torch.stack([item.x for _, item in good]).to(device)
                    feats = model.forward_features(x).float()
                    feature_hw = tuple(feats.shape[2:])
                    ids = torch.tensor([i for i, _ in good], device=device)
                    running = running_topk(running, feats[:, sel], ids, top)
                    for b, (i, item) in enumerate(good):
                        meta["sizes"][str(i)] = [int(item.geometry.original[0]), int(item.geometry.original[1])]
                        label = inputs.labels[i]
                        if label in position:
                            s = model.group_slice(label)
                            meta["own"][str(i)] = feats[b, s].flatten(1).argmax(dim=1).tolist()
                    if noise is not None:
                        own = [b for b, (i, _) in enumerate(good) if inputs.labels[i] in position]
                        if own:
                            draws = torch.stack([_image_noise(x.shape[1:], seed, good[b][0]) for b in own])
                            xn = x[own] + noise * draws.to(device)
                            fn = model.forward_features(xn).float()
                            for k, b in enumerate(own):
                                i = good[b][0]
                                s = model.group_slice(inputs.labels[i])
                                meta["noisy"][str(i)] = fn[k, s].flatten(1).argmax(dim=1).tolist()
                meta["done"] = min(start + step * batch_size, len(inputs.paths))
                meta["feature_hw"] = list(feature_hw) if feature_hw else meta.get("feature_hw")
                committed = running
                if step % save_every == 0:
                    _save_state(state_path, options, running, meta)
                if progress is not None:
                    progress(int(meta["done"]), len(inputs.paths))
    except BaseException:  # meta["done"] still counts the finished batches only
        _save_state(state_path, options, committed, meta)
        raise
    _save_state(state_path, options, running, meta)
    if not meta["sizes"]:
        raise DatasetError("no readable image in the atlas inputs")
    return _summarize(model, inputs, classes, tracked, running, meta, radius, patch, top)


def _cell_xy(model: MCModel, size: Sequence[int], cell: int, feature_hw: tuple[int, int]) -> np.ndarray:
    """The original-image (x, y) of a flat feature cell's centre."""
    fh, fw = feature_hw
    geo = model.transform.geometry(int(size[0]), int(size[1]))
    return geo.feature_to_original(np.array([[int(cell) % fw, int(cell) // fw]]), (fh, fw))[0]


def _cell_hit(model: MCModel, inputs: AtlasInputs, i: int, cell: int, meta: dict, radius: float) -> int | None:
    size = meta["sizes"][str(i)]
    return _hit(_cell_xy(model, size, cell, tuple(meta["feature_hw"])), inputs.keypoints[i], tuple(size), radius)


def _summarize(model, inputs, classes, tracked, running, meta, radius, patch, top) -> dict:
    values, images, cells = (t.cpu().numpy() for t in running)
    fh, fw = meta["feature_hw"]
    names = inputs.part_names
    has_parts = bool(names) and any(k is not None and len(k) and (k[:, 2] > 0).any() for k in inputs.keypoints)
    out_classes = {}
    consistent = measured = 0
    stable_pairs = stable = 0
    for c in classes:
        s = model.group_slice(c)
        rows = []
        class_peaks = [(int(i), p) for i, p in meta["own"].items() if inputs.labels[int(i)] == c]
        for pos, ch in enumerate(range(s.start, s.stop)):
            k = tracked.index(ch)
            entries, hits = [], []
            for v, i, cell in zip(values[k], images[k], cells[k], strict=True):
                size = meta["sizes"][str(int(i))]
                xy = _cell_xy(model, size, int(cell), (fh, fw))
                part = _hit(xy, inputs.keypoints[int(i)], tuple(size), radius)
                hits.append(part)
                entries.append({"image": inputs.paths[int(i)], "label": inputs.labels[int(i)],
                                "peak_xy": [float(xy[0]), float(xy[1])], "value": float(v),
                                "box": patch_box(xy, tuple(size), patch),
                                "part": None if part is None else names[part]})  # fmt: skip
            labelled = [h for h in hits if h is not None]
            mode = max(set(labelled), key=labelled.count) if labelled else None
            row = {"channel": ch, "position": pos + 1, "top": entries,
                   "part": None if mode is None else names[mode],
                   "purity": None if mode is None else labelled.count(mode) / len(entries)}  # fmt: skip
            # consistency over the images of this class
            own = [(i, p[pos]) for i, p in class_peaks]
            share, best_part = _consistency(model, inputs, own, meta, radius)
            row["consistency"] = {"part": None if best_part is None else names[best_part], "share": share,
                                  "consistent": share is not None and share >= CONSISTENT}  # fmt: skip
            consistent += bool(row["consistency"]["consistent"])
            measured += share is not None  # a channel whose class has no scored image measures nothing
            for i, cell in own:
                noisy = meta["noisy"].get(str(i))
                if noisy is None:
                    continue
                clean = _cell_hit(model, inputs, i, cell, meta, radius)
                if clean is None:  # only pairs whose clean peak hits a part can keep it
                    continue
                stable_pairs += 1
                stable += clean == _cell_hit(model, inputs, i, noisy[pos], meta, radius)
            rows.append(row)
        out_classes[model.class_names[c]] = {"index": c, "channels": rows}
    return {
        "images": len(meta["sizes"]), "skipped": meta["skipped"], "top": top, "feature_hw": [fh, fw],
        "classes": out_classes,
        "consistency": {"threshold": CONSISTENT, "consistent_channels": consistent if has_parts and measured else None,
                        "channels": len(tracked), "measured": measured if has_parts else None,
                        "share": consistent / measured if has_parts and measured else None},
        "stability": {"pairs": stable_pairs, "stable": stable, "share": stable / stable_pairs if stable_pairs else None},
        "has_parts": has_parts,
        "coverage": _coverage(model, inputs, classes, meta, radius),
    }  # fmt: skip


def _defining(model: MCModel, inputs: AtlasInputs) -> tuple[dict[str, list[str]] | None, str | None]:
    """The classes' defining parts and where they came from: the inputs', else the checkpoint card's."""
    if inputs.defining is not None:
        return inputs.defining, "dataset"
    card = model.card.get("defining_parts") if isinstance(model.card, dict) else None
    return (card, "checkpoint card") if isinstance(card, dict) else (None, None)


def _coverage(
    model: MCModel, inputs: AtlasInputs, classes: Sequence[int], meta: dict, radius: float
) -> dict | None:
    """The "distinct parts" count over the own-class peaks (see the module docstring); None without part
    keypoints, ``summary`` None and a ``note`` without defining parts."""
    names = inputs.part_names
    if not names or not any(k is not None and len(k) for k in inputs.keypoints):
        return None
    defining, source = _defining(model, inputs)
    block: dict = {"source": source, "regions": "keypoints within the hit radius"}
    if not defining:
        return block | {"per_class": {}, "summary": None, "note": "no defining parts known"}
    wanted = {model.class_names[c] for c in classes}
    regions = {cls: {r: region_part_indices(str(r), names) for r in rs} for cls, rs in defining.items()}
    regions = {cls: v for cls, v in regions.items() if cls in wanted}
    peaks: dict[str, list[list[int]]] = {}
    shares: dict[str, list[np.ndarray]] = {}
    for key, cells in meta["own"].items():
        i = int(key)
        kps = inputs.keypoints[i]
        if kps is None or not len(kps) or not (kps[:, 2] > 0).any():
            continue
        name = model.class_names[inputs.labels[i]]
        parts = [_cell_hit(model, inputs, i, cell, meta, radius) for cell in cells]
        peaks.setdefault(name, []).append([C.NO_PART if p is None else p for p in parts])
        w, h = meta["sizes"][key]
        seen = crop_regions(None, kps, model.transform.geometry(w, h), hit_radius(w, h, radius))
        area = region_areas(seen, len(names))
        if area.sum() > 0:
            shares.setdefault(name, []).append(area / area.sum())
    mean_shares = {cls: np.mean(v, axis=0).tolist() for cls, v in shares.items()}
    counted = C.class_coverage(peaks, regions, names, mean_shares)
    return json_safe(block | counted)


def _consistency(model, inputs, own, meta, radius) -> tuple[float | None, int | None]:
    """The best part's hit share among the class images where it is visible, and that part."""
    if not inputs.part_names:
        return None, None
    num = len(inputs.part_names)
    hit = np.zeros(num)
    visible = np.zeros(num)
    for i, cell in own:
        kps = inputs.keypoints[i]
        if kps is None or not len(kps):
            continue
        part = _cell_hit(model, inputs, i, cell, meta, radius)
        visible += kps[:num, 2] > 0
        if part is not None:
            hit[part] += 1
    if not visible.any():
        return None, None
    share = np.where(visible > 0, hit / np.maximum(visible, 1), 0.0)
    best = int(share.argmax())
    return float(share[best]), best


def contact_sheet(summary: dict, name: str, *, height: int = 96) -> np.ndarray:
    """One class's sheet, RGB uint8: a row per channel (its top patches, best first, the peak marked),
    headed by the channel's part and purity."""
    from mcloss.explainability import render

    originals: dict[str, np.ndarray] = {}
    rows = []
    group = summary["classes"][name]
    for row in group["channels"]:
        tiles = []
        for e in row["top"]:
            if e["image"] not in originals:
                originals[e["image"]] = np.asarray(load_image(e["image"]))
            x0, y0, x1, y1 = e["box"]
            crop = np.ascontiguousarray(originals[e["image"]][y0:y1, x0:x1]).copy()
            side = max(crop.shape[:2])
            centre = (int(round(e["peak_xy"][0] - x0)), int(round(e["peak_xy"][1] - y0)))
            cv2.circle(crop, centre, max(2, side // 14), (0, 229, 255), max(1, side // 60), cv2.LINE_AA)
            tiles.append((render.letterbox(crop, height), f"{e['value']:.3g} {e['part'] or ''}".strip()))
        what = "no part labels" if row["part"] is None else f"{row['part']}, {round(row['purity'] * len(row['top']))} of its top {len(row['top'])}"
        rows.append(render.montage(tiles, height=height, title_height=16, header=f"channel {row['position']} of {name}: {what}"))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
