"""The files of a run directory after each epoch: run record, metrics and curves, checkpoints and their card, resume state."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mcloss.core.checkpoint import save_checkpoint
from mcloss.core.errors import OutputError
from mcloss.core.files import atomic_write_json
from mcloss.core.model import MCModel
from mcloss.core.provenance import versions
from mcloss.data.synth.writing import read_synth_meta
from mcloss.training.config import TrainConfig
from mcloss.training.run_dir import RUN_FORMAT, plot_curves, save_resume_state, write_metrics

__all__ = ["RunWriter", "synth_description"]


def synth_description(data: str | Path) -> dict | None:
    """{classes, per_class, size, seed, design} from a synthetic dataset's synth.json, if there is one."""
    meta = read_synth_meta(data)
    if meta is None:
        return None
    return {key: meta.get(key) for key in ("classes", "per_class", "size", "seed")} | {"design": meta.get("design", "single")}


def _defining_parts(data: str | Path) -> dict[str, list[str]] | None:
    """The classes' defining parts from the dataset (synth.json or CUB attributes), or None when unknown."""
    from mcloss.data.defining import defining_parts

    try:
        return defining_parts(data)
    except (OSError, ValueError):  # unreadable attribute files: the card just does not know them
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunWriter:
    """Writes a run directory's files (rank 0 only); every file is replaced atomically.

    Args:
        config: the session's configuration.
        run_id: the run's id (kept across resumes).
        record: a resumed run's config.json contents, or None for a fresh run.
        start_epoch: the last epoch completed before this session (0 for a fresh run).
        facts: what the run record says about the session: ``dataset_kind``, ``class_names``,
            ``train_size``, ``test_size``, ``world_size``, ``device`` and ``model`` (the model config).
    """

    def __init__(
        self, config: TrainConfig, *, run_id: str, record: dict | None, start_epoch: int, facts: dict[str, Any]
    ) -> None:
        self.config = config
        self.out = Path(config.out)
        self.run_id = run_id
        self.record = record
        self.start_epoch = start_epoch
        self.facts = facts
        self.synth = synth_description(config.data)  # read once per session, not at every checkpoint
        self.defining = _defining_parts(config.data)

    def write_epoch(
        self, rows: Sequence[dict], model: MCModel, *, improved: bool, resume_state: dict[str, Any]
    ) -> None:
        """Write every file of the epoch ``rows[-1]`` completed.

        The caller runs this inside :meth:`InterruptGuard.critical`, so an epoch is written whole or not at all.

        Args:
            rows: the metrics rows of every completed epoch, this one last.
            model: the model with the epoch's weights; its ``card`` is set for each checkpoint.
            improved: also write best.safetensors.
            resume_state: optimizer, scheduler, best_acc, best_epoch, backbone_parameters, rng and world_size.

        Raises:
            OutputError: a file cannot be written (the message names ``out`` and the reason).
        """
        try:
            self._write_epoch(rows, model, improved=improved, resume_state=resume_state)
        except OSError as exc:
            raise OutputError(
                f"out {self.out}: cannot write epoch {rows[-1]['epoch']} ({exc})", parameter="out"
            ) from exc

    def _write_epoch(
        self, rows: Sequence[dict], model: MCModel, *, improved: bool, resume_state: dict[str, Any]
    ) -> None:
        row = rows[-1]
        epoch = row["epoch"]
        if epoch == self.start_epoch + 1:
            atomic_write_json(self.out / "config.json", self._run_record())
        write_metrics(self.out / "metrics.csv", rows)
        plot_curves(rows, self.out / "curves.png", title=f"{self.config.backbone} · loss {self.config.loss} · {self.out.name}")
        if improved:
            model.card = self.card(row, "best")
            save_checkpoint(model, self.out / "best.safetensors")
        model.card = self.card(row, "last")
        save_checkpoint(model, self.out / "last.safetensors")
        state = {"run_id": self.run_id, "epoch": epoch, "epochs": self.config.epochs, **resume_state}
        save_resume_state(self.out / "resume.pt", state)

    def card(self, row: dict, which: str) -> dict:
        """The provenance card of a checkpoint (``which`` is "best" or "last") after the epoch of ``row``."""
        cfg = self.config
        card = {
            "run_id": self.run_id,
            "checkpoint": which,
            "data_root": str(Path(cfg.data).resolve()),
            "dataset_kind": self.facts["dataset_kind"],
            "seed": cfg.seed,
            "command": cfg.command,
            "epoch": row["epoch"],
            "epochs": cfg.epochs,
            "recipe": cfg.recipe,
            "loss": cfg.loss,
            "alpha": cfg.alpha,
            "beta": cfg.beta,
            "div_warmup": cfg.div_warmup,
            "dis_topk": cfg.dis_topk,
            "dis_topk_from": cfg.dis_topk_from,
            "metrics": dict(row),
        }
        if self.synth is not None:
            card["dataset"] = self.synth
        if self.defining is not None:
            card["defining_parts"] = self.defining
        return card

    def _run_record(self) -> dict:
        """config.json: a new record, or the saved one with this session's configuration and resume entry."""
        cfg, facts = self.config, self.facts
        if self.record is None:
            self.record = {
                "format": RUN_FORMAT,
                "run_id": self.run_id,
                "created": _now(),
                "command": cfg.command,
                "config": asdict(cfg),
                "data_root": str(Path(cfg.data).resolve()),
                "dataset_kind": facts["dataset_kind"],
                "synth": self.synth,
                "class_names": facts["class_names"],
                "train_size": facts["train_size"],
                "test_size": facts["test_size"],
                "world_size": facts["world_size"],
                "device": facts["device"],
                "model": facts["model"],
                "versions": versions(),
                "resumes": [],
            }
        else:
            self.record["config"] = asdict(cfg)
            self.record["resumes"].append(
                {
                    "command": cfg.command,
                    "from_epoch": self.start_epoch,
                    "epochs": cfg.epochs,
                    "world_size": facts["world_size"],
                    "device": facts["device"],
                    "time": _now(),
                    "versions": versions(),
                }
            )
        return self.record
