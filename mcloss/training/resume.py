"""Starting a session: a fresh run directory, or a saved run's config, weights, optimizer, schedule and RNG streams."""

from __future__ import annotations

import logging
import uuid
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from mcloss.core.checkpoint import CheckpointError, load_checkpoint, read_metadata
from mcloss.core.distributed import DistContext
from mcloss.core.model import MCModel
from mcloss.training.config import RESUME_OVERRIDABLE, TrainConfig, TrainError
from mcloss.training.run_dir import (
    RunDirError,
    check_fresh_run_dir,
    load_resume_state,
    read_metrics,
    read_run_config,
    restore_rng,
)
from mcloss.training.setup import build_scheduler, derived_seed, seed_all

__all__ = [
    "RunStart",
    "prepare_run_dir",
    "open_run_dir",
    "load_last_weights",
    "restore_optimization",
    "restore_random_streams",
]

log = logging.getLogger(__name__)


@dataclass
class RunStart:
    """Where a session starts: a fresh run, or a saved one (its config.json, resume.pt and metrics rows)."""

    run_id: str
    record: dict | None = None
    state: dict | None = None
    rows: list[dict] = field(default_factory=list)

    @property
    def epoch(self) -> int:
        """The last completed epoch (0 for a fresh run)."""
        return 0 if self.state is None else int(self.state["epoch"])


def prepare_run_dir(config: TrainConfig) -> RunStart:
    """Check the run directory; on resume, load its state consistently (nothing is unpickled).

    Raises:
        RunDirError: a fresh run's ``out`` holds a run, or a saved run's files disagree with each other.
        TrainError: the configuration differs from the saved run's.
    """
    out = Path(config.out)
    if not config.resume:
        check_fresh_run_dir(out)
        return RunStart(run_id=uuid.uuid4().hex)
    run = read_run_config(out)
    saved = run["config"]
    changed = [
        f.name
        for f in fields(TrainConfig)
        if f.name not in RESUME_OVERRIDABLE and f.name not in ("out", "resume") and saved.get(f.name, f.default) != getattr(config, f.name)
    ]
    if changed:
        raise TrainError(
            f"resume: {out}: the configuration differs from the saved run in {', '.join(changed)}", parameter="resume"
        )
    state = load_resume_state(out / "resume.pt")
    if state.get("run_id") != run.get("run_id"):
        raise RunDirError(f"resume: {out}/resume.pt belongs to another run than {out}/config.json", parameter="resume")
    epoch = int(state["epoch"])
    last = out / "last.safetensors"
    if not last.is_file():
        raise RunDirError(f"resume: {out} has no last.safetensors (the model weights to resume from)", parameter="resume")
    card = read_metadata(last)["card"]
    if card.get("run_id") != run.get("run_id"):
        raise RunDirError(f"resume: {last} belongs to another run than {out}/config.json", parameter="resume")
    if card.get("epoch") != epoch:
        raise RunDirError(
            f"resume: {last} is from epoch {card.get('epoch')} but resume.pt from epoch {epoch} "
            "(the run was killed while saving); cannot resume exactly",
            parameter="resume",
        )
    rows = read_metrics(out / "metrics.csv", upto=epoch)
    return RunStart(run_id=run["run_id"], record=run, state=state, rows=rows)


def open_run_dir(config: TrainConfig, ctx: DistContext) -> RunStart:
    """:func:`prepare_run_dir` on rank 0; every rank gets its result, or raises its error."""
    start: RunStart | Exception | None = None
    if ctx.is_main:
        try:
            start = prepare_run_dir(config)
        except (RunDirError, TrainError, CheckpointError) as exc:
            start = exc
    start = ctx.broadcast_object(start)
    if isinstance(start, Exception):
        raise start
    return start


def load_last_weights(out: str | Path, model: MCModel) -> None:
    """Load the run's last.safetensors into ``model``; it must have the run's groups and class names."""
    path = Path(out) / "last.safetensors"
    last = load_checkpoint(path)
    if last.config.get("groups") != model.groups or last.class_names != model.class_names:
        raise RunDirError(f"resume: {path} does not match the run's model (groups or class names differ)", parameter="resume")
    model.load_state_dict(last.state_dict())


def restore_optimization(
    optimizer: torch.optim.Optimizer, config: TrainConfig, state: dict, *, report: bool = True
) -> torch.optim.lr_scheduler.LRScheduler:
    """Load the optimizer state and return the schedule where the saved run left it.

    When ``config.epochs`` differs from the saved run's, the schedule is rebuilt for the new length
    and fast-forwarded to the saved epoch (a note is logged when ``report``).
    """
    start = int(state["epoch"])
    optimizer.load_state_dict(state["optimizer"])
    if int(state["epochs"]) == config.epochs:
        scheduler = build_scheduler(optimizer, config)
        scheduler.load_state_dict(state["scheduler"])
        return scheduler
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    scheduler = build_scheduler(optimizer, config)
    with warnings.catch_warnings():  # fast-forwarding steps the scheduler without optimizer steps
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start):
            scheduler.step()
    if report:
        log.warning(
            "the schedule now spans %d epochs instead of %s; epoch %d uses lr %.4g",
            config.epochs,
            state["epochs"],
            start + 1,
            optimizer.param_groups[0]["lr"],
            extra={"note": True},
        )
    return scheduler


def restore_random_streams(start: RunStart, config: TrainConfig, ctx: DistContext) -> None:
    """Give this rank the random streams it had when the saved epoch ended.

    A fresh DDP run gets distinct streams per rank; a run resumed with another number of processes
    is reseeded from (seed, epoch, rank), with a note on rank 0.
    """
    if start.state is None:
        if ctx.enabled:
            seed_all(derived_seed(config.seed, ctx.rank))  # distinct augmentation and masks per rank
        return
    rng = start.state["rng"]
    if len(rng) == ctx.world_size:
        restore_rng(rng[ctx.rank])
        return
    seed_all(derived_seed(config.seed, start.epoch, ctx.rank))
    if ctx.is_main:
        log.warning(
            "resumed with %d process(es) instead of %d; random streams are reseeded",
            ctx.world_size,
            len(rng),
            extra={"note": True},
        )
