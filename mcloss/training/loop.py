"""The training run: train one epoch, evaluate it, write it; resumable, in 1..N processes.

Messages for people go to the ``mcloss.training`` logger, on rank 0 only: one INFO line per epoch
(and when there is nothing to do), WARNING for warnings; warnings that are only notes carry
``record.note = True``. The CLI (``mcloss train``) shows them; the library prints nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mcloss.core.device import autocast
from mcloss.core.distributed import DistContext
from mcloss.core.errors import OutputError, Progress, check_callback
from mcloss.core.lock import acquire_folder
from mcloss.core.loss import MCLoss
from mcloss.core.model import MCModel
from mcloss.evaluation.classification import evaluation_sums, summarize_sums
from mcloss.training.config import TrainConfig, TrainError
from mcloss.training.interrupts import InterruptGuard
from mcloss.training.resume import (
    RunStart,
    load_last_weights,
    open_run_dir,
    restore_optimization,
    restore_random_streams,
)
from mcloss.training.run_dir import capture_rng
from mcloss.training.setup import (
    build_loaders,
    build_optimizer,
    build_scheduler,
    dataset_kind,
    load_datasets,
    make_model,
    place_model,
    pretrained_parameter_names,
    seed_all,
    warn_if_bf16_is_emulated,
)
from mcloss.training.writer import RunWriter

__all__ = [
    "train",
    "train_one_epoch",
    "epoch_row",
    "div_warmup_factor",
    "dis_topk_share",
    "PassProgress",
    "TRAIN_SUM_FIELDS",
]

log = logging.getLogger(__name__)

#: The order of the sums returned by :func:`train_one_epoch`.
TRAIN_SUM_FIELDS = ("loss", "ce", "dis", "div", "correct", "n")

#: Progress of a run of passes: called with a pass's name (``"epoch 3/300"`` for an epoch's training batches,
#: ``"eval"`` for its test batches) when the pass starts, it returns that pass's ``progress(done, total)``
#: callback (or None).
PassProgress = Callable[[str], Progress | None]


def div_warmup_factor(progress: float, warmup: float) -> float:
    """The share of β in use after ``progress`` epochs (fractional) with a linear warm-up of ``warmup`` epochs."""
    return _ramp(progress, warmup)


def _ramp(progress: float, length: float) -> float:
    """0 → 1 linearly over the first ``length`` epochs, then 1 (1 throughout for ``length`` <= 0)."""
    if length <= 0:
        return 1.0
    return min(1.0, max(0.0, progress / length))


def dis_topk_share(progress: float, epochs: int, end: float, start: float | None = None) -> float:
    """The share of positions L_dis pools after ``progress`` epochs (fractional) of ``epochs``: ``end``
    throughout, or with ``start`` (``--dis-topk-from``) ``start`` at first, narrowing geometrically to ``end``
    over the first half of the epochs and ``end`` after it."""
    if start is None:
        return end
    t = _ramp(progress, epochs / 2)
    return start ** (1.0 - t) * end**t


def train_one_epoch(
    net: nn.Module,
    criterion: MCLoss,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    config: TrainConfig,
    *,
    epoch: int,
    device: torch.device,
    on_batch_end: Callable[[int, int], None] | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """One epoch of optimizer steps (at most ``config.limit_batches``), β warmed up per step.

    Args:
        net: returns (F, FC-head logits) for a batch (:class:`~mcloss.training.setup.FeaturesAndLogits`, maybe DDP).
        epoch: 1-based; ``criterion.beta`` is ``config.beta`` × :func:`div_warmup_factor` and
            ``criterion.dis_topk`` is :func:`dis_topk_share`.
        on_batch_end: called as ``(epoch, batch_index)`` after each optimizer step.
        progress: called as ``(steps done, steps in the epoch)`` before the first step and after each.

    Returns:
        A float64 tensor on ``device``: sums over the samples in :data:`TRAIN_SUM_FIELDS` order.
    """
    net.train()
    sums = torch.zeros(len(TRAIN_SUM_FIELDS), dtype=torch.float64, device=device)
    limit = config.limit_batches
    total = len(loader) if limit is None else min(limit, len(loader))
    if progress is not None:
        progress(0, total)
    for index, (images, targets) in enumerate(loader):
        if limit is not None and index >= limit:
            break
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, config.amp, cpu=config.cpu_bf16):
            features, logits = net(images)
        logits = logits.float()
        progress_epochs = epoch - 1 + index / total
        criterion.beta = config.beta * div_warmup_factor(progress_epochs, config.div_warmup)
        criterion.dis_topk = dis_topk_share(progress_epochs, config.epochs, config.dis_topk, config.dis_topk_from)
        out = criterion(logits, features, targets)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        optimizer.step()
        n = targets.shape[0]
        correct = (logits.detach().argmax(1) == targets).sum()
        parts = torch.stack([out.total.detach(), out.ce.detach(), out.dis.detach(), out.div.detach()]).double() * n
        sums += torch.cat([parts, torch.stack([correct.double(), torch.tensor(float(n), device=device, dtype=torch.float64)])])
        if on_batch_end is not None:
            on_batch_end(epoch, index)
        if progress is not None:
            progress(index + 1, total)
    return sums


def epoch_row(epoch: int, lr: float, train_sums: list[float], test: dict, seconds: float) -> dict:
    """The metrics.csv row of an epoch from its (all-rank) training sums and test summary.

    Raises:
        TrainError: no training batch ran, or the training loss is not finite.
    """
    n = train_sums[5]
    if n == 0:
        raise TrainError(f"epoch {epoch}: no training batch was run")
    if not all(np.isfinite(train_sums)):
        raise TrainError(
            f"epoch {epoch}: the training loss is not finite; try a lower lr (nothing was saved for this epoch)",
            parameter="lr",
        )
    loss, ce, dis, div, correct = (value / n for value in train_sums[:5])
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": loss,
        "train_ce": ce,
        "train_dis": dis,
        "train_div": div,
        "train_acc": correct,
        "test_loss": test["loss"],
        "test_acc_fc": test["fc_top1"],
        "test_acc_mc": test["mc_top1"],
        "time_s": seconds,
    }


def _epoch_line(row: dict, epochs: int) -> str:
    return (
        f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.4g}  loss {row['train_loss']:.4f} "
        f"(ce {row['train_ce']:.4f} dis {row['train_dis']:.4f} div {row['train_div']:.4f})  "
        f"train {100 * row['train_acc']:.1f}%  test FC {100 * row['test_acc_fc']:.1f}% "
        f"MC {100 * row['test_acc_mc']:.1f}%  {row['time_s']:.1f}s"
    )


class _Run:
    """One training session in one process (rank)."""

    def __init__(
        self,
        config: TrainConfig,
        ctx: DistContext,
        device: torch.device,
        guard: InterruptGuard,
        on_batch_end: Callable[[int, int], None] | None,
        on_epoch_end: Callable[[int, dict, MCModel], None] | None,
        progress: PassProgress | None,
    ) -> None:
        self.config, self.ctx, self.device, self.guard = config, ctx, device, guard
        self.on_batch_end, self.on_epoch_end = on_batch_end, on_epoch_end
        self.progress = progress if ctx.is_main else None

    def run(self) -> dict:
        """Set up (or resume), then train the remaining epochs; returns :func:`train`'s summary."""
        cfg = self.config
        start = open_run_dir(cfg, self.ctx)
        self.run_id, self.rows, self.completed = start.run_id, list(start.rows), start.epoch
        self._setup(start)
        if start.epoch >= cfg.epochs:
            if self.ctx.is_main:
                log.info("%s: already trained %d of %d epochs; nothing to do", Path(cfg.out), start.epoch, cfg.epochs)
            return self._summary("complete")
        try:
            for epoch in range(start.epoch + 1, cfg.epochs + 1):
                self._epoch(epoch)
        except KeyboardInterrupt:
            return self._summary("interrupted")
        return self._summary("complete")

    def _setup(self, start: RunStart) -> None:
        """Datasets, model (the saved weights on resume), optimizer, schedule, loaders and random streams."""
        cfg, ctx, device, state = self.config, self.ctx, self.device, start.state
        if ctx.is_main:
            warn_if_bf16_is_emulated(cfg, device)
        seed_all(cfg.seed)
        train_ds, test_ds, class_names = load_datasets(cfg, ctx)
        if start.record is not None and start.record.get("class_names") != class_names:
            raise TrainError(f"data {cfg.data}: its classes differ from the run's ({cfg.out}/config.json)", parameter="data")
        model = make_model(cfg, class_names, pretrained=state is None)
        if state is not None:
            backbone_names = set(state["backbone_parameters"])
            if ctx.is_main:
                load_last_weights(cfg.out, model)  # DDP hands rank 0's weights to the other ranks
        elif cfg.pretrained and cfg.backbone_lr_factor != 1.0:
            backbone_names = pretrained_parameter_names(model, cfg.backbone, cfg.pretrained)
        else:
            backbone_names = set()
        self.backbone_names = sorted(backbone_names)
        self.net = place_model(model, device, ctx)
        self.model = model
        self.optimizer = build_optimizer(model, cfg, backbone_names)
        if state is None:
            self.scheduler = build_scheduler(self.optimizer, cfg)
            self.best_acc, self.best_epoch = -1.0, 0
        else:
            self.scheduler = restore_optimization(self.optimizer, cfg, state, report=ctx.is_main)
            self.best_acc, self.best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        self.criterion = MCLoss(model.groups, cfg.alpha, cfg.beta, drop=cfg.drop, dis_topk=cfg.dis_topk)
        self.loaders = build_loaders(train_ds, test_ds, cfg, ctx, device)
        restore_random_streams(start, cfg, ctx)
        facts = {
            "dataset_kind": dataset_kind(cfg),
            "class_names": class_names,
            "train_size": len(train_ds),
            "test_size": len(test_ds),
            "world_size": ctx.world_size,
            "device": str(device),
            "model": dict(model.config),
        }
        self.writer = (
            RunWriter(cfg, run_id=start.run_id, record=start.record, start_epoch=start.epoch, facts=facts)
            if ctx.is_main
            else None
        )

    def _epoch(self, epoch: int) -> None:
        """Train, evaluate (sums reduced over ranks), step the schedule, then keep the epoch as one unit."""
        cfg, ctx = self.config, self.ctx
        started = time.perf_counter()
        self.loaders.start_epoch(epoch)
        train_sums = train_one_epoch(
            self.net, self.criterion, self.optimizer, self.loaders.train, cfg,
            epoch=epoch, device=self.device, on_batch_end=self.on_batch_end,
            progress=self._pass(f"epoch {epoch}/{cfg.epochs}"),
        )  # fmt: skip
        ctx.broadcast_buffers(self.model)  # the last step updated each rank's BatchNorm statistics locally
        test_sums = evaluation_sums(
            self.model, self.loaders.test, self.device, amp=cfg.amp, limit_batches=cfg.limit_batches,
            progress=self._pass("eval"),
        )  # fmt: skip
        sums = ctx.all_reduce_sum(torch.cat([train_sums, test_sums]))
        test = summarize_sums(sums[len(train_sums) :], self.model.num_classes)
        lr = self.optimizer.param_groups[0]["lr"]
        row = epoch_row(epoch, lr, sums[: len(train_sums)].cpu().tolist(), test, time.perf_counter() - started)
        self.scheduler.step()
        improved = row["test_acc_fc"] > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = row["test_acc_fc"], epoch
        rng = ctx.gather_objects(capture_rng())
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch, row, self.model)
        with self.guard.critical():  # a Ctrl-C now stops the run once the epoch is kept whole
            self.rows.append(row)
            if self.writer is not None:
                self.writer.write_epoch(self.rows, self.model, improved=improved, resume_state=self._resume_state(rng))
            self.completed = epoch
        if ctx.is_main:
            log.info(_epoch_line(row, cfg.epochs))

    def _pass(self, name: str) -> Progress | None:
        return None if self.progress is None else self.progress(name)

    def _resume_state(self, rng: list[dict]) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "backbone_parameters": self.backbone_names,
            "rng": rng,
            "world_size": self.ctx.world_size,
        }

    def _summary(self, status: str) -> dict:
        return {
            "status": status,
            "out": str(Path(self.config.out)),
            "run_id": self.run_id,
            "epochs_completed": self.completed,
            "epochs": self.config.epochs,
            "best_epoch": self.best_epoch,
            "best_test_acc_fc": self.best_acc if self.best_epoch else None,
            "last": self.rows[-1] if self.rows else None,
            "metrics": list(self.rows),
            "world_size": self.ctx.world_size,
            "rank": self.ctx.rank,
        }


def train(
    config: TrainConfig,
    *,
    on_batch_end: Callable[[int, int], None] | None = None,
    on_epoch_end: Callable[[int, dict, MCModel], None] | None = None,
    progress: PassProgress | None = None,
) -> dict:
    """Train (or, with ``config.resume``, continue) a run; returns a run summary.

    Under torchrun (RANK/WORLD_SIZE set) this joins the process group, wraps the model in DDP and
    only rank 0 writes files and logs. Ctrl-C / SIGTERM stop the run after keeping the last completed
    epoch; the summary's ``status`` is then ``"interrupted"``.

    Args:
        config: a resolved configuration (:func:`~mcloss.training.config.make_config`,
            :func:`~mcloss.training.config.config_for_resume`).
        on_batch_end: called as ``(epoch, batch_index)`` after each optimizer step.
        on_epoch_end: called as ``(epoch, metrics_row, model)`` on every rank before the epoch's files are
            written (the model holds the epoch's final weights).
        progress: progress of each pass, its batches counted (:data:`PassProgress`; rank 0 only).

    Returns:
        ``{"status": "complete"|"interrupted", "out", "run_id", "epochs_completed", "epochs",
        "best_epoch", "best_test_acc_fc", "last", "metrics", "world_size", "rank"}``.
    """
    config.validate()
    check_callback(progress)
    ctx, device = DistContext.setup(config.device)
    try:
        with _hold_run_dir(Path(config.out), not ctx.enabled), InterruptGuard() as guard:
            return _Run(config, ctx, device, guard, on_batch_end, on_epoch_end, progress).run()
    finally:
        ctx.close()


#: The lock file stem of a training run's directory (:mod:`mcloss.core.lock`).
RUN_LOCK_STEM = ".mcloss-train"


@contextlib.contextmanager
def _hold_run_dir(out: Path, hold: bool) -> Iterator[None]:
    """Hold the run directory for this training while the block runs, so that a second training into it is
    refused (one line naming the first's pid) instead of mixing its files in; a directory made for the lock and
    left empty (the run failed before its first epoch) is removed again. Under torchrun (``hold`` False) the
    launcher's ranks share the directory and nothing is held."""
    if not hold:
        yield
        return
    made = not out.exists()
    try:
        lock = acquire_folder(out, stem=RUN_LOCK_STEM, what="training")
    except OSError as exc:  # a file in its place, a folder this process may not write
        raise OutputError(f"out {out}: cannot hold the run directory ({exc})", parameter="out") from None
    try:
        yield
    finally:
        lock.release()
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when nothing was written
