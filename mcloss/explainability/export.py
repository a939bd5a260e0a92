"""``mcloss export``: batch-export channel maps, Grad-CAM and montages for many images.

Inputs: files, directories (searched recursively for image files) and glob patterns. Outputs mirror the
inputs under ``--out``: a file inside a directory input ``D`` lands at ``<name of D>/<path inside D>``;
a single file or a glob match lands at the top level. Every path component is sanitized, so nothing escapes ``--out`` (absolute
inputs and ``..`` included). The output stem is the input's file name *with* its extension, so ``a.jpg``
and ``a.png`` do not collide; any remaining clash gets ``~2``, ``~3``... (in sorted input order).

Per image, for ``<stem>`` = e.g. ``birds/a.jpg``:

- ``<stem>.png``: the montage of the first target (original | ξ channels | CCMP | parts | Grad-CAM).
- ``<stem>.npz``: ``channels`` [ξ, h, w] raw F slice at feature resolution, ``gradcam`` [h, w] raw
  (ReLU Grad-CAM of the FC-head logit) when requested, ``channel_gradcam`` [ξ, h, w] and ``guided``
  [H_in, W_in] when requested, ``probs`` (FC head), ``probs_mc`` (MC head), ``target`` (int),
  ``peaks_xy`` [ξ, 2] (original pixels), ``targets`` [T] (all targets).
- ``<stem>.json``: ``file`` (input path), ``image_size`` [width, height] after EXIF, ``prediction``
  {index, name, prob}, ``prediction_mc``, ``topk`` [{index, name, prob}], ``target`` {index, name, prob},
  ``channels`` [{channel, peak_xy [x, y] original pixels, peak_value}], ``gradcam`` {peak_xy} (or null),
  ``outputs`` (file names), ``targets`` (one entry per target, see below).

Several targets (``--target topK``): the top-level ``target``/``channels``/``gradcam``, ``<stem>.png`` and
the npz's unsuffixed arrays describe the first target; the target of rank r ≥ 2 adds ``<stem>.r<r>.png``
and npz arrays suffixed ``_r<r>`` (``channels_r2``, ``gradcam_r2``...); the json's ``targets`` list
holds {rank, index, name, prob, prob_mc, channels, gradcam, png} for every rank.

The json is written last: an image is finished when its json exists, and a re-run skips it. Every file
is written atomically. At the end: ``manifest.json`` (checkpoint + sha256, versions, options, counts),
``index.csv`` (one row per finished image) and ``errors.csv`` (file, reason for each rejected input).
With ``--shard i/n`` those three are named ``manifest.shard-i-of-n.json`` etc. The exit status is 1 when
any input was rejected.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mcloss.core.transforms import EvalTransform, Geometry
from mcloss.data.io import (
    ImageLoadError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_image,
)
from mcloss.explainability.explanation import Explanation, explain_tensor
from mcloss.explainability.render import colormap_lut, explanation_montage, thumbnail

__all__ = [
    "DEFAULT_CHECKPOINT",
    "IMAGE_EXTENSIONS",
    "MAP_KINDS",
    "InputFile",
    "ImageFiles",
    "collect_inputs",
    "sanitize_component",
    "find_cub_label",
    "encode_png",
    "write_outputs",
    "build_parser",
    "main",
]

DEFAULT_CHECKPOINT = Path("checkpoints/default.safetensors")
IMAGE_EXTENSIONS = frozenset(
    [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif", ".jpe"]
)
MAP_KINDS = ("channels", "gradcam", "channel_gradcam", "guided")
_SAFE = re.compile(r"[^A-Za-z0-9._+@=,-]+")
_TARGET = re.compile(r"^(pred|pred_mc|label|top\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class InputFile:
    """One input: its path as given (``source``) and its output stem relative to --out (``key``)."""

    source: str
    key: str


# ------------------------------------------------------------------------------------------- inputs


def sanitize_component(part: str) -> str:
    """One safe path component: no separators, no '.'/'..', no leading dot, nothing outside [A-Za-z0-9._+@=,-]."""
    safe = _SAFE.sub("_", part).strip()
    safe = safe.lstrip(".") or "_"
    return safe[:200]


def _key_for(parts: Sequence[str]) -> str:
    return "/".join(sanitize_component(p) for p in parts if p not in ("", ".", ".."))


def collect_inputs(inputs: Sequence[str]) -> list[InputFile]:
    """Expand files, directories (recursive, image extensions only) and globs into unique outputs keys.

    A name that matches nothing is kept as a file, so it is reported as an error later.
    """
    found: list[tuple[str, str]] = []  # (source, key)
    seen: set[str] = set()
    for raw in inputs:
        if os.path.isdir(raw):
            root = Path(raw)
            prefix = [root.resolve().name]
            for path in sorted(root.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append((str(path), _key_for(prefix + list(path.relative_to(root).parts))))
        elif not os.path.exists(raw) and glob.has_magic(raw):
            for match in sorted(glob.glob(raw, recursive=True)):
                if os.path.isfile(match):
                    found.append((match, _key_for([Path(match).name])))
        else:
            found.append((raw, _key_for([Path(raw).name])))
    out: list[InputFile] = []
    used: set[str] = set()
    for source, key in found:
        ident = os.path.abspath(source)
        if ident in seen:
            continue
        seen.add(ident)
        unique, n = key or "_", 1
        while unique.lower() in used:
            n += 1
            unique = f"{key}~{n}"
        used.add(unique.lower())
        out.append(InputFile(source, unique))
    return out


def _inside(out_dir: Path, key: str) -> Path:
    path = (out_dir / key).resolve()
    root = out_dir.resolve()
    if os.path.commonpath([root, path]) != str(root):
        raise ValueError(f"output {key!r} would escape {out_dir}")
    return out_dir / key


_CUB_CACHE: dict[str, dict[str, int] | None] = {}


def find_cub_label(path: str | os.PathLike) -> int | None:
    """The 0-based class of an image inside a CUB-layout dataset (root with images.txt and
    image_class_labels.txt; images under root/images/), or None."""
    p = Path(path).resolve()
    for root in p.parents:
        key = str(root)
        if key not in _CUB_CACHE:
            if (root / "images.txt").is_file() and (root / "image_class_labels.txt").is_file():
                _CUB_CACHE[key] = _read_cub_labels(root)
            else:
                _CUB_CACHE[key] = None
        table = _CUB_CACHE[key]
        if table is not None:
            try:
                rel = p.relative_to(root / "images").as_posix()
            except ValueError:
                rel = p.relative_to(root).as_posix()
            return table.get(rel)
    return None


def _read_cub_labels(root: Path) -> dict[str, int]:
    ids: dict[str, str] = {}
    for line in (root / "images.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            image_id, rel = line.split(maxsplit=1)
            ids[image_id] = rel.strip()
    table: dict[str, int] = {}
    for line in (root / "image_class_labels.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            image_id, cls = line.split()[:2]
            if image_id in ids:
                table[ids[image_id]] = int(cls) - 1
    return table


# ------------------------------------------------------------------------------------------- decoding


class ImageFiles(Dataset):
    """Decodes inputs in DataLoader workers; an item carries the input tensor or the error string.

    Items: dict(index, error) or dict(index, error=None, x [3, H, W], geometry, thumb RGB uint8).
    """

    def __init__(self, files: Sequence[InputFile], transform: EvalTransform, thumb_height: int) -> None:
        self.files = list(files)
        self.transform = transform
        self.thumb_height = thumb_height

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        source = self.files[index].source
        try:
            image = load_image(source)
            geo = self.transform.geometry(*image.size)
            x = self.transform.apply(image, geo)
            thumb, _ = thumbnail(np.asarray(image), self.thumb_height)
            return {"index": index, "error": None, "x": x, "geometry": geo, "thumb": thumb}
        except ImageLoadError as exc:
            return {"index": index, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a worker must never die on one bad file
            return {"index": index, "error": f"{source}: {type(exc).__name__}: {exc}"}


def _collate(items: list[dict]) -> list[dict]:
    return items


# ------------------------------------------------------------------------------------------- writing


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image (converted to BGR for OpenCV)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError("PNG encoding failed")
    return buf.tobytes()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _clean_stale_temps(base: Path) -> None:
    """Remove temp files a killed run left for this image's outputs."""
    if base.parent.is_dir():
        for tmp in base.parent.glob(f".{glob.escape(base.name)}.*.tmp*"):
            tmp.unlink(missing_ok=True)


def write_outputs(
    base: Path,
    source: str,
    thumb: np.ndarray,
    exp: Explanation,
    class_names: Sequence[str],
    options: dict,
) -> dict:
    """Write ``<base>.png`` (+ ``.r<r>.png``), ``<base>.npz`` and, last, ``<base>.json``; return the json."""
    _clean_stale_temps(base)
    name = base.name
    arrays: dict[str, np.ndarray] = {
        "probs": exp.probs_fc.astype(np.float32),
        "probs_mc": exp.probs_mc.astype(np.float32),
        "target": np.int64(exp.groups[0].target),
        "targets": np.array([g.target for g in exp.groups], np.int64),
    }
    entries = []
    outputs = [f"{name}.npz", f"{name}.json"]
    for rank, gm in enumerate(exp.groups, start=1):
        sfx = "" if rank == 1 else f"_r{rank}"
        arrays[f"channels{sfx}"] = gm.channels
        arrays[f"peaks_xy{sfx}"] = gm.peaks_xy.astype(np.float64)
        if gm.gradcam is not None:
            arrays[f"gradcam{sfx}"] = gm.gradcam
        if gm.channel_gradcam is not None:
            arrays[f"channel_gradcam{sfx}"] = gm.channel_gradcam
        if gm.guided is not None:
            arrays[f"guided{sfx}"] = gm.guided
        png = f"{name}.png" if rank == 1 else f"{name}.r{rank}.png"
        picture = explanation_montage(
            thumb,
            exp,
            rank - 1,
            class_names=class_names,
            colormap=options["colormap"],
            alpha=options["alpha"],
            shared_scale=options["shared_scale"],
            height=options["tile_height"],
        )
        atomic_write_bytes(base.parent / png, encode_png(picture))
        outputs.insert(rank - 1, png)
        entries.append(
            {
                "rank": rank,
                "index": gm.target,
                "name": gm.name,
                "prob": gm.prob,
                "prob_mc": gm.prob_mc,
                "channels": [
                    {"channel": i, "peak_xy": [float(v) for v in gm.peaks_xy[i]], "peak_value": float(gm.peak_values[i])}
                    for i in range(len(gm.channels))
                ],
                "gradcam": None
                if gm.gradcam_peak_xy is None
                else {"peak_xy": [float(v) for v in gm.gradcam_peak_xy]},
                "png": png,
            }
        )
    atomic_write_bytes(base.parent / f"{name}.npz", _npz_bytes(arrays))
    pred, pred_mc = exp.prediction, exp.prediction_mc
    order = np.argsort(-exp.probs_fc, kind="stable")[: options["topk"]]
    record = {
        "file": source,
        "image_size": list(exp.image_size),
        "prediction": {"index": pred, "name": class_names[pred], "prob": float(exp.probs_fc[pred])},
        "prediction_mc": {"index": pred_mc, "name": class_names[pred_mc], "prob": float(exp.probs_mc[pred_mc])},
        "topk": [{"index": int(i), "name": class_names[i], "prob": float(exp.probs_fc[i])} for i in order],
        "label": None if exp.label is None else {"index": exp.label, "name": class_names[exp.label]},
        "target": {"index": entries[0]["index"], "name": entries[0]["name"], "prob": entries[0]["prob"]},
        "channels": entries[0]["channels"],
        "gradcam": entries[0]["gradcam"],
        "feature_hw": list(exp.feature_hw),
        "geometry": {"resized": list(exp.geometry.resized), "crop": list(exp.geometry.crop)},
        "targets": entries,
        "outputs": outputs,
    }
    atomic_write_json(base.parent / f"{name}.json", record)
    return record


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcloss export", description="Batch-export channel maps and Grad-CAM.")
    p.add_argument("--checkpoint", default=None, help=f"mcloss checkpoint (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--input", nargs="+", required=True, help="image files, directories (recursive) or globs")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--target", default="pred", help="pred | pred_mc | label | topK | class index or name")
    p.add_argument("--maps", default="channels,gradcam", help=f"comma list of {','.join(MAP_KINDS)}")
    p.add_argument("--colormap", default="inferno")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity (0 = image only)")
    p.add_argument("--shared-scale", action="store_true", help="normalize a channel group by one max")
    p.add_argument("--tile-height", type=int, default=224, help="montage tile height in pixels")
    p.add_argument("--topk", type=int, default=5, help="entries in the json's topk list")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="DataLoader decoding workers (0 = in process)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--shard", default="0/1", help="i/n: process every n-th input starting at i")
    p.add_argument("--method", choices=("fused", "captum"), default="fused", help="Grad-CAM implementation")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def _parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"--shard must be i/n with 0 <= i < n, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _relative_output(key: str, name: str) -> str:
    """An output file name as a path relative to --out."""
    folder = key.rsplit("/", 1)[0] if "/" in key else ""
    return f"{folder}/{name}" if folder else name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    from mcloss import __version__

    try:
        import captum

        captum_version = captum.__version__
    except ImportError:  # pragma: no cover - captum is a dependency
        captum_version = None
    return {"mcloss": __version__, "torch": torch.__version__, "captum": captum_version, "numpy": np.__version__}


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the export; returns 0, or 1 when any input was rejected, or 2 on a usage error."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"mcloss export: error: {msg}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from mcloss.core.checkpoint import load_checkpoint
    from mcloss.core.device import resolve_device

    maps = [m.strip() for m in args.maps.split(",") if m.strip()]
    unknown = sorted(set(maps) - set(MAP_KINDS))
    if unknown:
        raise ValueError(f"--maps: unknown {', '.join(unknown)} (choose from {', '.join(MAP_KINDS)})")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    shard_i, shard_n = _parse_shard(args.shard)
    ckpt = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    if not ckpt.is_file():
        hint = "" if args.checkpoint else " (the default; train one or pass --checkpoint)"
        raise ValueError(f"{ckpt}: checkpoint not found{hint}")
    device = resolve_device(args.device)
    model = load_checkpoint(ckpt, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    target_spec: str | int = args.target
    if not _TARGET.match(str(target_spec)):
        target_spec = model.class_index(str(target_spec))  # fails early on an unknown class

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = collect_inputs(args.input)[shard_i::shard_n]
    options = {
        "checkpoint": str(ckpt),
        "input": list(args.input),
        "out": str(out_dir),
        "target": args.target,
        "maps": maps,
        "colormap": args.colormap,
        "alpha": args.alpha,
        "shared_scale": bool(args.shared_scale),
        "tile_height": args.tile_height,
        "topk": args.topk,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": str(device),
        "shard": [shard_i, shard_n],
        "method": args.method,
    }
    colormap_lut(args.colormap)  # an unknown colormap fails before any work

    bases = {f.key: _inside(out_dir, f.key) for f in files}
    todo = [f for f in files if not bases[f.key].with_name(bases[f.key].name + ".json").is_file()]
    skipped = len(files) - len(todo)
    errors: list[tuple[str, str]] = []
    written = 0
    t0 = time.perf_counter()

    loader = DataLoader(
        ImageFiles(todo, model.transform, args.tile_height),
        batch_size=max(1, args.batch_size),
        num_workers=max(0, args.workers),
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(todo), unit="img", desc="export", file=sys.stderr)
    for items in loader:
        good = []
        for item in items:
            f = todo[item["index"]]
            if item["error"] is not None:
                errors.append((f.source, item["error"]))
                continue
            label = None
            if args.target.lower() == "label":
                label = find_cub_label(f.source)
                if label is None or not 0 <= label < model.num_classes:
                    errors.append((f.source, f"{f.source}: no label (not inside a CUB-layout dataset)"))
                    continue
            good.append((f, item, label))
        by_shape: dict[tuple, list] = {}
        for entry in good:
            by_shape.setdefault(tuple(entry[1]["x"].shape), []).append(entry)
        for group in by_shape.values():
            x = torch.stack([item["x"] for _, item, _ in group])
            geos: list[Geometry] = [item["geometry"] for _, item, _ in group]
            exps = explain_tensor(
                model,
                x,
                geos,
                target_spec,
                labels=[label for _, _, label in group],
                gradcam="gradcam" in maps,
                method=args.method,
                channel_gradcam="channel_gradcam" in maps,
                guided="guided" in maps,
                device=device,
            )
            for (f, item, _), exp in zip(group, exps, strict=True):
                try:
                    write_outputs(bases[f.key], f.source, item["thumb"], exp, model.class_names, options)
                    written += 1
                except OSError as exc:
                    errors.append((f.source, f"{f.source}: cannot write outputs ({exc})"))
        if progress is not None:
            progress.update(len(items))
    if progress is not None:
        progress.close()

    suffix = "" if shard_n == 1 else f".shard-{shard_i}-of-{shard_n}"
    rows = []
    for f in files:
        js = bases[f.key].with_name(bases[f.key].name + ".json")
        if js.is_file():
            rec = json.loads(js.read_text(encoding="utf-8"))
            rows.append(
                [
                    f.source,
                    ";".join(_relative_output(f.key, o) for o in rec["outputs"]),
                    rec["prediction"]["name"],
                    f"{rec['prediction']['prob']:.6f}",
                    rec["target"]["name"],
                ]
            )
    atomic_write_text(out_dir / f"index{suffix}.csv", _csv_text(["file", "outputs", "prediction", "prob", "target"], rows))
    atomic_write_text(out_dir / f"errors{suffix}.csv", _csv_text(["file", "reason"], errors))
    manifest = {
        "checkpoint": {"path": str(ckpt.resolve()), "sha256": _sha256(ckpt)},
        "versions": _versions(),
        "options": options,
        "counts": {"inputs": len(files), "ok": written, "failed": len(errors), "skipped": skipped},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(out_dir / f"manifest{suffix}.json", manifest)
    print(
        f"mcloss export: {written} exported, {skipped} already done, {len(errors)} rejected → {out_dir}",
        file=sys.stderr,
    )
    for _source, reason in errors:
        print(f"  rejected: {reason}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
