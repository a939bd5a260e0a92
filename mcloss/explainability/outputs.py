"""The files of one explanation, as ``mcloss export`` and :meth:`Explanation.save` write them.

For a stem ``<base>`` (e.g. ``out/birds/a.jpg``):

- ``<base>.png``: the montage of the first target (original | ξ channels | CCMP | parts | Grad-CAM); the
  target of rank r ≥ 2 adds ``<base>.r<r>.png``. With ``montage_format`` ``jpg`` or ``webp`` they are
  ``<base>.jpg`` / ``<base>.webp`` (and ``.r<r>.jpg`` ...) instead.
- ``<base>.npz``: ``channels`` [ξ, h, w] raw F slice at feature resolution, ``gradcam`` [h, w] raw (ReLU
  Grad-CAM of the FC-head logit) when computed, ``channel_gradcam`` [ξ, h, w] and ``guided`` [H_in, W_in]
  when computed, ``probs`` (FC head), ``probs_mc`` (MC head), ``target`` (int), ``peaks_xy`` [ξ, 2]
  (original pixels), ``targets`` [T] (all targets); arrays of rank r ≥ 2 are suffixed ``_r<r>``.
- ``<base>.json`` (written last: an image is finished when its json exists): ``file``, ``image_size``
  [width, height] after EXIF, ``prediction`` {index, name, prob}, ``prediction_mc``, ``topk``
  [{index, name, prob}], ``label`` (or null), ``target`` {index, name, prob}, ``channels`` [{channel,
  peak_xy [x, y] original pixels, peak_value}], ``gradcam`` {peak_xy} (or null), ``feature_hw``,
  ``geometry`` {resized, crop}, ``targets`` ({rank, index, name, prob, prob_mc, channels, gradcam, montage
  (the montage's file), png (the same when it is a PNG, else null), versus, defining_parts} per rank, plus
  ``defining_mass_ratio`` where known) and ``outputs`` (file names).
  ``domain``: the image's domain check, ``{available: true, score, threshold, in_domain}`` (in_domain: the
  score is at most the threshold calibrated so that 95 % of held-out in-domain images pass), or
  ``{available: false}`` for a model without domain statistics (see :mod:`mcloss.core.domain`).
  With a contrast (``explain(contrast=)``, ``mcloss export --contrast``): ``finer`` and ``contrast`` {peak_xy}
  beside ``gradcam``, each target's ``versus`` {index, name (class B), auto (picked from the logits),
  references [{index, name, prob}] (Finer-CAM's, B first)} (else null), and in the npz ``finer`` and
  ``contrast`` [h, w] and ``versus`` [R] (the references' indices, B first).
  Without montages (``mcloss export --no-montage``) no montage is written and each target's ``montage`` and
  ``png`` are null.
  With ``--compare``, ``compare`` holds the second model's ``checkpoint``, ``sha256``, predictions, ``topk``
  and ``targets`` (same classes, same order), the npz its arrays prefixed ``compare_``, and every montage
  shows both models.
  ``mcloss export`` adds ``options``: the settings that made the outputs (checkpoint sha256, target,
  maps, style, topk, method; ``montage: false`` and no style under ``--no-montage``); a re-run re-does an
  image whose options differ; and ``input`` {path, size, mtime_ns}. The app's ZIP records under ``options``
  the same keys where they mean the same, with ``made_by: "mcloss app"``, and ``input`` {name, size, sha256}.
  ``defining_parts`` lists the parts the checkpoint's card says define the target class ([] when it
  says none, or nothing about its classes); ``defining_mass_ratio`` {ccmp, channels, source} is the mass
  per area on those parts ÷ on the other parts of the CCMP map and the geometric mean over the channels
  (1 = no preference; null where undefined), measured on the image (``source`` ``"image"``) when its
  part annotations are known, else the card's fresh-set figure (``"fresh-set card"``); see
  :mod:`mcloss.explainability.defining`.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mcloss.core.errors import ParameterError
from mcloss.core.files import atomic_write_bytes, atomic_write_json
from mcloss.data.io import DEFAULT_QUALITY, IMAGE_FORMATS, check_encoding, encode_image, image_format
from mcloss.explainability import kinds
from mcloss.explainability.render import Style, compare_montage, explanation_montage
from mcloss.explainability.render.device import device_montage_jpeg

if TYPE_CHECKING:
    from mcloss.explainability.defining import DefiningSummary
    from mcloss.explainability.explanation import Explanation, GroupMaps

__all__ = [
    "Comparison",
    "OutputOptions",
    "explanation_arrays",
    "explanation_record",
    "montage_name",
    "read_record",
    "stale_temps",
    "write_explanation",
]


def montage_name(name: str, rank: int, fmt: str = "png") -> str:
    """The montage file of the target of ``rank`` (1-based) for an output stem named ``name``, in format ``fmt``
    (:data:`mcloss.data.io.IMAGE_FORMATS`): ``a.jpg.png``, ``a.jpg.r2.png``, ``a.jpg.jpg``, ..."""
    suffix = image_format(fmt).suffix
    return f"{name}{suffix}" if rank == 1 else f"{name}.r{rank}{suffix}"


def explanation_arrays(exp: Explanation) -> dict[str, np.ndarray]:
    """The raw maps and probabilities of the npz file (each computed kind under its name)."""
    arrays: dict[str, np.ndarray] = {
        "probs": exp.probs_fc.astype(np.float32),
        "probs_mc": exp.probs_mc.astype(np.float32),
        "target": np.int64(exp.groups[0].target),
        "targets": np.array([g.target for g in exp.groups], np.int64),
    }
    for rank, gm in enumerate(exp.groups, start=1):
        sfx = "" if rank == 1 else f"_r{rank}"
        arrays[f"{kinds.CHANNELS}{sfx}"] = gm.channels
        arrays[f"peaks_xy{sfx}"] = gm.peaks_xy.astype(np.float64)
        arrays |= {f"{name}{sfx}": value for name, value in _computed(gm)}
        if gm.versus is not None:
            arrays[f"versus{sfx}"] = np.array(gm.versus.references, np.int64)
    return arrays


def _computed(gm: GroupMaps) -> list[tuple[str, np.ndarray]]:
    """(name, map) of the kinds other than ``channels`` that ``gm`` holds, in table order."""
    return [(k.name, gm.maps[k.name]) for k in kinds.kinds() if gm.maps.get(k.name) is not None]


def _peak_kinds() -> list[str]:
    """The kinds that keep a peak (their peaks are in the json), in table order."""
    return [k.name for k in kinds.kinds() if k.peak]


def _peak_entries(gm: GroupMaps) -> dict:
    """The json's entry of every kind that keeps a peak: ``{"peak_xy": [x, y]}``, or null when not computed."""
    peaks = {name: gm.map_peaks.get(name) for name in _peak_kinds()}
    return {name: None if xy is None else {"peak_xy": [float(v) for v in xy]} for name, xy in peaks.items()}


def _versus_entry(gm: GroupMaps, probs: np.ndarray) -> dict | None:
    """The json's ``versus``: class B, whether it was picked from the logits, and Finer-CAM's references."""
    v = gm.versus
    if v is None:
        return None
    refs = [{"index": i, "name": n, "prob": float(probs[i])} for i, n in zip(v.references, v.names, strict=True)]
    return {"index": v.other, "name": v.names[0], "auto": v.auto, "references": refs}


def _target_entry(
    gm: GroupMaps, rank: int, montage: str | None, defining: DefiningSummary | None, probs: np.ndarray
) -> dict:
    entry = {
        "rank": rank,
        "index": gm.target,
        "name": gm.name,
        "prob": gm.prob,
        "prob_mc": gm.prob_mc,
        "channels": [
            {"channel": i, "peak_xy": [float(v) for v in gm.peaks_xy[i]], "peak_value": float(gm.peak_values[i])}
            for i in range(len(gm.channels))
        ],
        **_peak_entries(gm),
        "versus": _versus_entry(gm, probs),
        "png": montage if montage is not None and montage.endswith(".png") else None,
        "montage": montage,
        "defining_parts": [] if defining is None else list(defining.parts),
    }
    ratio = None if defining is None else defining.record()
    if ratio is not None:
        entry["defining_mass_ratio"] = ratio
    return entry


def _aligned(exp: Explanation, defining: Sequence[DefiningSummary | None] | None) -> list[DefiningSummary | None]:
    if defining is None:
        return [None] * len(exp.groups)
    if len(defining) != len(exp.groups):
        raise ParameterError(f"defining: {len(defining)} defining-part summaries for {len(exp.groups)} targets", parameter="defining")
    return list(defining)


def explanation_record(
    exp: Explanation,
    topk: int = 5,
    name: str | None = None,
    defining: Sequence[DefiningSummary | None] | None = None,
    montage: bool = True,
    montage_format: str = "png",
) -> dict:
    """The json record (see the module docstring).

    Args:
        exp: the explanation.
        topk: entries in ``topk``.
        name: the output stem's file name (default the source's).
        defining: one :class:`~mcloss.explainability.defining.DefiningSummary` (or None) per target, from
            :func:`~mcloss.explainability.defining.defining_summaries`; default none known.
        montage: whether the montages are written (else each target's ``montage`` and ``png`` are null).
        montage_format: their format (``png`` names the file under ``png`` too, as before other formats).
    """
    stem = name if name is not None else Path(exp.source or "image").name
    entries = [
        _target_entry(gm, rank, montage_name(stem, rank, montage_format) if montage else None, d, exp.probs_fc)
        for rank, (gm, d) in enumerate(zip(exp.groups, _aligned(exp, defining), strict=True), start=1)
    ]
    pred, pred_mc = exp.prediction, exp.prediction_mc
    order = np.argsort(-exp.probs_fc, kind="stable")[:topk]
    return {
        "file": exp.source,
        "image_size": list(exp.image_size),
        "prediction": {"index": pred, "name": exp.class_name(pred), "prob": float(exp.probs_fc[pred])},
        "prediction_mc": {"index": pred_mc, "name": exp.class_name(pred_mc), "prob": float(exp.probs_mc[pred_mc])},
        "topk": [{"index": int(i), "name": exp.class_name(int(i)), "prob": float(exp.probs_fc[i])} for i in order],
        "label": None if exp.label is None else {"index": exp.label, "name": exp.class_name(exp.label)},
        "target": {"index": entries[0]["index"], "name": entries[0]["name"], "prob": entries[0]["prob"]},
        "channels": entries[0]["channels"],
        **{name: entries[0][name] for name in _peak_kinds()},
        "feature_hw": list(exp.feature_hw),
        "geometry": {"resized": list(exp.geometry.resized), "crop": list(exp.geometry.crop)},
        "domain": {"available": False} if exp.domain is None else {"available": True, **exp.domain.record()},
        "targets": entries,
        "outputs": [e["montage"] for e in entries if e["montage"]] + [f"{stem}.npz", f"{stem}.json"],
    }


@dataclass(frozen=True)
class Comparison:
    """A second model's explanation of the same image and targets, and the two models' names.

    Attributes:
        explanation: the second model's Explanation (its groups in the same target order).
        titles: (first model, second model), e.g. the checkpoint file names.
        sha256: the second checkpoint's sha256, for the record (or None).
    """

    explanation: Explanation
    titles: tuple[str, str]
    sha256: str | None = None

    def record(self, topk: int) -> dict:
        """The json's ``compare``: the second model's name, predictions, topk and per-target entries."""
        rec = explanation_record(self.explanation, topk)
        keep = ("prediction", "prediction_mc", "topk", "target", "channels", *_peak_kinds(), "feature_hw", "domain", "targets")
        out = {"checkpoint": self.titles[1], "sha256": self.sha256} | {k: rec[k] for k in keep}
        for entry in out["targets"]:
            entry.pop("png", None)
            entry.pop("montage", None)
        return out


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # uncompressed: deflating the maps cost more than drawing a tile, for 40 % of 50 kB
    return buf.getvalue()


def stale_temps(directory: Path, stems: set[str], unfinished: set[str] = frozenset()) -> list[Path]:
    """The temp files a killed run left in ``directory`` for the outputs of the output stems ``stems``:
    ``.<output>.<8 random characters>.tmp<suffix>`` (``atomic_path``'s names) where ``<output>`` is exactly
    one of a stem's output names (``<stem>.png``, ``<stem>.r<r>.png``, ``<stem>.npz``, ``<stem>.json``), so
    that another image's live temps (``a.png.png`` beside ``a.png``) are never touched. With ``unfinished``
    (stems to be written again: without a json, which a killed run may have left half done, or made with other
    options), also their montages in every format: a re-run in another format, mode or with fewer targets would
    not write over them. One directory listing for every stem: a
    listing per image would make an export of n images in a folder O(n²)."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        temp = bool(match) and any(stem in stems for stem in _stems_of(match.group(1)))
        montage = bool(unfinished) and _is_montage(entry.name) and any(s in unfinished for s in _stems_of(entry.name))
        if temp or montage:
            found.append(Path(entry.path))
    return found


#: The file suffixes a montage can have, one per image format.
_MONTAGE_SUFFIXES = tuple(f.suffix for f in IMAGE_FORMATS.values())


def _is_montage(name: str) -> bool:
    return name.endswith(_MONTAGE_SUFFIXES)


_TEMP_NAME = re.compile(r"^\.(.+)\.[^.]{8}\.tmp(?:\.[^.]*)?$", re.DOTALL)


def _stems_of(output: str) -> list[str]:
    """The output stems whose output could be named ``output``."""
    for ext in (".npz", ".json"):
        if output.endswith(ext):
            return [output[: -len(ext)]]
    suffix = next((s for s in _MONTAGE_SUFFIXES if output.endswith(s)), None)
    if suffix is None:
        return []
    stem = output[: -len(suffix)]
    ranked = re.fullmatch(r"(.+)\.r\d+", stem, re.DOTALL)
    return [stem, ranked.group(1)] if ranked else [stem]


@dataclass(frozen=True)
class OutputOptions:
    """The settings one run applies to every explanation it writes (:meth:`Explanation.save` makes one per
    call, ``mcloss export`` one per run).

    Attributes:
        style: how the montages are drawn (``style.tile_height`` rows per tile).
        topk: entries in the json's ``topk`` list.
        options: recorded as the json's ``options`` when given (``mcloss export`` records its settings).
        clean_temps: first remove the temps a killed run left for an image's outputs (:func:`stale_temps`);
            an export sweeps each folder once for all its images instead.
        montage: False: no montage, only the npz and the json (``mcloss export --no-montage``).
        montage_format: ``png`` (lossless), ``jpg`` (4:4:4) or ``webp`` (:data:`mcloss.data.io.IMAGE_FORMATS`).
        quality: the lossy formats' quality, 1..100.
        device: where the model runs; on a CUDA device, JPEG montages are composed and encoded there
            (:func:`~mcloss.explainability.render.device.device_montage_jpeg`), elsewhere on the CPU.
    """

    style: Style = field(default_factory=Style)
    topk: int = 5
    options: dict | None = None
    clean_temps: bool = True
    montage: bool = True
    montage_format: str = "png"
    quality: int = DEFAULT_QUALITY
    device: str | None = None

    def __post_init__(self) -> None:
        check_encoding(self.montage_format, self.quality)

    @property
    def montage_device(self) -> str | None:
        """The CUDA device the montages are composed and encoded on (JPEG montages of a model there), or None."""
        on_cuda = self.device is not None and str(self.device).startswith("cuda")
        return str(self.device) if on_cuda and image_format(self.montage_format).name == "jpg" else None

    def encode(self, picture: np.ndarray) -> bytes:
        """A montage's bytes in this run's format."""
        return encode_image(picture, self.montage_format, quality=self.quality, full_chroma=True)


def input_stamp(source: str | os.PathLike | None) -> dict | None:
    """What tells a re-run that an input is the file an earlier run read: its real path (however the input was
    typed, from wherever), size and modification time; None when it is not a readable file."""
    try:
        st = os.stat(source)
    except (OSError, TypeError, ValueError):
        return None
    return {"path": os.path.realpath(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_explanation(
    exp: Explanation,
    base: Path,
    *,
    view: np.ndarray | None,
    output: OutputOptions,
    defining: Sequence[DefiningSummary | None] | None = None,
    compare: Comparison | None = None,
    input_stamp: dict | None = None,
    old: dict | None = None,
) -> dict:
    """Write ``<base>.png`` (+ ``.r<r>.png``), ``<base>.npz`` and, last, ``<base>.json``; return the record.

    Over an earlier run's outputs (``old``: their record, :func:`read_record`), that record is removed first (the
    outputs are unfinished until the new json lands), and afterwards the files it listed that the new outputs do
    not replace (another format, fewer targets).

    Args:
        exp: the explanation (its ``source`` is the json's ``file``).
        base: the output stem.
        view: RGB uint8 view of the original to draw the montages on (None without montages).
        output: the run's settings (style, topk, recorded options, temp cleaning, montages).
        defining: the targets' defining-part summaries (see :func:`explanation_record`).
        compare: a second model's explanation of the same image and targets (``mcloss export --compare``):
            each montage shows both models, one above the other (:func:`compare_montage`), the npz adds its
            arrays prefixed ``compare_``, and the json its record under ``compare``.
        input_stamp: the input file's real path, size and modification time, recorded under ``input``
            (``mcloss export`` re-does an image whose input no longer matches it).
    """
    json_path = base.parent / f"{base.name}.json"
    if output.montage and view is None:
        raise ParameterError("view: drawing the montages needs a view of the image", parameter="view")
    if output.clean_temps:
        for tmp in stale_temps(base.parent, {base.name}):
            tmp.unlink(missing_ok=True)
    if old is not None:
        json_path.unlink(missing_ok=True)
    record = explanation_record(exp, output.topk, base.name, defining, output.montage, output.montage_format)
    if input_stamp is not None:
        record["input"] = input_stamp
    if output.options is not None:
        record["options"] = output.options
    arrays = explanation_arrays(exp)
    if compare is not None:
        record["compare"] = compare.record(output.topk)
        arrays |= {f"compare_{k}": v for k, v in explanation_arrays(compare.explanation).items()}
    written: list[Path] = []
    try:  # a write that fails (a full disk, a denied folder, an interrupt) takes this call's files with it
        for rank in range(1, len(exp.groups) + 1) if output.montage else ():  # each target's montage
            path = base.parent / montage_name(base.name, rank, output.montage_format)
            written.append(path)
            atomic_write_bytes(path, _montage_bytes(exp, rank - 1, view, output, compare))
        written.append(base.parent / f"{base.name}.npz")
        atomic_write_bytes(written[-1], _npz_bytes(arrays))
        atomic_write_json(json_path, record)
    except BaseException:
        if not json_path.exists():  # (an interrupt just after the json landed leaves the finished image whole)
            for path in written:
                path.unlink(missing_ok=True)
        raise
    for name in set(old.get("outputs", [])) - set(record["outputs"]) if old is not None else ():
        if isinstance(name, str) and name == Path(name).name and name.startswith(base.name):
            (base.parent / name).unlink(missing_ok=True)
    return record


def read_record(base: Path) -> dict | None:
    """The json an earlier run finished ``base``'s outputs with; None when absent or unreadable."""
    try:
        rec = json.loads(base.with_name(base.name + ".json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _montage_bytes(exp: Explanation, group: int, view: np.ndarray, output: OutputOptions, compare: Comparison | None) -> bytes:
    """One target's montage, encoded (composed and encoded on the model's GPU where :attr:`OutputOptions.montage_device`
    says so)."""
    if compare is None and output.montage_device is not None:
        return device_montage_jpeg(view, exp, group, output.style, device=output.montage_device, quality=output.quality)
    if compare is None:
        return output.encode(explanation_montage(view, exp, group, output.style))
    return output.encode(compare_montage(view, exp, compare.explanation, group, output.style, compare.titles))
