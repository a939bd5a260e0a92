"""Batch export of explanations for many images (the library behind ``mcloss export``).

Inputs are collected by :func:`mcloss.data.files.collect_inputs` (files, directories, globs); outputs mirror
them under ``out``: a file inside a directory input ``D`` lands at ``<name of D>/<path inside D>``, a single
file or a glob match at the top level. The output stem is the input's file name *with* its extension, so
``a.jpg`` and ``a.png`` do not collide; a remaining clash gets ``~2``, ``~3``... Per image, the files of
:mod:`mcloss.explainability.outputs` (montage PNGs, raw-map NPZ, and last the JSON record: an image is
finished when its json exists, and a re-run skips it). Every file is written atomically.

Images are decoded in DataLoader workers and explained with :func:`mcloss.explainability.explanation.explain`
(one forward pass per batch of same-shape inputs). On a GPU a small thread pool draws, encodes and writes a
batch's files while the model runs the next one; on a CPU two lanes each explain a batch with half of torch's
threads and then write it (:func:`cpu_lanes`). Under torchrun each rank exports its share (``--shard`` rank/world)
and rank 0 merges the shard files (:func:`merge_shards`, also ``mcloss export --merge OUT``). When the checkpoint's card knows its classes' defining
parts, each target's json entry says which they are and how much the maps prefer them: on the image itself
when it lies inside a CUB-layout dataset with part keypoints or part masks
(:func:`mcloss.data.annotations.image_annotations`), else the card's fresh-set figure. At the end: ``manifest.json`` (checkpoint + sha256,
versions, options, counts), ``index.csv`` (one row per finished image) and ``errors.csv`` (file, reason for
each rejected input). With a shard ``i/n`` those three are named ``manifest.shard-i-of-n.json`` etc.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import functools
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from mcloss.core.errors import DatasetError, MclossError
from mcloss.core.files import atomic_write_json, atomic_write_text, csv_text, file_sha256
from mcloss.core.model import model_guard
from mcloss.core.provenance import versions
from mcloss.core.transforms import EvalTransform
from mcloss.data.annotations import PartAnnotations, image_annotations
from mcloss.data.cub import cub_label
from mcloss.data.files import InputFile, collect_inputs, output_path
from mcloss.data.io import ImageLoadError
from mcloss.explainability.defining import defining_summaries, has_defining_parts
from mcloss.explainability.explanation import DEFAULT_MAPS, PreparedImage, explain, parse_maps, prepare
from mcloss.explainability.outputs import Comparison, stale_temps
from mcloss.explainability.render import Style
from mcloss.explainability.targets import check_target

__all__ = [
    "ExportConfig",
    "ExportResult",
    "ImageFiles",
    "collate_items",
    "cpu_lanes",
    "MergeError",
    "die_with_parent",
    "export",
    "merge_shards",
    "parse_shard",
    "shard_suffix",
]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: Threads that draw, encode and write each batch's files while the model runs the next batch (OpenCV and
#: zlib release the GIL).
WRITER_THREADS = 2
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
        maps: map kinds (:data:`mcloss.explainability.explanation.MAP_KINDS`).
        style: how montages are drawn.
        topk: entries in each json's ``topk`` list.
        batch_size: images per forward pass.
        workers: DataLoader decoding workers (0 = in process).
        device: where the model runs (for the manifest).
        shard: (i, n): process every n-th input starting at i.
        method: ``fused`` or ``captum`` Grad-CAM.
        compare: a second checkpoint with the same classes, explained for the same targets and drawn in the
            same montages (``--compare``), or None.
        montage: draw and write each target's montage PNG; False writes the npz and the json only
            (``--no-montage``).
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
    compare: str | None = None
    montage: bool = True

    def __post_init__(self) -> None:
        for flag, value, low in (("--topk", self.topk, 0), ("--batch-size", self.batch_size, 1), ("--workers", self.workers, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")

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
        return {
            "target": self.target,
            "maps": list(parse_maps(self.maps)),
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
        inputs: inputs of this shard.
        written: images exported by this run.
        redone: of ``written``, images an earlier run had finished with other options.
        skipped: images already finished by an earlier run with the same options.
        errors: (file, reason) of every rejected input.
        manifest: the manifest path.
    """

    out: Path
    inputs: int
    written: int
    redone: int
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

    The prepared image's view is a thumbnail of ``thumb_height`` rows, what the montages are drawn on (None:
    no view, for passes that draw nothing).
    """

    def __init__(self, files: Sequence[InputFile], transform: EvalTransform, thumb_height: int | None) -> None:
        self.files = list(files)
        self.transform = transform
        self.thumb_height = thumb_height

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, PreparedImage | str]:
        source = self.files[index].source
        try:
            if self.thumb_height is None:
                return index, prepare(self.transform, source, view=None)
            return index, prepare(self.transform, source, view="height", view_size=self.thumb_height)
        except ImageLoadError as exc:
            return index, str(exc)
        except Exception as exc:  # noqa: BLE001 - a worker must never die on one bad file
            return index, f"{source}: {type(exc).__name__}: {exc}"


def collate_items(items: list) -> list:
    """DataLoader ``collate_fn`` that keeps a batch as the list of its items."""
    return items


# ------------------------------------------------------------------------------------------- export


def export(
    model,
    config: ExportConfig,
    *,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
    amp: bool | None = None,
    checkpoint_sha256: str | None = None,
    compare_model=None,
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

    Raises:
        ValueError, KeyError, IndexError: an unusable option (unknown map kind, target or class), before
            any work is done.
    """
    maps = parse_maps(config.maps)
    target = str(config.target)
    spec = check_target(model, target)  # an unknown class or a bad topK fails before any work
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(config.checkpoint)
    sha256 = checkpoint_sha256 or file_sha256(checkpoint)
    titles, compare_sha = None, None
    if (config.compare is None) != (compare_model is None):
        raise ValueError("--compare needs both the checkpoint path and its model")
    if compare_model is not None:
        if list(compare_model.class_names) != list(model.class_names):
            raise ValueError(f"--compare {config.compare}: its classes differ from those of {config.checkpoint}")
        if compare_model.transform.to_dict() != model.transform.to_dict():
            raise ValueError(
                f"--compare {config.compare}: its input transform (size, crop, normalization) differs from that of "
                f"{config.checkpoint}; the images are prepared once, for both"
            )
        compare_sha = file_sha256(Path(config.compare))
        titles = (checkpoint.name, Path(config.compare).name)
    wanted = config.output_options(sha256, compare_sha)
    shard_i, shard_n = config.shard
    found = collect_inputs(config.input, exclude=out_dir)
    files = found.files[shard_i::shard_n]
    errors: list[tuple[str, str]] = list(found.problems) if shard_i == 0 else []  # reported once, by shard 0
    bases = {f.key: output_path(out_dir, f.key) for f in files}
    records = {f.key: _record(bases[f.key]) for f in files}  # what an earlier run left, or None
    todo = [f for f in files if not _current(records[f.key], wanted, f.source)]
    _remove_stale_temps([bases[f.key] for f in todo], {bases[f.key] for f in todo if records[f.key] is None})
    redone = sum(records[f.key] is not None for f in todo)
    skipped = len(files) - len(todo)
    written = 0
    t0 = time.perf_counter()
    loader = DataLoader(
        ImageFiles(todo, model.transform, config.style.tile_height if config.montage else None),
        batch_size=max(1, config.batch_size),
        num_workers=max(0, config.workers),
        collate_fn=collate_items,
        pin_memory=device.type == "cuda",
        worker_init_fn=functools.partial(die_with_parent, parent=os.getpid()) if config.workers > 0 else None,
    )
    knows_defining = has_defining_parts(model.card)
    lock = threading.Lock()
    done = 0
    lanes = cpu_lanes(device, maps, config.method)
    per_pass = CPU_LANE_PASS if lanes > 1 else None

    def explained(items: list) -> list[tuple[InputFile, PreparedImage, object, Comparison | None]]:
        """A decoded batch's usable images with their explanations (and the second model's, with --compare);
        the others go to ``errors``."""
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
        if not good:
            return []
        prepared = [item for _, item in good]
        run = functools.partial(explain, maps=maps, labels=labels, method=config.method, device=device, amp=amp, batch_size=per_pass)
        exps = run(model, prepared, spec)
        seconds = [None] * len(exps)
        if compare_model is not None:  # the same classes, in the same order, from the second model
            seconds = run(compare_model, prepared, [[g.target for g in e.groups] for e in exps])
        return [
            (f, item, exp, None if other is None else Comparison(other, titles, compare_sha))
            for (f, item), exp, other in zip(good, exps, seconds, strict=True)
        ]

    def write(f: InputFile, item: PreparedImage, exp, pair: Comparison | None) -> dict:
        return _write_task(bases[f.key], records[f.key], exp, config, item, model.card, knows_defining, wanted, pair)

    def collect(f: InputFile, result: Callable[[], dict]) -> None:
        nonlocal written
        try:
            records[f.key] = result()
        except OSError as exc:
            records[f.key] = None
            errors.append((f.source, f"{f.source}: cannot write outputs ({exc})"))
        else:
            with lock:
                written += 1

    def advance(count: int) -> None:
        nonlocal done
        with lock:
            done += count
            if progress is not None:
                progress(done, len(todo))

    def finish(job: tuple) -> None:  # a lane writes its own batch
        collect(job[0], lambda: write(*job))

    advance(0)
    if lanes > 1:
        _export_in_lanes(loader, lanes, explained, finish, advance, [m for m in (model, compare_model) if m is not None])
    else:
        pending: deque[tuple[InputFile, Future]] = deque()
        # the pool is left only when every write has finished (or failed), even if the loop raises
        with ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="mcloss-export-write") as pool:
            for items in loader:
                for job in explained(items):  # written while the next batch runs
                    pending.append((job[0], pool.submit(write, *job)))
                while len(pending) > 2 * max(1, config.batch_size):
                    f, future = pending.popleft()
                    collect(f, future.result)
                advance(len(items))
            while pending:
                f, future = pending.popleft()
                collect(f, future.result)
    errors = _in_input_order(errors, {f.source: k for k, f in enumerate(files)})  # writes finish out of order

    suffix = shard_suffix(shard_i, shard_n)
    rows = [_index_row(f, records[f.key]) for f in files if _current(records[f.key], wanted, f.source)]
    atomic_write_text(out_dir / f"index{suffix}.csv", csv_text(_INDEX_HEADER, rows))
    atomic_write_text(out_dir / f"errors{suffix}.csv", csv_text(_ERRORS_HEADER, errors))
    manifest = {
        "checkpoint": {"path": str(checkpoint.resolve()), "sha256": sha256},
        "versions": versions(),
        "options": config.options(),
        "counts": {
            "inputs": len(files), "ok": written, "redone": redone, "failed": len(errors), "skipped": skipped,
        },  # fmt: skip
        "seconds": round(time.perf_counter() - t0, 3),
    }
    manifest_path = out_dir / f"manifest{suffix}.json"
    atomic_write_json(manifest_path, manifest)
    return ExportResult(out_dir, len(files), written, redone, skipped, errors, manifest_path)


def cpu_lanes(device: torch.device, maps: Sequence[str], method: str) -> int:
    """How many batches an export explains at once: :data:`CPU_LANES` on a CPU with at least as many torch
    threads, else 1.

    On a CPU, a model thread beside writer threads loses: the forward's OpenMP threads already fill the cores,
    and they spin while a writer holds one. So a CPU export runs lanes instead: each takes the next decoded
    batch, explains it with its share of torch's threads and then draws and writes that batch's files itself,
    and the lanes keep every core busy with no spin. A GPU export keeps one model thread with writers beside
    it. Captum's Grad-CAM and Guided Grad-CAM put hooks on the shared model, which two batches at once would
    both trip on, so those exports take one lane.
    """
    if device.type != "cpu" or method != "fused" or "guided" in maps or torch.get_num_threads() < CPU_LANES:
        return 1
    return CPU_LANES


def _export_in_lanes(
    loader: DataLoader, lanes: int, explained: Callable[[list], list], finish: Callable[[tuple], None],
    advance: Callable[[int], None], models: Sequence,
) -> None:
    """Explain and write ``loader``'s batches in ``lanes`` threads (see :func:`cpu_lanes`).

    The models are frozen once for the whole run, so that no lane's ``model_guard`` restores flags under
    another; torch's thread count is restored at the end. When a lane fails, the others finish the batch in
    hand (its files are written) and take no other; then the failure is raised.
    """
    threads = torch.get_num_threads()
    batches = iter(loader)
    taking = threading.Lock()
    ended = threading.Event()  # no batch left, or a lane failed

    def lane() -> None:
        torch.set_num_threads(max(1, threads // lanes))  # this thread's OpenMP team
        try:
            while True:
                with taking:
                    items = None if ended.is_set() else next(batches, None)
                    if items is None:
                        return
                for job in explained(items):
                    finish(job)
                advance(len(items))
        finally:
            ended.set()  # at the end, or on a failure: the other lanes take no other batch

    with contextlib.ExitStack() as frozen:
        for m in models:
            frozen.enter_context(model_guard(m, freeze=True))
        try:
            with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="mcloss-export-lane") as pool:
                running = [pool.submit(lane) for _ in range(lanes)]
                try:
                    for future in running:
                        future.result()
                finally:
                    ended.set()  # also when this thread is interrupted
        finally:
            torch.set_num_threads(threads)


def _in_input_order(errors: list, position: dict[str, int]) -> list:
    """Error rows (file first) as one process writes them: those of inputs that gave no file (not in
    ``position``) first, as they came, then the others in input order."""
    return [e for e in errors if e[0] not in position] + sorted(
        (e for e in errors if e[0] in position), key=lambda e: position[e[0]]
    )


def shard_suffix(i: int, n: int) -> str:
    """The infix of shard ``i`` of ``n``'s manifest, index and errors files (none for a single shard)."""
    return "" if n == 1 else f".shard-{i}-of-{n}"


class MergeError(MclossError, ValueError):
    """Shard files that cannot be merged; the message names the folder and the reason."""


_INDEX_HEADER = ["file", "outputs", "prediction", "prob", "target"]
_ERRORS_HEADER = ["file", "reason"]


def _read_csv(path: Path, header: list[str]) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MergeError(f"{path}: unreadable shard file ({exc})") from None
    if not rows or rows[0] != header:
        raise MergeError(f"{path}: not an mcloss export shard file (header is not {','.join(header)})")
    return rows[1:]


def merge_shards(out: str | Path, shards: int | None = None) -> ExportResult:
    """Merge the ``manifest/index/errors.shard-i-of-n`` files of ``out`` into ``manifest.json``,
    ``index.csv`` and ``errors.csv``, as one process would have written them: rows in the order of the
    inputs (collected again from the manifest's ``input``), counts summed, each shard's device, counts and
    seconds under ``shards``. The shard files stay.

    ``shards``: merge only the split into that many shards (what a torchrun export just wrote), ignoring
    shard files of other splits left by earlier runs; by default there must be exactly one split.

    Raises:
        MergeError: no shards, shards of different splits or options, or a missing or unreadable shard.
    """
    out_dir = Path(out)
    pattern = "manifest.shard-*-of-*.json" if shards is None else f"manifest.shard-*-of-{int(shards)}.json"
    found = sorted(out_dir.glob(pattern))
    if not found:
        raise MergeError(f"{out_dir}: no manifest.shard-i-of-n.json files to merge")
    manifests = {}
    for path in found:
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            i, n = manifest["options"]["shard"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise MergeError(f"{path}: unreadable shard manifest ({type(exc).__name__}: {exc})") from None
        manifests[(int(i), int(n))] = manifest
    counts = {n for _, n in manifests}
    if len(counts) != 1:
        raise MergeError(f"{out_dir}: shards of different splits ({', '.join(f'of {n}' for n in sorted(counts))})")
    (n,) = counts
    missing = [i for i in range(n) if (i, n) not in manifests]
    if missing:
        raise MergeError(f"{out_dir}: missing shard {', '.join(map(str, missing))} of {n}")
    first = manifests[(0, n)]

    def shaping(m: dict) -> dict:
        return {k: v for k, v in m["options"].items() if k not in ("shard", "device", "workers", "batch_size")}

    for (i, _), m in sorted(manifests.items()):
        if shaping(m) != shaping(first) or m["checkpoint"].get("sha256") != first["checkpoint"].get("sha256"):
            raise MergeError(f"{out_dir}: shard {i} of {n} was made with other options or another checkpoint than shard 0")
    order = {f.source: k for k, f in enumerate(collect_inputs(first["options"]["input"], exclude=out_dir).files)}
    index, errors = [], []
    for i in range(n):
        index += _read_csv(out_dir / f"index{shard_suffix(i, n)}.csv", _INDEX_HEADER)
        errors += _read_csv(out_dir / f"errors{shard_suffix(i, n)}.csv", _ERRORS_HEADER)
    late = len(order)
    index.sort(key=lambda row: order.get(row[0], late))
    errors = _in_input_order(errors, order)
    totals = {k: sum(m["counts"].get(k, 0) for m in manifests.values()) for k in first["counts"]}
    manifest = {
        "checkpoint": first["checkpoint"],
        "versions": first["versions"],
        "options": {**first["options"], "shard": [0, 1]},
        "counts": totals,
        "seconds": max(m["seconds"] for m in manifests.values()),
        "shards": [
            {"shard": [i, n], "device": m["options"].get("device"), "counts": m["counts"], "seconds": m["seconds"]}
            for (i, _), m in sorted(manifests.items())
        ],
    }
    atomic_write_text(out_dir / "index.csv", csv_text(_INDEX_HEADER, index))
    atomic_write_text(out_dir / "errors.csv", csv_text(_ERRORS_HEADER, errors))
    atomic_write_json(out_dir / "manifest.json", manifest)
    return ExportResult(
        out_dir, totals.get("inputs", 0), totals.get("ok", 0), totals.get("redone", 0), totals.get("skipped", 0),
        [(r[0], r[1]) for r in errors], out_dir / "manifest.json",
    )  # fmt: skip


def die_with_parent(_worker_id: int = 0, *, parent: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: on Linux the worker gets SIGKILL when the export process ``parent``
    (its pid, read before the fork) dies, even by SIGKILL, instead of lingering with its memory; elsewhere
    torch's own parent check remains."""
    parent = os.getppid() if parent is None else parent
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _write_task(
    base: Path, old: dict | None, exp, config: ExportConfig, item: PreparedImage, card: dict, knows_defining: bool,
    options: dict, compare: Comparison | None = None,
) -> dict:
    """One image's defining-part figures (its annotations read here, off the model's thread) and files."""
    defining = defining_summaries(card, exp, _annotations(exp.source) if knows_defining else None)
    return _rewrite(base, old, exp, config, item, defining, options, compare)


def _rewrite(
    base: Path, old: dict | None, exp, config: ExportConfig, item: PreparedImage, defining, options: dict,
    compare: Comparison | None = None,
) -> dict:
    """Write an image's outputs; an earlier run's record is removed first (the image is unfinished until the
    new json lands) and its files that the new outputs do not replace afterwards."""
    if old is not None:
        _json_path(base).unlink(missing_ok=True)
    record = exp.save(
        base, config.style, topk=config.topk, image=item.view, defining=defining, options=options, compare=compare,
        clean_temps=False, montage=config.montage,  # export() swept each folder once
    )  # fmt: skip
    if old is not None:
        stale = set(old.get("outputs", [])) - set(record["outputs"])
        for name in stale:
            if isinstance(name, str) and name == Path(name).name and name.startswith(base.name):
                (base.parent / name).unlink(missing_ok=True)
    return record


def _remove_stale_temps(bases: Sequence[Path], unfinished: set[Path] = frozenset()) -> None:
    """Remove the temps a killed run left for these outputs, and the montages of the ``unfinished`` ones
    (no json): one listing per output folder."""
    by_folder: dict[Path, tuple[set[str], set[str]]] = {}
    for base in bases:
        stems, left = by_folder.setdefault(base.parent, (set(), set()))
        stems.add(base.name)
        if base in unfinished:
            left.add(base.name)
    for folder, (stems, left) in by_folder.items():
        for tmp in stale_temps(folder, stems, left):
            tmp.unlink(missing_ok=True)


def _annotations(source: str) -> PartAnnotations | None:
    """The part annotations of an input inside a CUB-layout dataset; None elsewhere or when unreadable."""
    try:
        return image_annotations(source)
    except DatasetError:  # a malformed dataset or mask: the json falls back to the card's figure
        return None


def _json_path(base: Path) -> Path:
    return base.with_name(base.name + ".json")


def _record(base: Path) -> dict | None:
    """The json an earlier run finished this image with; None when absent or unreadable (then re-done)."""
    try:
        rec = json.loads(_json_path(base).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _current(record: dict | None, options: dict, source: str) -> bool:
    """An earlier record still stands: the same options, and made from this very input."""
    return record is not None and record.get("options") == options and record.get("file") == source


def _index_row(f: InputFile, rec: dict) -> list[str]:
    folder = f.key.rsplit("/", 1)[0] if "/" in f.key else ""
    outputs = [f"{folder}/{name}" if folder else name for name in rec["outputs"]]
    return [f.source, ";".join(outputs), rec["prediction"]["name"], f"{rec['prediction']['prob']:.6f}", rec["target"]["name"]]
