"""Batch export of explanations for many images (the library behind ``mcloss export``).

Inputs are collected by :func:`mcloss.data.files.collect_inputs` (files, directories, globs); outputs mirror
them under ``out``: a file inside a directory input ``D`` lands at ``<name of D>/<path inside D>``, a single
file or a glob match at the top level. The output stem is the input's file name *with* its extension, so
``a.jpg`` and ``a.png`` do not collide; a remaining clash gets ``~2``, ``~3``... Per image, the files of
:mod:`mcloss.explainability.outputs` (montage PNGs, raw-map NPZ, and last the JSON record: an image is
finished when its json exists, and a re-run skips it). Every file is written atomically.

Images are decoded in DataLoader workers and explained with :func:`mcloss.explainability.explanation.explain`
(one forward pass per batch of same-shape inputs). When the checkpoint's card knows its classes' defining
parts, each target's json entry says which they are and how much the maps prefer them: on the image itself
when it lies inside a CUB-layout dataset with part keypoints or part masks
(:func:`mcloss.data.annotations.image_annotations`), else the card's fresh-set figure. At the end: ``manifest.json`` (checkpoint + sha256,
versions, options, counts), ``index.csv`` (one row per finished image) and ``errors.csv`` (file, reason for
each rejected input). With a shard ``i/n`` those three are named ``manifest.shard-i-of-n.json`` etc.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from mcloss.core.errors import DatasetError
from mcloss.core.provenance import versions
from mcloss.core.transforms import EvalTransform
from mcloss.data.annotations import PartAnnotations, image_annotations
from mcloss.data.cub import cub_label
from mcloss.data.files import InputFile, collect_inputs, output_path
from mcloss.data.io import ImageLoadError, atomic_write_json, atomic_write_text, csv_text
from mcloss.explainability.defining import defining_summaries, has_defining_parts
from mcloss.explainability.explanation import DEFAULT_MAPS, PreparedImage, explain, parse_maps, prepare
from mcloss.explainability.render import Style
from mcloss.explainability.targets import check_target

__all__ = ["ExportConfig", "ExportResult", "ImageFiles", "export", "parse_shard"]


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how (recorded as the manifest's ``options``).

    Attributes:
        checkpoint: the checkpoint file (for the manifest).
        input: files, directories and globs.
        out: output directory.
        target: a target spec for every image (``pred``, ``pred_mc``, ``label``, ``topK``, a class).
        maps: map kinds (:data:`mcloss.explainability.explanation.MAP_KINDS`).
        style: how montages are drawn.
        topk: entries in each json's ``topk`` list.
        batch_size: images per forward pass.
        workers: DataLoader decoding workers (0 = in process).
        device: where the model runs (for the manifest).
        shard: (i, n): process every n-th input starting at i.
        method: ``fused`` or ``captum`` Grad-CAM.
    """

    checkpoint: str
    input: Sequence[str]
    out: str
    target: str = "pred"
    maps: Sequence[str] = DEFAULT_MAPS
    style: Style = field(default_factory=Style)
    topk: int = 5
    batch_size: int = 16
    workers: int = 2
    device: str = "cpu"
    shard: tuple[int, int] = (0, 1)
    method: str = "fused"

    def __post_init__(self) -> None:
        for flag, value, low in (("--topk", self.topk, 0), ("--batch-size", self.batch_size, 1), ("--workers", self.workers, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")

    def options(self) -> dict:
        """The manifest's ``options``: every setting, flat."""
        return {
            "checkpoint": self.checkpoint,
            "input": list(self.input),
            "out": self.out,
            "target": self.target,
            "maps": list(parse_maps(self.maps)),
            "colormap": self.style.colormap,
            "alpha": self.style.alpha,
            "shared_scale": self.style.shared_scale,
            "tile_height": self.style.tile_height,
            "topk": self.topk,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "device": self.device,
            "shard": list(self.shard),
            "method": self.method,
        }


@dataclass
class ExportResult:
    """What an export did.

    Attributes:
        out: the output directory.
        inputs: inputs of this shard.
        written: images exported by this run.
        skipped: images already finished by an earlier run.
        errors: (file, reason) of every rejected input.
        manifest: the manifest path.
    """

    out: Path
    inputs: int
    written: int
    skipped: int
    errors: list[tuple[str, str]]
    manifest: Path


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 <= i < n."""
    parts = text.strip().split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[1]) < 1 or int(parts[0]) >= int(parts[1]):
        raise ValueError(f"--shard must be i/n with 0 <= i < n, got {text!r}")
    return int(parts[0]), int(parts[1])


# ------------------------------------------------------------------------------------------- decoding


class ImageFiles(Dataset):
    """Decodes inputs in DataLoader workers: an item is (index, PreparedImage) or (index, error string).

    The prepared image's view is a thumbnail of ``thumb_height`` rows, what the montages are drawn on.
    """

    def __init__(self, files: Sequence[InputFile], transform: EvalTransform, thumb_height: int) -> None:
        self.files = list(files)
        self.transform = transform
        self.thumb_height = thumb_height

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, PreparedImage | str]:
        source = self.files[index].source
        try:
            return index, prepare(self.transform, source, view="height", view_size=self.thumb_height)
        except ImageLoadError as exc:
            return index, str(exc)
        except Exception as exc:  # noqa: BLE001 - a worker must never die on one bad file
            return index, f"{source}: {type(exc).__name__}: {exc}"


def _collate(items: list) -> list:
    return items


# ------------------------------------------------------------------------------------------- export


def export(
    model, config: ExportConfig, *, device: torch.device, progress: Callable[[int, int], None] | None = None
) -> ExportResult:
    """Export every input of ``config`` not already finished in ``config.out``; returns what was done.

    Args:
        model: the MCModel (on ``device``).
        config: inputs, outputs and options.
        device: where the model runs.
        progress: called as ``(done, total)`` with the inputs of this run handled so far, at the start and
            after each batch.

    Raises:
        ValueError, KeyError, IndexError: an unusable option (unknown map kind, target or class), before
            any work is done.
    """
    maps = parse_maps(config.maps)
    target = str(config.target)
    spec = check_target(model, target)  # an unknown class or a bad topK fails before any work
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_i, shard_n = config.shard
    files = collect_inputs(config.input)[shard_i::shard_n]
    bases = {f.key: output_path(out_dir, f.key) for f in files}
    todo = [f for f in files if not _finished(bases[f.key])]
    errors: list[tuple[str, str]] = []
    written = 0
    t0 = time.perf_counter()
    loader = DataLoader(
        ImageFiles(todo, model.transform, config.style.tile_height),
        batch_size=max(1, config.batch_size),
        num_workers=max(0, config.workers),
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    done = 0
    knows_defining = has_defining_parts(model.card)
    if progress is not None:
        progress(done, len(todo))
    for items in loader:
        good, labels = [], []
        for index, item in items:
            f = todo[index]
            if isinstance(item, str):
                errors.append((f.source, item))
                continue
            label = None
            if spec == "label":
                try:
                    label = cub_label(f.source)
                except DatasetError as exc:
                    errors.append((f.source, f"{f.source}: no label ({exc})"))
                    continue
                if label is None or not 0 <= label < model.num_classes:
                    errors.append((f.source, f"{f.source}: no label (not inside a CUB-layout dataset)"))
                    continue
            good.append((f, item))
            labels.append(label)
        if good:
            exps = explain(
                model, [item for _, item in good], spec, maps=maps, labels=labels, method=config.method, device=device
            )
            for (f, item), exp in zip(good, exps, strict=True):
                defining = defining_summaries(model.card, exp, _annotations(f.source) if knows_defining else None)
                try:
                    exp.save(bases[f.key], config.style, topk=config.topk, image=item.view, defining=defining)
                    written += 1
                except OSError as exc:
                    errors.append((f.source, f"{f.source}: cannot write outputs ({exc})"))
        done += len(items)
        if progress is not None:
            progress(done, len(todo))

    suffix = "" if shard_n == 1 else f".shard-{shard_i}-of-{shard_n}"
    rows = [_index_row(f, bases[f.key]) for f in files if _finished(bases[f.key])]
    atomic_write_text(out_dir / f"index{suffix}.csv", csv_text(["file", "outputs", "prediction", "prob", "target"], rows))
    atomic_write_text(out_dir / f"errors{suffix}.csv", csv_text(["file", "reason"], errors))
    checkpoint = Path(config.checkpoint)
    manifest = {
        "checkpoint": {"path": str(checkpoint.resolve()), "sha256": _sha256(checkpoint)},
        "versions": versions(),
        "options": config.options(),
        "counts": {"inputs": len(files), "ok": written, "failed": len(errors), "skipped": len(files) - len(todo)},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    manifest_path = out_dir / f"manifest{suffix}.json"
    atomic_write_json(manifest_path, manifest)
    return ExportResult(out_dir, len(files), written, len(files) - len(todo), errors, manifest_path)


def _annotations(source: str) -> PartAnnotations | None:
    """The part annotations of an input inside a CUB-layout dataset; None elsewhere or when unreadable."""
    try:
        return image_annotations(source)
    except DatasetError:  # a malformed dataset or mask: the json falls back to the card's figure
        return None


def _json_path(base: Path) -> Path:
    return base.with_name(base.name + ".json")


def _finished(base: Path) -> bool:
    return _json_path(base).is_file()


def _index_row(f: InputFile, base: Path) -> list[str]:
    rec = json.loads(_json_path(base).read_text(encoding="utf-8"))
    folder = f.key.rsplit("/", 1)[0] if "/" in f.key else ""
    outputs = [f"{folder}/{name}" if folder else name for name in rec["outputs"]]
    return [f.source, ";".join(outputs), rec["prediction"]["name"], f"{rec['prediction']['prob']:.6f}", rec["target"]["name"]]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
