"""The files of a training run directory: config, per-epoch metrics, curves, and the resume state."""

from __future__ import annotations

import csv
import io
import json
import pickle
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcloss.core.errors import MclossError, first_line
from mcloss.core.files import atomic_write_bytes, atomic_write_text, csv_text, new_figure, save_figure

__all__ = [
    "RunDirError",
    "RUN_FORMAT",
    "RESUME_FORMAT",
    "RUN_FILES",
    "METRIC_COLUMNS",
    "check_fresh_run_dir",
    "read_run_config",
    "read_metrics",
    "write_metrics",
    "plot_curves",
    "capture_rng",
    "restore_rng",
    "save_resume_state",
    "load_resume_state",
]

RUN_FORMAT = "mcloss-run/1"
RESUME_FORMAT = "mcloss-resume/1"
#: Files that mark a directory as holding a training run.
RUN_FILES = ("config.json", "metrics.csv", "resume.pt", "last.safetensors", "best.safetensors", "curves.png")
#: Columns of metrics.csv, one row per completed epoch (epoch is 1-based).
METRIC_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_ce",
    "train_dis",
    "train_div",
    "train_acc",
    "test_loss",
    "test_acc_fc",
    "test_acc_mc",
    "time_s",
)


class RunDirError(MclossError, ValueError):
    """A run directory cannot be used as asked; the message names the directory and the reason."""


def check_fresh_run_dir(out: str | Path) -> None:
    """Refuse to start a new run in a directory that already holds one."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"out {out}: exists and is not a directory", parameter="out")
    present = [name for name in RUN_FILES if (path / name).exists()]
    if present:
        raise RunDirError(
            f"out {out}: already holds a training run ({', '.join(present)}); "
            "pass resume to continue it, or choose another directory",
            parameter=("out", "resume"),
        )


def read_run_config(out: str | Path) -> dict:
    """Read a run's config.json for resuming; refuse missing or foreign directories."""
    path = Path(out)
    if not path.is_dir():
        raise RunDirError(f"resume: {out} does not exist or is not a directory; nothing to resume", parameter="resume")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise RunDirError(f"resume: {out} is not an mcloss training run (no config.json)", parameter="resume")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"resume: {cfg}: unreadable run configuration ({exc})", parameter="resume") from None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT or not isinstance(data.get("config"), dict):
        raise RunDirError(f"resume: {cfg}: not an mcloss training run (format is not {RUN_FORMAT!r})", parameter="resume")
    return data


# ------------------------------------------------------------------------------------------------ metrics


def read_metrics(path: str | Path, upto: int | None = None) -> list[dict[str, float]]:
    """Rows of metrics.csv with ``epoch <= upto`` (all rows when None); a missing file gives no rows."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    try:
        with p.open(newline="", encoding="utf-8") as f:
            for raw in csv.DictReader(f):
                row = {k: (int(v) if k == "epoch" else float(v)) for k, v in raw.items() if k in METRIC_COLUMNS}
                if upto is None or row["epoch"] <= upto:
                    rows.append(row)
    except (KeyError, ValueError, csv.Error) as exc:
        raise RunDirError(f"{path}: corrupt metrics file ({exc})") from None
    return rows


def write_metrics(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write metrics.csv atomically, one row per epoch in :data:`METRIC_COLUMNS` order."""
    atomic_write_text(path, csv_text(METRIC_COLUMNS, [[row[c] for c in METRIC_COLUMNS] for row in rows], float_format=".8g", nan="nan"))


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Write curves.png: losses (left) and train / test FC / test MC accuracy (right) against epoch."""
    epochs = [r["epoch"] for r in rows]
    fig = new_figure((11, 4.2))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, label in (
        ("train_loss", "train total"),
        ("train_ce", "train CE"),
        ("train_dis", "train L_dis"),
        ("train_div", "train L_div"),
        ("test_loss", "test CE (FC head)"),
    ):
        ax_loss.plot(epochs, [r[key] for r in rows], marker=".", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    for key, label in (("train_acc", "train (FC)"), ("test_acc_fc", "test FC head"), ("test_acc_mc", "test MC head")):
        ax_acc.plot(epochs, [100 * r[key] for r in rows], marker=".", label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


# -------------------------------------------------------------------------------------------- RNG states


def capture_rng() -> dict:
    """The python, numpy, torch (and CUDA) RNG states, as tensors and primitives only."""
    version, mt, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "kind": str(kind),
            "state": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict) -> None:
    """Restore the RNG states captured by :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["state"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ resume state


def save_resume_state(path: str | Path, state: dict) -> None:
    """Write the resume state atomically; it must hold only tensors and primitive containers."""
    buf = io.BytesIO()
    torch.save({"format": RESUME_FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _refusal(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to load it unsafely."""
    text = str(exc)
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if found:
        return (
            f"unsafe resume state refused: it holds a Python object ({found.group(1)}) beyond tensors and plain "
            "values, and mcloss never unpickles those"
        )
    if "Weights only load failed" in text or isinstance(exc, pickle.UnpicklingError):
        return "corrupt resume state (not a file of tensors and plain values)"
    return f"corrupt resume state ({first_line(exc)})"


def load_resume_state(path: str | Path) -> dict:
    """Load a resume state with ``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and primitives."""
    p = Path(path)
    if not p.is_file():
        raise RunDirError(f"resume: {p.parent} has no resume.pt (no completed epoch to resume from)", parameter="resume")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        raise RunDirError(f"resume: {p}: {_refusal(exc)}", parameter="resume") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise RunDirError(f"resume: {p}: not an mcloss resume state (format is not {RESUME_FORMAT!r})", parameter="resume")
    return state
