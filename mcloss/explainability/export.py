"""Batch export of explanations for many images (the library behind ``mcloss export``).

Inputs are collected by :func:`mcloss.data.files.collect_inputs` (files, directories, globs); outputs mirror
them under ``out``: a file inside a directory input ``D`` lands at ``<name of D>/<path inside D>``, a single
file or a glob match at the top level. The output stem is the input's file name *with* its extension, so
``a.jpg`` and ``a.png`` do not collide; a remaining clash gets ``~2``, ``~3``... Per image, the files of
:mod:`mcloss.explainability.outputs` (montage PNGs, raw-map NPZ, and last the JSON record: an image is
finished when its json exists, and a re-run skips it). Every file is written atomically.

The export is a small pipeline:

1. **Plan** (:func:`plan_export`): the inputs of this shard, the options each image's json records, and
   which images an earlier run already finished with them (skipped) or with others (re-done); then the
   temps a killed run left are swept, one listing per output folder.
2. **Explain** a batch: images are decoded in DataLoader workers (:class:`mcloss.data.inputs.ImageFiles`)
   and explained with :func:`mcloss.explainability.explanation.explain` (one forward pass per batch of
   same-shape inputs).
3. **Write** each image's files (:func:`mcloss.explainability.outputs.write_explanation`, with the run's one
   :class:`~mcloss.explainability.outputs.OutputOptions`). On a GPU writer processes (or, with few free
   CPUs, two threads: :func:`writer_processes`) draw, encode and write a batch's files while the model runs
   the next one; on a CPU two lanes each explain a batch with half of torch's threads and then write it
   (:func:`cpu_lanes`).
4. **Finish**: ``manifest.json`` (checkpoint + sha256, versions, options, counts), ``index.csv`` (one row
   per finished image) and ``errors.csv`` (file, reason for each rejected input). With a shard ``i/n``
   (``shard``; under torchrun each rank exports its share) those three are named
   ``manifest.shard-i-of-n.json`` etc., and :func:`merge_shards` (also ``mcloss export --merge OUT``) merges
   them.

While it runs, an export holds ``out`` (:func:`hold_output`: a lock file naming its pid, removed at the end):
a second export into a folder a live one holds is refused before it writes anything (the shards of one split
may run side by side), and the lock of a killed export is taken over.

When the checkpoint's card knows its classes' defining parts, each target's json entry says which they are
and how much the maps prefer them: on the image itself when it lies inside a CUB-layout dataset with part
keypoints or part masks (:func:`mcloss.data.annotations.image_annotations`), else the card's fresh-set
figure.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from mcloss.core import processes
from mcloss.core.errors import (
    DatasetError,
    MclossError,
    OutputError,
    ParameterError,
    Progress,
    check_callback,
)
from mcloss.core.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    csv_text,
    file_sha256,
    json_safe,
    printable,
)
from mcloss.core.lock import FolderLock, hold_folder
from mcloss.core.model import model_guard
from mcloss.core.provenance import versions
from mcloss.data.annotations import PartAnnotations, image_annotations
from mcloss.data.cub import cub_label
from mcloss.data.files import InputFile, collect_inputs, output_path, pattern_folder
from mcloss.data.inputs import ImageFiles, PreparedImage, collate_items
from mcloss.data.io import DEFAULT_QUALITY, check_encoding
from mcloss.explainability import kinds
from mcloss.explainability.contrast import check_contrast
from mcloss.explainability.defining import defining_summaries, has_defining_parts
from mcloss.explainability.explanation import explain, parse_maps, view_maker
from mcloss.explainability.outputs import (
    Comparison,
    OutputOptions,
    input_stamp,
    read_record,
    stale_temps,
    write_explanation,
)
from mcloss.explainability.render import Style
from mcloss.explainability.targets import check_target

if TYPE_CHECKING:
    from mcloss.core.model import MCModel
    from mcloss.core.transforms import EvalTransform
    from mcloss.explainability.explanation import Explanation

__all__ = [
    "ExportConfig",
    "ExportPlan",
    "ExportResult",
    "LOCK_STEM",
    "check_config",
    "cpu_lanes",
    "MergeError",
    "die_with_parent",
    "export",
    "hold_output",
    "merge_shards",
    "parse_shard",
    "plan_export",
    "shard_suffix",
    "writer_processes",
]

#: The lock file a live export holds in its output folder: ``.mcloss-export.lock`` (shard i of n:
#: ``.mcloss-export.shard-i-of-n.lock``), see :func:`hold_output`.
LOCK_STEM = ".mcloss-export"
#: Threads that draw, encode and write each batch's files while the model runs the next batch, where no
#: writer processes do (:func:`writer_processes`). OpenCV and zlib release the GIL, but the rest of a write
#: holds it: on 16 cores, 2 threads wrote 1.45× (JPEG) to 1.79× (PNG) as fast as one, and 4 to 14 no faster
#: than 1.5× to 2.3× (``benchmarks/h200-2026-12-04-writers``).
WRITER_THREADS = 2
#: Most writer processes an export starts by itself. On the H200 node's 16 cores they wrote 4.7× (JPEG) to
#: 5.9× (PNG) as fast as one thread at 8 processes and 5.4× to 8.0× at 14, the most measured.
MOST_WRITER_PROCESSES = 14
#: Fewest free CPUs for which an export starts writer processes by itself: at 2, processes wrote little
#: faster than :data:`WRITER_THREADS` threads (1.42× against 1.45× for JPEG, 2.05× against 1.79× for PNG).
MIN_WRITER_PROCESSES = 3
#: Batches a CPU export explains at once (see :func:`cpu_lanes`).
CPU_LANES = 2
#: Most images per forward pass in a CPU lane. A ResNet-18 pass over 16 images at 224 px allocates activations
#: of 50 MB and more, which glibc maps fresh for every pass: 5 ms of system time per image went to page faults
#: (2026-12-01, 2-core VM), 0.8 ms in passes of 8, at the same user time. The ``mcloss`` command keeps such
#: blocks in the heap (:func:`mcloss.core.device.keep_tensors_in_heap`), and there 4, 8 and 16 run alike; 8 also
#: spares a library caller who has not.
CPU_LANE_PASS = 8


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how (recorded as the manifest's ``options``).

    Attributes:
        checkpoint: the checkpoint file (for the manifest).
        input: files, directories and globs.
        out: output directory.
        target: a target spec for every image (``pred``, ``pred_mc``, ``label``, ``topK``, a class).
        maps: map kinds (:func:`mcloss.explainability.kinds.names`).
        style: how montages are drawn.
        topk: entries in each json's ``topk`` list.
        batch_size: images per forward pass.
        workers: DataLoader decoding workers (0 = in process).
        device: where the model runs (for the manifest).
        shard: (i, n): process every n-th input starting at i.
        method: ``fused`` or ``captum`` Grad-CAM.
        compare: a second checkpoint with the same classes, explained for the same targets and drawn in the
            same montages, or None.
        montage: draw and write each target's montage; False writes the npz and the json only.
        montage_format: ``png`` (lossless, the default), ``jpg`` or ``webp`` (:data:`mcloss.data.io.IMAGE_FORMATS`).
        quality: the lossy formats' quality, 1..100 (recorded only for them).
        contrast: ``"auto"`` or a class (name or index): each target is also explained against that class
            (Finer-CAM and the group contrast, :mod:`mcloss.explainability.contrast`); None: no contrast.
        writers: processes that draw and write the files beside the model's thread (a GPU export, or a CPU
            export in one lane: :func:`cpu_lanes`); 0: :data:`WRITER_THREADS` threads in this process; None:
            chosen by :func:`writer_processes`. Processes draw every montage on the CPU, so a CUDA model's JPEG
            montages, which threads compose and encode on the GPU, differ in their bytes; no other file does.
    """

    checkpoint: str
    input: Sequence[str]
    out: str
    target: str = "pred"
    maps: Sequence[str] | None = None
    style: Style = field(default_factory=Style)
    topk: int = 5
    batch_size: int = 16
    workers: int = 2
    device: str = "cpu"
    shard: tuple[int, int] = (0, 1)
    method: str = "fused"
    compare: str | None = None
    montage: bool = True
    montage_format: str = "png"
    quality: int = DEFAULT_QUALITY
    contrast: str | None = None
    writers: int | None = None

    def __post_init__(self) -> None:
        check_encoding(self.montage_format, self.quality)
        counts = [("topk", self.topk, 0), ("batch_size", self.batch_size, 1), ("workers", self.workers, 0)]
        for name, value, low in counts + ([] if self.writers is None else [("writers", self.writers, 0)]):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ParameterError(f"{name} must be an integer >= {low}, got {value!r}", parameter=name)

    def output_options(self, checkpoint_sha256: str, compare_sha256: str | None = None) -> dict:
        """The settings that shape each image's outputs, recorded in its json as ``options``: a re-run
        re-does an image whose recorded options differ (another checkpoint, target, maps or style)."""
        extra = {} if compare_sha256 is None else {"compare_sha256": compare_sha256}
        return {"checkpoint_sha256": checkpoint_sha256, **extra, **self._shaping()}

    def options(self) -> dict:
        """The manifest's ``options``: every setting, flat."""
        return {
            "checkpoint": self.checkpoint,
            "input": list(self.input),
            "out": self.out,
            **self._shaping(),
            "batch_size": self.batch_size,
            "workers": self.workers,
            "writers": self.writers,
            "device": self.device,
            "shard": list(self.shard),
            "compare": self.compare,
        }

    def _shaping(self) -> dict:
        drawing = {
            "colormap": self.style.colormap,
            "alpha": self.style.alpha,
            "shared_scale": self.style.shared_scale,
            "tile_height": self.style.tile_height,
        }
        if self.montage_format != "png":  # a PNG export records what it always did
            drawing |= {"montage_format": self.montage_format, "quality": self.quality}
        maps, contrast = kinds.contrast_maps(parse_maps(self.maps), self.contrast)
        return {
            "target": self.target,
            "maps": list(maps),
            **({} if contrast is None else {"contrast": str(contrast)}),
            # an export with montages records what it always did; one without records no drawing settings,
            # which change none of its files
            **(drawing if self.montage else {"montage": False}),
            "topk": self.topk,
            "method": self.method,
        }


@dataclass
class ExportResult:
    """What an export did.

    Attributes:
        out: the output directory.
        inputs: inputs of this shard: the image files it found, and each input that gave none (a dangling link,
            an empty folder), so that ``written + skipped + len(errors) == inputs``.
        written: images exported by this run.
        redone: of ``written``, images an earlier run had finished (see ``redone_because``).
        skipped: images already finished by an earlier run with the same options, from the same input.
        errors: (file, reason) of every rejected input.
        manifest: the manifest path.
        redone_because: ``redone`` by reason (:data:`STALE_REASONS`).
    """

    out: Path
    inputs: int
    written: int
    redone: int
    skipped: int
    errors: list[tuple[str, str]]
    manifest: Path
    redone_because: dict[str, int] = field(default_factory=dict)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 <= i < n."""
    parts = text.strip().split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[1]) < 1 or int(parts[0]) >= int(parts[1]):
        raise ParameterError(f"shard must be i/n with 0 <= i < n, got {text!r}", parameter="shard")
    return int(parts[0]), int(parts[1])


# ------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ExportPlan:
    """What an export will do, decided before any image is decoded (:func:`plan_export`).

    Attributes:
        config: the export's settings.
        out: the output directory.
        sha256: the checkpoint's sha256.
        maps: the map kinds, parsed (with the contrastive ones under a contrast).
        contrast: the contrast, checked against the model (``"auto"`` or a class index), or None.
        target: the target spec, checked against the model.
        files: the inputs of this shard, in input order.
        problems: (input, reason) of every input that gave no file (shard 0 reports them; others none).
        bases: each input's output stem, by its key.
        records: the json an earlier run finished each input with, by its key (None: none, or unreadable).
        stamps: each input file's real path, size and modification time, by its key (None: unreadable).
        todo: the inputs to export: those without a current record (see :attr:`skipped`).
        why: why each of ``todo`` is exported, by its key (:data:`STALE_REASONS`, or ``"absent"``), as planned.
        output: how every image's files are written; its ``options`` are recorded in each json.
        titles: the two checkpoints' file names with ``config.compare``, else None.
        compare_sha256: the second checkpoint's sha256 with ``config.compare``, else None.
        card: the model's card (its classes' defining parts, when known).
    """

    config: ExportConfig
    out: Path
    sha256: str
    maps: tuple[str, ...]
    contrast: int | str | None
    target: int | str
    files: list[InputFile]
    problems: list[tuple[str, str]]
    bases: dict[str, Path]
    records: dict[str, dict | None]
    stamps: dict[str, dict | None]
    todo: list[InputFile]
    why: dict[str, str]
    output: OutputOptions
    titles: tuple[str, str] | None = None
    compare_sha256: str | None = None
    card: dict = field(default_factory=dict)

    @property
    def wanted(self) -> dict:
        """The options each image's json records (a re-run re-does an image whose options differ)."""
        return self.output.options or {}

    @property
    def skipped(self) -> int:
        """Images an earlier run finished with the same options."""
        return len(self.files) - len(self.todo)

    def stale(self, f: InputFile, record: dict | None) -> str | None:
        """Why ``record`` does not stand for ``f`` (:func:`_stale`); None when it does."""
        return _stale(record, self.wanted, self.stamps[f.key], self.bases[f.key], f.source)

    @property
    def knows_defining(self) -> bool:
        """Whether the card knows its classes' defining parts (then each json reports them)."""
        return has_defining_parts(self.card)


def plan_export(
    model: MCModel, config: ExportConfig, *, checkpoint_sha256: str | None = None, compare_model: MCModel | None = None
) -> ExportPlan:
    """Check ``config`` against the model(s), make the output folder, collect this shard's inputs and read
    what an earlier run left there (see :func:`export` for the arguments); nothing is removed or written.

    Raises:
        ParameterError, UnknownClassError, OutOfRangeError: an unusable option (unknown map kind, target or
            class, a second model that does not match), before any work is done.
    """
    maps, target, contrast = _checked_options(model, config)
    out = Path(config.out)
    _check_out_apart(out, config.input)
    out.mkdir(parents=True, exist_ok=True)
    sha256 = checkpoint_sha256 or file_sha256(Path(config.checkpoint))
    titles, compare_sha = _check_compare(model, config, compare_model)
    wanted = config.output_options(sha256, compare_sha)
    shard_i, shard_n = config.shard
    found = collect_inputs(config.input, exclude=out)
    files = found.files[shard_i::shard_n]
    bases = {f.key: output_path(out, f.key) for f in files}
    records = {f.key: read_record(bases[f.key]) for f in files}
    stamps = {f.key: input_stamp(f.source) for f in files}
    why = {f.key: reason for f in files if (reason := _stale(records[f.key], wanted, stamps[f.key], bases[f.key], f.source))}
    output = OutputOptions(
        style=config.style, topk=config.topk, options=wanted, clean_temps=False, montage=config.montage,
        montage_format=config.montage_format, quality=config.quality, device=str(next(model.parameters()).device),
    )
    return ExportPlan(
        config=config, out=out, sha256=sha256, maps=maps, contrast=contrast, target=target, files=files,
        problems=list(found.problems) if shard_i == 0 else [],  # reported once, by shard 0
        bases=bases, records=records, stamps=stamps, todo=[f for f in files if f.key in why], why=why,
        output=output, titles=titles, compare_sha256=compare_sha, card=model.card,
    )  # fmt: skip


def check_config(model: MCModel, config: ExportConfig) -> None:
    """Check ``config``'s map kinds, target and contrast against the model, before anything is made.

    Raises:
        ParameterError, UnknownClassError, OutOfRangeError: an unusable option.
    """
    _checked_options(model, config)


def _checked_options(model: MCModel, config: ExportConfig) -> tuple[tuple[str, ...], int | str, int | str | None]:
    """(maps, target, contrast) of ``config``, checked against the model."""
    maps, contrast = kinds.contrast_maps(parse_maps(config.maps), config.contrast)
    target = check_target(model, str(config.target))  # an unknown class or a bad topK fails before any work
    return tuple(maps), target, None if contrast is None else check_contrast(model, contrast)


def hold_output(
    out: str | Path, *, inputs: Sequence[str] = (), shard: tuple[int, int] = (0, 1), what: str = "export"
) -> contextlib.AbstractContextManager[FolderLock]:
    """Hold the output folder ``out`` for one export (made if missing), while the ``with`` block runs.

    The export's lock file (:data:`LOCK_STEM`, :mod:`mcloss.core.lock`) names this process; another export
    into ``out`` is refused while it lives, except another shard of the same split (``shard``). A lock whose
    holder died (killed) is taken over: :attr:`~mcloss.core.lock.FolderLock.taken_over` says whose it was.
    The lock file is removed however the block ends; it is never an output, an input or a manifest entry.

    Args:
        out: the output folder.
        inputs: the export's inputs: ``out`` may not be one of their folders (checked before it is made).
        shard: (i, n): this process writes shard i of n; (0, 1) for a whole export or a merge.
        what: what this process does there (``export`` or ``merge``), for the message another one gets.

    Raises:
        FolderBusyError: a live export or merge holds ``out`` (the message names its pid).
        ParameterError: ``out`` is an input folder or holds one.
    """
    _check_out_apart(Path(out), inputs)
    return hold_folder(out, stem=LOCK_STEM, shard=shard, what=what)


def _check_compare(
    model: MCModel, config: ExportConfig, compare_model: MCModel | None
) -> tuple[tuple[str, str] | None, str | None]:
    """(titles, sha256) of the second model of ``config.compare``, or (None, None) without one."""
    if (config.compare is None) != (compare_model is None):
        raise ParameterError("compare needs both the checkpoint path and its model (compare_model)", parameter="compare")
    if compare_model is None:
        return None, None
    if list(compare_model.class_names) != list(model.class_names):
        raise ParameterError(
            f"compare {config.compare}: its classes differ from those of {config.checkpoint}", parameter="compare"
        )
    if compare_model.transform.to_dict() != model.transform.to_dict():
        raise ParameterError(
            f"compare {config.compare}: its input transform (size, crop, normalization) differs from that of "
            f"{config.checkpoint}; the images are prepared once, for both",
            parameter="compare",
        )
    return (Path(config.checkpoint).name, Path(config.compare).name), file_sha256(Path(config.compare))


def _check_out_apart(out: Path, inputs: Sequence[str]) -> None:
    """Refuse an output folder that is an input folder itself (or one of its parents): the index, errors and
    manifest would land among the inputs. A folder beside or inside the inputs is fine (it is left out of them).

    Raises:
        ParameterError: ``out`` is an input folder or contains one.
    """
    target = out.resolve()
    for given in inputs:
        folder = pattern_folder(given) or Path(given)  # a pattern: the folder it searches
        if folder.is_dir() and (folder.resolve() == target or target in folder.resolve().parents):
            raise ParameterError(f"out {out} is the input folder {given} or holds it; choose another folder", parameter="out")


def _remove_stale_temps(plan: ExportPlan) -> None:
    """Remove the temps a killed run left for the outputs to export, and the montages (any format) of the
    images to export that have no record: a killed run left them unfinished, and the new outputs might not
    write over them. The outputs of an image with a record stay until its new json lands (:func:`write_explanation`),
    so that an interrupted re-run loses nothing. One listing per output folder."""
    by_folder: dict[Path, tuple[set[str], set[str]]] = {}
    for f in plan.todo:
        base = plan.bases[f.key]
        stems, unfinished = by_folder.setdefault(base.parent, (set(), set()))
        stems.add(base.name)
        if plan.records[f.key] is None:
            unfinished.add(base.name)
    for folder, (stems, unfinished) in by_folder.items():
        for tmp in stale_temps(folder, stems, unfinished):
            tmp.unlink(missing_ok=True)


#: Why an earlier run's record of an image no longer stands, in the order they are checked and reported.
STALE_REASONS: tuple[str, ...] = ("made with other options", "from a changed input", "with files missing")


def _stale(record: dict | None, options: dict, stamp: dict | None, base: Path, source: str) -> str | None:
    """Why an earlier record does not stand (one of :data:`STALE_REASONS`, or ``"absent"``); None when it does:
    the same options, the same input file (its real path or the path as typed, with the same size and
    modification time; the path as typed alone for records written before stamps), and every file it lists
    still there."""
    if record is None:
        return "absent"
    if record.get("options") != options:
        return STALE_REASONS[0]
    was, typed_alike = record.get("input"), record.get("file") == source
    if isinstance(was, dict) and stamp is not None:  # by the path as typed too: a tree restaged with cp -a
        unchanged = all(was.get(k) == stamp[k] for k in ("size", "mtime_ns"))
        same_input = unchanged and (was.get("path") == stamp["path"] or typed_alike)
    else:
        same_input = stamp is not None and typed_alike  # a record from before stamps
    if not same_input:
        return STALE_REASONS[1]
    outputs = record.get("outputs")
    if not isinstance(outputs, list) or not all(
        isinstance(name, str) and name == Path(name).name and (base.parent / name).is_file() for name in outputs
    ):
        return STALE_REASONS[2]
    return None


# ------------------------------------------------------------------------------------------- run


@dataclass
class _Tally:
    """What a run has done so far; the lanes and the writer threads update it under its lock.

    Attributes:
        total: the inputs this run handles (the plan's ``todo``).
        records: each input's record, by key: an earlier run's, replaced as this run writes the image.
        errors: (file, reason) of every rejected input, as they came.
        progress: called as ``(done, total)`` on each :meth:`advance`.
    """

    total: int
    records: dict[str, dict | None]
    errors: list[tuple[str, str]]
    progress: Progress | None = None
    why: dict[str, str] = field(default_factory=dict)
    written: int = 0
    redone: dict[str, int] = field(default_factory=dict)
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reject(self, f: InputFile, reason: str) -> None:
        with self.lock:
            self.errors.append((f.source, reason))

    def settle(self, f: InputFile, write: Callable[[], dict]) -> None:
        """Count an image's write (``write()`` returns its record); an OSError rejects the image."""
        try:
            record = write()
        except OSError as exc:
            with self.lock:
                self.records[f.key] = None
                self.errors.append((f.source, f"{f.source}: cannot write outputs ({exc})"))
        else:
            with self.lock:
                self.records[f.key] = record
                self.written += 1
                reason = self.why.get(f.key)
                if reason in STALE_REASONS:  # an earlier run had finished it: re-done, and why
                    self.redone[reason] = self.redone.get(reason, 0) + 1

    def advance(self, count: int) -> None:
        """``count`` more inputs handled: report the progress."""
        with self.lock:
            self.done += count
            if self.progress is not None:
                self.progress(self.done, self.total)


@dataclass(frozen=True)
class _Run:
    """One export in progress: its plan, the models and how they run, and its tally."""

    plan: ExportPlan
    model: MCModel
    compare_model: MCModel | None
    device: torch.device
    amp: bool | None
    per_pass: int | None  # most images per forward pass (None: the whole batch)
    tally: _Tally


@dataclass(frozen=True)
class _Job:
    """One image to write: its input, the decoded image, its explanation (and the second model's)."""

    file: InputFile
    image: PreparedImage
    explanation: Explanation
    compare: Comparison | None = None


def export(
    model: MCModel,
    config: ExportConfig,
    *,
    device: torch.device,
    progress: Progress | None = None,
    amp: bool | None = None,
    checkpoint_sha256: str | None = None,
    compare_model: MCModel | None = None,
    lock: bool = True,
) -> ExportResult:
    """Export every input of ``config`` not already finished in ``config.out``; returns what was done.

    Args:
        model: the MCModel (on ``device``).
        config: inputs, outputs and options.
        device: where the model runs.
        progress: called as ``(done, total)`` with the inputs of this run handled so far, at the start and
            after each batch.
        amp: bf16 autocast of the model (default: on for CUDA).
        checkpoint_sha256: the checkpoint file's sha256 when already known (else it is computed).
        compare_model: the MCModel of ``config.compare`` (on ``device``; same class names), or None.
        lock: hold ``config.out`` for this export (shard) while it runs (:func:`hold_output`); False when the
            caller holds it (torchrun: rank 0 holds it for every rank).

    Raises:
        ParameterError, UnknownClassError, OutOfRangeError: an unusable option (unknown map kind, target or
            class), before any work is done.
        FolderBusyError: another live export holds ``config.out``, before anything is written.
    """
    check_callback(progress)
    check_config(model, config)  # before the output folder is made
    held = hold_output(config.out, inputs=config.input, shard=config.shard) if lock else contextlib.nullcontext()
    with held:
        return _export(model, config, device, progress, amp, checkpoint_sha256, compare_model)


def _export(
    model: MCModel, config: ExportConfig, device: torch.device, progress: Progress | None, amp: bool | None,
    checkpoint_sha256: str | None, compare_model: MCModel | None,
) -> ExportResult:  # fmt: skip
    plan = plan_export(model, config, checkpoint_sha256=checkpoint_sha256, compare_model=compare_model)
    _remove_stale_temps(plan)
    if plan.todo:  # the last run's summary (and a merge's) no longer holds once an image is rewritten
        for name in {*_summary_names(config.shard), *_summary_names((0, 1))}:
            (plan.out / name).unlink(missing_ok=True)
    t0 = time.perf_counter()
    loader = _loader(plan, model.transform, device)
    lanes = cpu_lanes(device, plan.maps, config.method)
    tally = _Tally(len(plan.todo), dict(plan.records), list(plan.problems), progress, dict(plan.why))
    run = _Run(plan, model, compare_model, device, amp, CPU_LANE_PASS if lanes > 1 else None, tally)
    tally.advance(0)
    if lanes > 1:
        _export_in_lanes(run, loader, lanes)
    else:
        _export_with_writers(run, loader)
    return _finish(plan, tally, t0)


def _loader(plan: ExportPlan, transform: EvalTransform, device: torch.device) -> DataLoader:
    """The plan's inputs to export, decoded in ``config.workers`` processes, a batch a list of items."""
    config = plan.config
    return DataLoader(
        ImageFiles(plan.todo, transform, view_maker("height", config.style.tile_height) if config.montage else None),
        batch_size=max(1, config.batch_size),
        num_workers=max(0, config.workers),
        collate_fn=collate_items,
        pin_memory=device.type == "cuda",
        worker_init_fn=functools.partial(die_with_parent, parent=os.getpid()) if config.workers > 0 else None,
    )


# ------------------------------------------------------------------------------------------- explain


def _explained(items: list, run: _Run) -> list[_Job]:
    """A decoded batch's usable images with their explanations (and the second model's, with
    ``compare``); the others are rejected."""
    plan = run.plan
    good, labels = [], []
    for index, item in items:
        f = plan.todo[index]
        label, reason = _usable(f, item, plan.target, run.model.num_classes)
        if reason is not None:
            run.tally.reject(f, reason)
            continue
        good.append((f, item))
        labels.append(label)
    if not good:
        return []
    prepared = [item for _, item in good]
    pass_ = functools.partial(
        explain, maps=plan.maps, labels=labels, method=plan.config.method, device=run.device, amp=run.amp,
        batch_size=run.per_pass, contrast=plan.contrast,
    )  # fmt: skip
    exps = pass_(run.model, prepared, plan.target)
    others = [None] * len(exps)
    if run.compare_model is not None:  # the same classes, in the same order, from the second model
        others = pass_(run.compare_model, prepared, [[g.target for g in e.groups] for e in exps])
    return [
        _Job(f, item, exp, None if other is None else Comparison(other, plan.titles, plan.compare_sha256))
        for (f, item), exp, other in zip(good, exps, others, strict=True)
    ]


def _usable(f: InputFile, item: PreparedImage | str, target: int | str, num_classes: int) -> tuple[int | None, str | None]:
    """(label, None) for an image to explain (its true class for the ``label`` target, else None), or
    (None, reason) for one to reject: it did not decode, or it has no label."""
    if isinstance(item, str):
        return None, item
    if target != "label":
        return None, None
    try:
        label = cub_label(f.source)
    except DatasetError as exc:
        return None, f"{f.source}: no label ({exc})"
    if label is None or not 0 <= label < num_classes:
        return None, f"{f.source}: no label (not inside a CUB-layout dataset)"
    return label, None


# ------------------------------------------------------------------------------------------- write


@dataclass(frozen=True)
class _Shared:
    """What every image's write of one export shares (a writer process gets it once, when it starts)."""

    output: OutputOptions
    card: dict
    defining: bool  # the card knows its classes' defining parts: each json reports them


@dataclass(frozen=True)
class _Files:
    """One image's files to write and what they are drawn from: all a writer process is sent for an image."""

    source: str
    explanation: Explanation
    base: Path
    old: dict | None
    view: np.ndarray | None
    compare: Comparison | None
    stamp: dict | None

    @classmethod
    def of(cls, job: _Job, plan: ExportPlan) -> _Files:
        key = job.file.key
        view = job.image.view if plan.output.montage else None
        return cls(job.file.source, job.explanation, plan.bases[key], plan.records[key], view, job.compare, plan.stamps[key])

    def write(self, shared: _Shared) -> dict:
        """Write the image's defining-part figures (its annotations read here, off the model's thread) and
        files with the export's ``shared`` settings; its json record."""
        annotations = _annotations(self.source) if shared.defining else None
        return write_explanation(
            self.explanation,
            base=self.base,
            old=self.old,
            view=self.view,
            output=shared.output,
            defining=defining_summaries(shared.card, self.explanation, annotations),
            compare=self.compare,
            input_stamp=self.stamp,
        )


def _shared(plan: ExportPlan) -> _Shared:
    return _Shared(plan.output, plan.card, plan.knows_defining)


#: A writer process's :class:`_Shared` (set when it starts, :func:`_start_writer`).
_process_shared: _Shared | None = None


def _start_writer(shared: _Shared, export_pid: int) -> None:
    """A writer process's start: it dies with the export (``export_pid``) and leaves interrupts to the export,
    which lets the writes it handed out finish.

    It touches no thread pool. A writer is forked from the export's process, where other threads may hold
    locks at that moment; a child inherits them locked. ``torch.set_num_threads`` hung a writer so (torch's
    OpenMP pool, in the test suite), and a write uses no torch. mcloss's own locks are made anew in a forked
    child (:func:`os.register_at_fork`). A fork server would avoid the rest, but it makes every writer import
    the program's ``__main__`` script again, running a script without a ``__main__`` guard once per writer.
    """
    global _process_shared
    processes.die_with(export_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _process_shared = shared


def _write_in_process(files: _Files) -> dict:
    """A writer process's write of one image. An exception that could not come back whole (its class is not
    rebuilt from its arguments, which would break the pool as if the writer had died) comes back as a
    RuntimeError naming it, with its traceback."""
    try:
        return files.write(_process_shared)
    except Exception as exc:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - whatever stops it from travelling
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc
        raise


def _annotations(source: str) -> PartAnnotations | None:
    """The part annotations of an input inside a CUB-layout dataset; None elsewhere or when unreadable."""
    try:
        return image_annotations(source)
    except DatasetError:  # a malformed dataset or mask: the json falls back to the card's figure
        return None


def writer_processes(config: ExportConfig, device: torch.device) -> int:
    """How many processes write the files of an export that runs one model thread; 0: :data:`WRITER_THREADS`
    threads in the export's process.

    ``config.writers`` when set. Else, on a GPU under Linux: the CPUs this process may use (its share of them
    under torchrun) less one for the model's thread and one per decoding worker, at most
    :data:`MOST_WRITER_PROCESSES`, when at least :data:`MIN_WRITER_PROCESSES` are free. A write holds the GIL
    for much of its time, so threads cannot use many cores (:data:`WRITER_THREADS`); processes can. On a CPU
    the model's threads take the cores (:func:`cpu_lanes`); elsewhere than Linux the gain is not measured. There
    an export uses threads unless told otherwise.
    """
    if config.writers is not None:
        return config.writers
    if device.type == "cpu" or not sys.platform.startswith("linux"):
        return 0
    free = processes.usable_cpus() // _ranks_on_this_node() - 1 - config.workers
    return min(free, MOST_WRITER_PROCESSES) if free >= MIN_WRITER_PROCESSES else 0


def _ranks_on_this_node() -> int:
    """The processes torchrun started on this node (``LOCAL_WORLD_SIZE``), which share its CPUs; 1 elsewhere."""
    text = os.environ.get("LOCAL_WORLD_SIZE", "")
    return max(1, int(text)) if text.strip().isdigit() else 1


def _writer_pool(run: _Run) -> Executor:
    """The export's writers: :func:`writer_processes` processes drawing on the CPU, or :data:`WRITER_THREADS`
    threads in this process."""
    count = writer_processes(run.plan.config, run.device)
    if count == 0:
        return ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="mcloss-export-write")
    # a process draws every montage on the CPU: a device montage's host work would hold its GIL as in a thread
    shared = dataclasses.replace(_shared(run.plan), output=dataclasses.replace(run.plan.output, device=None))
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    pool = ProcessPoolExecutor(count, mp_context=context, initializer=_start_writer, initargs=(shared, os.getpid()))
    pool.submit(os.getpid)  # forks every writer now, before the decoding workers and the first batch
    return pool


def _export_with_writers(run: _Run, loader: DataLoader) -> None:
    """One model thread; writers (:func:`_writer_pool`) draw, encode and write each batch's files while it
    runs the next batch. The pool is left only when every write has finished (or failed), even if the loop
    raises."""
    pending: deque[tuple[InputFile, Future]] = deque()
    most = 2 * max(1, run.plan.config.batch_size)
    shared = _shared(run.plan)
    with _writer_pool(run) as pool:
        processes_write = isinstance(pool, ProcessPoolExecutor)
        try:
            for items in loader:
                for job in _explained(items, run):  # written while the next batch runs
                    files = _Files.of(job, run.plan)
                    write = pool.submit(_write_in_process, files) if processes_write else pool.submit(files.write, shared)
                    pending.append((job.file, write))
                while len(pending) > most:
                    f, future = pending.popleft()
                    run.tally.settle(f, future.result)
                run.tally.advance(len(items))
            while pending:
                f, future = pending.popleft()
                run.tally.settle(f, future.result)
        except BrokenProcessPool as exc:  # a writer was killed (out of memory?): the images not finished stay to do
            raise OutputError(
                f"{run.plan.out}: a writer process died ({exc}); the images it had not finished are not written: "
                "run the export again to finish them"
            ) from exc


def cpu_lanes(device: torch.device, maps: Sequence[str], method: str) -> int:
    """How many batches an export explains at once: :data:`CPU_LANES` on a CPU with at least as many torch
    threads, else 1.

    On a CPU, a model thread beside writer threads loses: the forward's OpenMP threads already fill the cores,
    and they spin while a writer holds one. So a CPU export runs lanes instead: each takes the next decoded
    batch, explains it with its share of torch's threads and then draws and writes that batch's files itself,
    and the lanes keep every core busy with no spin. A GPU export keeps one model thread with writers beside
    it. Captum's Grad-CAM and the kinds that run passes of their own (``MapKind.extra_passes``: Guided Grad-CAM)
    put hooks on the shared model, which two batches at once would both trip on, so those exports take one lane.
    """
    hooked = any(kinds.get(name).extra_passes for name in maps)
    if device.type != "cpu" or method != "fused" or hooked or torch.get_num_threads() < CPU_LANES:
        return 1
    return CPU_LANES


@dataclass
class _Lanes:
    """The batches the CPU lanes take turns on, and the signal that ends them."""

    batches: Iterator[list]
    count: int  # lanes
    threads: int  # torch's threads for the whole run: each lane takes its share
    taking: threading.Lock = field(default_factory=threading.Lock, repr=False)
    ended: threading.Event = field(default_factory=threading.Event, repr=False)  # no batch left, or a lane failed

    def next_batch(self) -> list | None:
        """The next batch, or None when there is none left or a lane has failed."""
        with self.taking:
            return None if self.ended.is_set() else next(self.batches, None)


def _lane(lanes: _Lanes, run: _Run) -> None:
    """Take batches until none is left: explain each with this thread's share of torch's threads, then write
    its files."""
    torch.set_num_threads(max(1, lanes.threads // lanes.count))  # this thread's OpenMP team
    shared = _shared(run.plan)
    try:
        while (items := lanes.next_batch()) is not None:
            for job in _explained(items, run):
                run.tally.settle(job.file, functools.partial(_Files.of(job, run.plan).write, shared))
            run.tally.advance(len(items))
    finally:
        lanes.ended.set()  # at the end, or on a failure: the other lanes take no other batch


def _export_in_lanes(run: _Run, loader: DataLoader, count: int) -> None:
    """Explain and write ``loader``'s batches in ``count`` threads (see :func:`cpu_lanes`).

    The models are frozen once for the whole run, so that no lane's ``model_guard`` restores flags under
    another; torch's thread count is restored at the end. When a lane fails, the others finish the batch in
    hand (its files are written) and take no other; then the failure is raised.
    """
    threads = torch.get_num_threads()
    lanes = _Lanes(iter(loader), count, threads)
    with contextlib.ExitStack() as frozen:
        for m in (run.model, run.compare_model):
            if m is not None:
                frozen.enter_context(model_guard(m, freeze=True))
        try:
            with ThreadPoolExecutor(max_workers=count, thread_name_prefix="mcloss-export-lane") as pool:
                running = [pool.submit(_lane, lanes, run) for _ in range(count)]
                try:
                    for future in running:
                        future.result()
                finally:
                    lanes.ended.set()  # also when this thread is interrupted
        finally:
            torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- finish

_INDEX_HEADER = ["file", "outputs", "prediction", "prob", "target", "domain_score", "in_domain"]
_ERRORS_HEADER = ["file", "reason"]


def _finish(plan: ExportPlan, tally: _Tally, t0: float) -> ExportResult:
    """Write this shard's index, errors and (last) manifest; what the run did."""
    errors = _in_input_order(tally.errors, {f.source: k for k, f in enumerate(plan.files)})  # writes finish out of order
    suffix = shard_suffix(*plan.config.shard)
    index_name, errors_name, manifest_name = _summary_names(plan.config.shard)
    rows = [_index_row(f, tally.records[f.key]) for f in plan.files if plan.stale(f, tally.records[f.key]) is None]
    inputs = len(plan.files) + len(plan.problems)  # every row of index.csv and errors.csv
    digests = {}
    for name, text in ((index_name, csv_text(_INDEX_HEADER, rows)), (errors_name, csv_text(_ERRORS_HEADER, errors))):
        data = text.encode("utf-8")
        atomic_write_bytes(plan.out / name, data)
        digests[name] = hashlib.sha256(data).hexdigest()
    manifest = {
        "checkpoint": {"path": str(Path(plan.config.checkpoint).resolve()), "sha256": plan.sha256},
        "versions": versions(),
        "options": plan.config.options(),
        "counts": {
            "inputs": inputs, "ok": tally.written, "redone": sum(tally.redone.values()), "failed": len(errors),
            "skipped": plan.skipped,
        },  # fmt: skip
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if suffix:  # a shard, to be merged: sealed with the digests of its files, of its images' options and its own;
        # the folder it ran in, which its relative inputs are relative to, orders the merge from anywhere
        extra = {"files": digests, "image_options": _digest(json_safe(plan.wanted)), "cwd": os.getcwd()}
        manifest = _sealed(manifest | extra)
    manifest_path = plan.out / manifest_name
    atomic_write_json(manifest_path, manifest)
    return ExportResult(
        plan.out, inputs, tally.written, sum(tally.redone.values()), plan.skipped, errors, manifest_path,
        {reason: tally.redone[reason] for reason in STALE_REASONS if reason in tally.redone},
    )


def _index_row(f: InputFile, rec: dict) -> list[str]:
    folder = f.key.rsplit("/", 1)[0] if "/" in f.key else ""
    outputs = [f"{folder}/{name}" if folder else name for name in rec["outputs"]]
    domain = rec.get("domain") or {}
    score, inside = ("", "") if not domain.get("available") else (f"{domain['score']:.6f}", str(domain["in_domain"]).lower())
    return [f.source, ";".join(outputs), rec["prediction"]["name"], f"{rec['prediction']['prob']:.6f}", rec["target"]["name"],
            score, inside]  # fmt: skip


def _in_input_order(errors: list, position: dict[str, int]) -> list:
    """Error rows (file first) as one process writes them: those of inputs that gave no file (not in
    ``position``) first, as they came, then the others in input order."""
    return [e for e in errors if e[0] not in position] + sorted(
        (e for e in errors if e[0] in position), key=lambda e: position[e[0]]
    )


def _summary_names(shard: tuple[int, int]) -> tuple[str, str, str]:
    """A shard's index, errors and manifest file names."""
    suffix = shard_suffix(*shard)
    return f"index{suffix}.csv", f"errors{suffix}.csv", f"manifest{suffix}.json"


def shard_suffix(i: int, n: int) -> str:
    """The infix of shard ``i`` of ``n``'s manifest, index and errors files (none for a single shard)."""
    return "" if n == 1 else f".shard-{i}-of-{n}"


# ------------------------------------------------------------------------------------------- merge


class MergeError(MclossError, ValueError):
    """Shard files that cannot be merged; the message names the folder and the reason."""


def merge_shards(out: str | Path, shards: int | None = None, *, lock: bool = True) -> ExportResult:
    """Merge the ``manifest/index/errors.shard-i-of-n`` files of ``out`` into ``manifest.json``,
    ``index.csv`` and ``errors.csv``, as one process would have written them: rows in the order of the
    inputs (collected again from the manifest's ``input``), counts summed, each shard's device, counts and
    seconds under ``shards``. The shard files stay.

    Nothing in the shards is trusted: each shard's manifest, index and errors must match the digests the
    shard recorded when it finished, its counts must agree with its rows, no input may be listed twice and
    no output may lie outside ``out``.

    ``shards``: merge only the split into that many shards (what a torchrun export just wrote), ignoring
    shard files of other splits left by earlier runs; by default there must be exactly one split.

    ``lock``: hold ``out`` while merging (:func:`hold_output`), so that no live export writes there; False when
    the caller holds it.

    Raises:
        MergeError: no shards, shards of different splits or options, a missing, unreadable, truncated or
            edited shard, counts that disagree with the rows, a duplicated input, or an output outside ``out``.
        FolderBusyError: a live export (or merge) holds ``out``.
    """
    out_dir = Path(out)
    with hold_output(out_dir, what="merge") if lock and out_dir.is_dir() else contextlib.nullcontext():
        return _merge(out_dir, shards)


def _merge(out_dir: Path, shards: int | None) -> ExportResult:
    manifests = _shard_manifests(out_dir, shards)
    n = _check_shards(out_dir, manifests)
    first = manifests[(0, n)]
    order = _input_order(first["options"]["input"], first.get("cwd"), out_dir)
    index, errors, listed = [], [], {}
    for i in range(n):
        rows, failed = (_shard_rows(out_dir, manifests[(i, n)], i, n, kind) for kind in ("index", "errors"))
        _check_rows(out_dir, i, n, manifests[(i, n)], (rows, failed), listed, order)
        index += rows
        errors += failed
    late = len(order)
    index.sort(key=lambda row: order.get(row[0], late))
    errors = _in_input_order(errors, order)
    manifest = _merged_manifest(manifests, n)
    manifest["counts"]["failed"] = len(errors)  # the rows', which each shard's count was checked against
    atomic_write_text(out_dir / "index.csv", csv_text(_INDEX_HEADER, index))
    atomic_write_text(out_dir / "errors.csv", csv_text(_ERRORS_HEADER, errors))
    atomic_write_json(out_dir / "manifest.json", manifest)
    totals = manifest["counts"]
    return ExportResult(
        out_dir, totals.get("inputs", 0), totals.get("ok", 0), totals.get("redone", 0), totals.get("skipped", 0),
        [(r[0], r[1]) for r in errors], out_dir / "manifest.json",
    )  # fmt: skip


def _input_order(inputs: Sequence[str], cwd: str | None, out_dir: Path) -> dict[str, int]:
    """Each input file's position in the export, keyed as the shards' rows name it (its path as typed, printable),
    the inputs collected again from the folder the export ran in (``cwd``; None: this process's)."""
    order: dict[str, int] = {}
    for raw in inputs:
        joined = raw if cwd is None or os.path.isabs(raw) else os.path.join(cwd, raw)
        typed = len(joined) - len(raw) if joined != raw else 0  # the folder put in front, taken off again
        for f in collect_inputs([joined], exclude=out_dir).files:
            order.setdefault(printable(f.source[typed:]), len(order))
    return order


def _digest(obj: dict) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, no spaces, ASCII)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def _sealed(manifest: dict) -> dict:
    """``manifest`` as the JSON it will be read back as, with ``digest``: the sha256 of the rest."""
    plain = json_safe(manifest)
    return plain | {"digest": _digest(plain)}


def _shard_manifests(out_dir: Path, shards: int | None) -> dict[tuple[int, int], dict]:
    """The shard manifests in ``out_dir`` (of the split into ``shards``, or of any), by (i, n), each checked
    against the digest it was sealed with."""
    pattern = "manifest.shard-*-of-*.json" if shards is None else f"manifest.shard-*-of-{int(shards)}.json"
    if not out_dir.is_dir():
        raise MergeError(f"{out_dir}: folder not found")
    found = sorted(out_dir.glob(pattern))
    if not found:
        raise MergeError(f"{out_dir}: no manifest.shard-i-of-n.json files to merge")
    manifests = {}
    for path in found:
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            i, n = (int(v) for v in manifest["options"]["shard"])
            counts = {k: int(manifest["counts"][k]) for k in ("inputs", "ok", "redone", "failed", "skipped")}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise MergeError(f"{path}: unreadable shard manifest ({type(exc).__name__}: {exc})") from None
        if path.name != f"manifest{shard_suffix(i, n)}.json":
            raise MergeError(f"{path}: its options say it is shard {i} of {n}")
        recorded = manifest.pop("digest", None)
        if recorded is None or not isinstance(manifest.get("files"), dict):
            raise MergeError(f"{path}: has no digest (not written by this version of mcloss export); export the shard again")
        if _digest(manifest) != recorded:
            raise MergeError(f"{path}: does not match the digest written when the shard finished (edited?)")
        if min(counts.values()) < 0 or counts["redone"] > counts["ok"]:
            raise MergeError(f"{path}: impossible counts {counts}")
        manifests[(i, n)] = manifest
    return manifests


def _shard_rows(out_dir: Path, manifest: dict, i: int, n: int, kind: str) -> list[list[str]]:
    """The rows of shard ``i``'s index or errors file, after checking its bytes against the shard's digest."""
    name = f"{kind}{shard_suffix(i, n)}.csv"
    path = out_dir / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MergeError(f"{path}: unreadable shard file ({exc})") from None
    if hashlib.sha256(data).hexdigest() != manifest["files"].get(name):
        raise MergeError(f"{path}: does not match the digest shard {i} of {n} recorded when it finished (truncated or edited?)")
    return _read_csv(path, data, _INDEX_HEADER if kind == "index" else _ERRORS_HEADER)


def _check_rows(
    out_dir: Path, i: int, n: int, manifest: dict, tables: tuple[list[list[str]], list[list[str]]], listed: dict,
    inputs: dict[str, int],
) -> None:
    """Shard ``i``'s counts agree with its (index, errors) rows; no input is listed twice (``listed``: input →
    where, over the shards so far; an input that gave no file, not in ``inputs``, may be rejected more than
    once); every output lies inside the export and is still there."""
    rows, failed = tables
    counts = manifest["counts"]
    if counts["ok"] + counts["skipped"] != len(rows) or counts["failed"] != len(failed):
        raise MergeError(
            f"{out_dir / f'manifest{shard_suffix(i, n)}.json'}: counts say {counts['ok'] + counts['skipped']} exported "
            f"and {counts['failed']} rejected, but its index and errors files hold {len(rows)} and {len(failed)} rows"
        )
    for kind, table in (("index", rows), ("errors", failed)):
        where = f"the {kind} of shard {i}"
        for row in table:
            if row[0] in listed and (kind == "index" or row[0] in inputs):
                raise MergeError(f"{out_dir}: {printable(row[0])} is listed twice (in {listed[row[0]]} and {where})")
            listed.setdefault(row[0], where)
            bad = next((o for o in row[1].split(";") if o and not _inside(o)), None) if kind == "index" else None
            if bad is not None:
                raise MergeError(f"{out_dir}: {where} names an output outside the export ({printable(bad)!r})")
            if kind == "index":
                _check_outputs(out_dir, row[1].split(";"), where, manifest.get("image_options"))


def _check_outputs(out_dir: Path, outputs: list[str], where: str, options_digest: str | None) -> None:
    """An index row's outputs are all there and its json (the last) still holds the options the shard recorded
    (``options_digest``; None for shards written before it was recorded): a later export into the same folder
    deletes or rewrites them under other options."""
    gone = next((o for o in outputs if o and not (out_dir / o).is_file()), None)
    if gone is not None:
        raise MergeError(
            f"{out_dir}: {where} lists {printable(gone)}, which is no longer there (a later export replaced it?); "
            "export again rather than merge"
        )
    if options_digest is None or not outputs[-1].endswith(".json"):
        return
    try:
        options = json.loads((out_dir / outputs[-1]).read_text(encoding="utf-8")).get("options")
    except (OSError, ValueError, AttributeError) as exc:
        raise MergeError(f"{out_dir}: {printable(outputs[-1])}: unreadable image record ({type(exc).__name__})") from None
    if _digest(json_safe(options)) != options_digest:
        raise MergeError(
            f"{out_dir}: {where} lists {printable(outputs[-1])}, which a later export rewrote with other options; "
            "export again rather than merge"
        )


def _inside(rel: str) -> bool:
    """Whether an index row's output path stays inside the export: relative, with no ``..`` component."""
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and "\\" not in rel and not PureWindowsPath(rel).drive


def _check_shards(out_dir: Path, manifests: dict[tuple[int, int], dict]) -> int:
    """The number of shards: one split, none missing, all made like shard 0."""
    counts = {n for _, n in manifests}
    if len(counts) != 1:
        raise MergeError(f"{out_dir}: shards of different splits ({', '.join(f'of {n}' for n in sorted(counts))})")
    (n,) = counts
    missing = [i for i in range(n) if (i, n) not in manifests]
    if missing:
        raise MergeError(f"{out_dir}: missing shard {', '.join(map(str, missing))} of {n}")
    first = manifests[(0, n)]
    for (i, _), m in sorted(manifests.items()):
        if _agreeing(m) != _agreeing(first) or m["checkpoint"].get("sha256") != first["checkpoint"].get("sha256"):
            raise MergeError(f"{out_dir}: shard {i} of {n} was made with other options or another checkpoint than shard 0")
    return n


def _agreeing(manifest: dict) -> dict:
    """A shard manifest's options that must agree between shards."""
    return {k: v for k, v in manifest["options"].items() if k not in ("shard", "device", "workers", "writers", "batch_size")}


def _merged_manifest(manifests: dict[tuple[int, int], dict], n: int) -> dict:
    """One manifest for the ``n`` shards: shard 0's, counts summed, the slowest shard's seconds, and each
    shard's device, counts and seconds under ``shards``."""
    first = manifests[(0, n)]
    return {
        "checkpoint": first["checkpoint"],
        "versions": first["versions"],
        "options": {**first["options"], "shard": [0, 1]},
        "counts": {k: sum(m["counts"].get(k, 0) for m in manifests.values()) for k in first["counts"]},
        "seconds": max(m["seconds"] for m in manifests.values()),
        "shards": [
            {"shard": [i, n], "device": m["options"].get("device"), "counts": m["counts"], "seconds": m["seconds"]}
            for (i, _), m in sorted(manifests.items())
        ],
    }


def _read_csv(path: Path, data: bytes, header: list[str]) -> list[list[str]]:
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MergeError(f"{path}: unreadable shard file ({exc})") from None
    if not rows or rows[0] != header:
        raise MergeError(f"{path}: not an mcloss export shard file (header is not {','.join(header)})")
    if any(len(row) != len(header) for row in rows[1:]):
        raise MergeError(f"{path}: a row without the {len(header)} columns {','.join(header)}")
    return rows[1:]


def die_with_parent(_worker_id: int = 0, *, parent: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: the worker gets SIGKILL when the export process ``parent`` (its pid, read
    before the fork) dies, even by SIGKILL, instead of lingering with its memory
    (:func:`mcloss.core.processes.die_with_parent`)."""
    processes.die_with_parent(parent)
