"""Writing a synthetic fine-grained "bird parts" dataset in the exact CUB_200_2011 layout (``mcloss synth``).

Every image shows one bird of seven named parts in a random pose on a cluttered background
(:mod:`~mcloss.data.synth.drawing`); classes come from :mod:`~mcloss.data.synth.design`. Besides the CUB
index files, boxes and part keypoints, it writes per-image masks of the visible pixels as lossless PNGs:
``segmentations/<image path>.png`` (255 bird, 0 not; CUB_200_2011's segmentation layout) and
``part_masks/<image path>.png`` (0 background or occluder, i part i of parts.txt, ``BODY_LABEL`` the body
outside the parts). ``synth.json`` records the arguments, the mask layout and every class's definition,
including the parts it changes from the base bird (its *defining parts*). The dataset is written to a
temporary sibling directory and moved into place, so the output is never half-written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcloss.core.errors import OutputError
from mcloss.core.files import default_mode
from mcloss.data.io import encode_image
from mcloss.data.synth.design import (
    ATTRIBUTES,
    BASE_ATTRIBUTES,
    BODY_LABEL,
    CLASS_PARTS,
    FORMAT_NAME,
    FORMAT_VERSION,
    JPEG_QUALITY,
    MIN_VISIBLE_FRACTION,
    PART_NAMES,
    BirdClass,
    SynthError,
    class_definitions,
)
from mcloss.data.synth.drawing import (
    instance_rng,
    render_bird,
)

__all__ = ["PART_MASKS_DIR", "SEGMENTATIONS_DIR", "generate_dataset", "is_synth_output", "mask_rel_path", "read_synth_meta"]

# ------------------------------------------------------------------------------------------------ writing


#: Folders of the per-image masks, each mirroring images/ with a .png per image.
SEGMENTATIONS_DIR = "segmentations"
PART_MASKS_DIR = "part_masks"


def mask_rel_path(image_rel: str) -> str:
    """``<folder>/<stem>.jpg`` → ``<folder>/<stem>.png``: an image's mask path inside a mask folder."""
    return Path(image_rel).with_suffix(".png").as_posix()


def _render_job(job: tuple[int, int, int, BirdClass, str, str, int, float]) -> tuple[list[float], list[list[float]]]:
    """Worker: render image ``index`` and write it and its masks under ``root``; returns (bbox, parts)."""
    index, seed, size, bird, root, rel, quality, object_scale = job
    rendered = render_bird(bird, size, instance_rng(seed, index), object_scale)
    base = Path(root)
    (base / "images" / rel).write_bytes(encode_image(rendered.image, "jpeg", quality=quality))
    silhouette = np.where(rendered.labels > 0, 255, 0).astype(np.uint8)
    (base / SEGMENTATIONS_DIR / mask_rel_path(rel)).write_bytes(encode_image(silhouette, "png"))
    (base / PART_MASKS_DIR / mask_rel_path(rel)).write_bytes(encode_image(rendered.labels, "png"))
    return list(rendered.bbox), rendered.parts.tolist()


def _masks_meta() -> dict:
    """The ``masks`` entry of synth.json: where the masks are and what their values mean."""
    labels = {"0": "background or occluder"} | {str(i + 1): name for i, name in enumerate(PART_NAMES)}
    return {
        "segmentations": f"{SEGMENTATIONS_DIR}/<image path with .png>: uint8, 255 = visible bird, 0 = not",
        "part_masks": f"{PART_MASKS_DIR}/<image path with .png>: uint8 label per pixel of the visible bird",
        "labels": labels | {str(BODY_LABEL): "body"},
        "format": "lossless 8-bit grayscale PNG, the image's size; no anti-aliasing; the eye is part of the head",
    }


def read_synth_meta(root: str | os.PathLike) -> dict | None:
    """The ``synth.json`` of a dataset root as a dict, or None when there is none (or it is unreadable)."""
    try:
        meta = json.loads((Path(root) / "synth.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_synth_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a previous ``mcloss synth`` output (its synth.json says so)."""
    meta = read_synth_meta(path)
    return meta is not None and meta.get("format") == FORMAT_NAME


def _check_out(out: Path) -> None:
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SynthError(f"out {out}: {ancestor} is not a directory", parameter="out")
    if out.exists() and not out.is_dir():
        raise SynthError(f"out {out}: exists and is not a directory", parameter="out")
    if out.is_dir() and any(out.iterdir()) and not is_synth_output(out):
        raise SynthError(
            f"out {out}: directory is not empty and is not a previous 'mcloss synth' output "
            "(no synth.json); choose a new or empty directory",
            parameter="out",
        )


def _split_counts(per_class: int, test_fraction: float) -> tuple[int, int]:
    n_test = int(math.floor(per_class * test_fraction + 0.5))
    if 0.0 < test_fraction < 1.0:
        if per_class < 2:
            raise SynthError(
                f"per_class {per_class} cannot be split into train and test; use at least 2", parameter="per_class"
            )
        n_test = min(max(n_test, 1), per_class - 1)
    return per_class - n_test, n_test


def _fmt(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") if v != int(v) else f"{v:.1f}"


@dataclass(frozen=True)
class _Request:
    """The arguments of one :func:`generate_dataset` call, as given."""

    classes: int
    per_class: int
    size: int
    seed: int
    test_fraction: float
    jpeg_quality: int
    workers: int
    object_scale: float
    design: str

    def check(self) -> None:
        """Raise SynthError naming the first unusable argument."""
        for name, value, low in (("classes", self.classes, 2), ("per_class", self.per_class, 1)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise SynthError(f"{name} must be an integer >= {low}, got {value!r}", parameter=name)
        checks = (
            (isinstance(self.size, (int, np.integer)) and 32 <= self.size <= 4096, "size",
             f"must be an integer between 32 and 4096 pixels, got {self.size!r}"),
            (isinstance(self.seed, (int, np.integer)) and self.seed >= 0, "seed",
             f"must be a non-negative integer, got {self.seed!r}"),
            (0.0 <= float(self.test_fraction) <= 1.0, "test_fraction", f"must be between 0 and 1, got {self.test_fraction}"),
            (1 <= int(self.jpeg_quality) <= 100, "jpeg_quality", f"must be between 1 and 100, got {self.jpeg_quality}"),
            (int(self.workers) >= 1, "workers", f"must be >= 1, got {self.workers}"),
            (0.25 <= float(self.object_scale) <= 2.5, "object_scale", f"must be between 0.25 and 2.5, got {self.object_scale}"),
        )  # fmt: skip
        for ok, name, rule in checks:
            if not ok:
                raise SynthError(f"{name} {rule}", parameter=name)

    def command(self) -> str:
        """The ``mcloss synth`` command that writes the same dataset (recorded in synth.json)."""
        return (
            f"mcloss synth --out DIR --classes {self.classes} --per-class {self.per_class} --size {self.size} "
            f"--seed {self.seed} --test-fraction {float(self.test_fraction)} --jpeg-quality {self.jpeg_quality}"
            + (f" --object-scale {float(self.object_scale)}" if float(self.object_scale) != 1.0 else "")
            + (f" --design {self.design}" if self.design != "single" else "")
        )


def generate_dataset(
    out: str | os.PathLike,
    classes: int,
    per_class: int,
    size: int,
    seed: int,
    *,
    test_fraction: float = 0.5,
    jpeg_quality: int = JPEG_QUALITY,
    workers: int = 1,
    object_scale: float = 1.0,
    design: str = "single",
) -> dict:
    """Write a synthetic CUB-layout dataset to ``out``; returns a summary (counts, time, images/s).

    The dataset is written to a temporary sibling directory and moved into place at the end, so ``out``
    is never left half-written. Every file depends only on the arguments (not on ``out`` or ``workers``),
    so the same call writes byte-identical files. ``out`` may be missing, empty, or a previous synth output (replaced).

    Raises:
        SynthError: invalid counts/size/seed or an unusable output directory.
        OutputError: the dataset cannot be written (the message names ``out`` and the reason).
    """
    request = _Request(classes, per_class, size, seed, test_fraction, jpeg_quality, workers, object_scale, design)
    request.check()
    birds = class_definitions(int(classes), design)
    n_train, n_test = _split_counts(int(per_class), float(test_fraction))
    out = Path(out)
    _check_out(out)
    start = time.perf_counter()
    try:
        images = _write_dataset(out, request, birds, n_train, n_test)
    except OSError as exc:
        raise OutputError(f"out {out}: cannot write the dataset ({exc})", parameter="out") from exc
    seconds = time.perf_counter() - start
    return {
        "out": str(out),
        "classes": int(classes),
        "per_class": int(per_class),
        "size": int(size),
        "seed": int(seed),
        "images": images,
        "train": n_train * int(classes),
        "test": n_test * int(classes),
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 1) if seconds > 0 else float("inf"),
    }


def _write_dataset(out: Path, request: _Request, birds: list[BirdClass], n_train: int, n_test: int) -> int:
    """Write the whole dataset to a temporary sibling of ``out``, then move it into place; the image count."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes 0700
    try:
        jobs, lines = _plan_images(tmp, request, birds, n_train)
        results = _render_all(jobs, int(request.workers))
        texts = _index_texts(birds, lines, results)
        (tmp / "parts").mkdir()
        for rel, rows in texts.items():
            (tmp / rel).write_text("\n".join(rows) + "\n", encoding="utf-8")
        meta = _synth_meta(request, birds, n_train, n_test)
        (tmp / "synth.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(jobs)


def _plan_images(
    tmp: Path, request: _Request, birds: list[BirdClass], n_train: int
) -> tuple[list[tuple], dict[str, list[str]]]:
    """Make every class's folders under ``tmp``; the render jobs and the lines of the image index files."""
    jobs, lines = [], {"images": [], "labels": [], "split": []}
    for c, bird in enumerate(birds):
        folder = f"{c + 1:03d}.{bird.name}"
        for top in ("images", SEGMENTATIONS_DIR, PART_MASKS_DIR):
            (tmp / top / folder).mkdir(parents=True)
        for k in range(request.per_class):
            index = c * request.per_class + k
            rel = f"{folder}/{bird.name}_{index + 1:05d}.jpg"
            jobs.append((index, int(request.seed), int(request.size), bird, str(tmp), rel,
                         int(request.jpeg_quality), float(request.object_scale)))  # fmt: skip
            lines["images"].append(f"{index + 1} {rel}")
            lines["labels"].append(f"{index + 1} {c + 1}")
            lines["split"].append(f"{index + 1} {1 if k < n_train else 0}")
    return jobs, lines


def _render_all(jobs: list[tuple], workers: int) -> list[tuple[list[float], list[list[float]]]]:
    """Run the render jobs, in ``workers`` threads; their (bbox, parts) in job order."""
    if workers > 1 and len(jobs) > 1:
        # threads, not forked processes: forking a process that already runs torch/OpenMP threads can
        # deadlock; OpenCV drawing and JPEG encoding release the GIL
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(_render_job, jobs, chunksize=16))
    return [_render_job(job) for job in jobs]


def _index_texts(
    birds: list[BirdClass], lines: dict[str, list[str]], results: list[tuple[list[float], list[list[float]]]]
) -> dict[str, list[str]]:
    """The CUB index files (path relative to the root → lines)."""
    boxes = [f"{i + 1} " + " ".join(_fmt(v) for v in bbox) for i, (bbox, _) in enumerate(results)]
    locs = [
        f"{i + 1} {p + 1} {x:.2f} {y:.2f} {int(v)}"
        for i, (_, parts) in enumerate(results)
        for p, (x, y, v) in enumerate(parts)
    ]
    return {
        "images.txt": lines["images"],
        "classes.txt": [f"{c + 1} {c + 1:03d}.{bird.name}" for c, bird in enumerate(birds)],
        "image_class_labels.txt": lines["labels"],
        "train_test_split.txt": lines["split"],
        "bounding_boxes.txt": boxes,
        "parts/parts.txt": [f"{p + 1} {name}" for p, name in enumerate(PART_NAMES)],
        "parts/part_locs.txt": locs,
    }


def _synth_meta(request: _Request, birds: list[BirdClass], n_train: int, n_test: int) -> dict:
    """synth.json: the arguments, the split, the parts and attributes, every class's definition, the masks."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "classes": int(request.classes),
        "per_class": int(request.per_class),
        "size": int(request.size),
        "seed": int(request.seed),
        "test_fraction": float(request.test_fraction),
        "jpeg_quality": int(request.jpeg_quality),
        "object_scale": float(request.object_scale),
        "design": request.design,
        "command": request.command(),
        "split": {"train_per_class": n_train, "test_per_class": n_test},
        "parts": list(PART_NAMES),
        "class_parts": list(CLASS_PARTS),
        "attributes": {part: {k: list(v) for k, v in attrs.items()} for part, attrs in ATTRIBUTES.items()},
        "base": BASE_ATTRIBUTES,
        "class_definitions": [{"id": c + 1, **bird.to_dict()} for c, bird in enumerate(birds)],
        "min_visible_fraction": MIN_VISIBLE_FRACTION,
        "coordinates": "original pixels, pixel i covers [i, i+1); invisible parts are 0 0 0 as in CUB",
        "masks": _masks_meta(),
    }


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an empty or previous-output ``dst``."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{dst.name}.old-", dir=dst.parent))
        old.rmdir()
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
