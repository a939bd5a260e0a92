"""`mcloss train`: train an MC-Loss (or CE-only) model with the official recipes; resumable, 1..N processes."""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm

from mcloss import __version__
from mcloss.core.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from mcloss.core.device import autocast, cpu_has_native_bf16, resolve_device
from mcloss.core.loss import RECIPE_WEIGHTS, MCLoss
from mcloss.core.model import MCModel, build_model, load_backbone_weights
from mcloss.core.transforms import NORMALIZATIONS, EvalTransform, TrainTransform
from mcloss.data.datasets import DatasetError, build_datasets, detect_dataset
from mcloss.data.io import atomic_write_json
from mcloss.evaluation.classification import evaluation_sums, summarize_sums
from mcloss.training.distributed import DistContext
from mcloss.training.interrupts import InterruptGuard
from mcloss.training.run_dir import (
    RUN_FORMAT,
    RunDirError,
    capture_rng,
    check_fresh_run_dir,
    load_resume_state,
    plot_curves,
    read_metrics,
    read_run_config,
    restore_rng,
    save_resume_state,
    write_metrics,
)

__all__ = [
    "TrainConfig",
    "TrainError",
    "div_warmup_factor",
    "RECIPES",
    "DATASETS",
    "RESUME_OVERRIDABLE",
    "make_config",
    "config_for_resume",
    "train",
    "main",
]

DATASETS = ("auto", "cub", "imagefolder", "aircraft", "cars", "flowers")
LOSSES = ("mc", "ce", "dis")
SCHEDULES = ("step", "cosine")
OPTIMIZERS = ("sgd", "adamw")

#: The official recipes (GUIDE §1). Explicit settings override them.
RECIPES: dict[str, dict[str, Any]] = {
    "official-scratch": {
        "backbone": None,
        "pretrained": None,
        "xi": 3,
        "alpha": RECIPE_WEIGHTS["official-scratch"][0],
        "beta": RECIPE_WEIGHTS["official-scratch"][1],
        "epochs": 300,
        "batch_size": 32,
        "img_size": 224,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "step",
        "backbone_lr_factor": 1.0,
        "normalization": "half",
    },
    "official-pretrained": {
        "backbone": "resnet50",
        "pretrained": "IMAGENET1K_V1",
        "xi": None,
        "alpha": RECIPE_WEIGHTS["official-pretrained"][0],
        "beta": RECIPE_WEIGHTS["official-pretrained"][1],
        "epochs": 300,
        "batch_size": 64,
        "img_size": 448,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "cosine",
        "backbone_lr_factor": 0.1,
        "normalization": "imagenet",
    },
}

#: Settings a resumed run may change; everything else is fixed by the run's config.json.
RESUME_OVERRIDABLE = ("epochs", "workers", "device", "amp", "cpu_bf16", "limit_batches", "data", "download", "command")


def div_warmup_factor(progress: float, warmup: float) -> float:
    """The share of β in use after ``progress`` epochs (fractional) with a linear warm-up of ``warmup`` epochs."""
    if warmup <= 0:
        return 1.0
    return min(1.0, max(0.0, progress / warmup))


class TrainError(ValueError):
    """A training run cannot start or continue; the message says why."""


@dataclass
class TrainConfig:
    """The resolved configuration of a training run (saved as config.json next to its outputs).

    Build it with :func:`make_config` (recipe defaults + overrides) or :func:`config_for_resume`.
    ``batch_size`` is the total batch per optimizer step, split evenly over DDP ranks.
    ``xi=None`` splits the backbone's native channels unevenly over the classes.
    """

    data: str
    out: str
    backbone: str
    dataset: str = "auto"
    download: bool = False
    pretrained: str | None = None
    xi: int | None = 3
    alpha: float = 1.5
    beta: float = 20.0
    drop: int | None = None
    div_warmup: float = 0.0
    loss: str = "mc"
    epochs: int = 300
    batch_size: int = 32
    img_size: int = 224
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    optimizer: str = "sgd"
    backbone_lr_factor: float = 1.0
    recipe: str = "official-scratch"
    normalization: str = "half"
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    amp: bool = True
    cpu_bf16: bool = False
    limit_batches: int | None = None
    command: str = ""

    def validate(self) -> None:
        """Raise TrainError for out-of-range or inconsistent settings."""
        checks = [
            (self.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}"),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}"),
            (self.normalization in NORMALIZATIONS, f"--normalization must be one of {', '.join(NORMALIZATIONS)}"),
            (self.xi is None or self.xi >= 1, "--xi must be >= 1 (or 'auto')"),
            (self.drop is None or self.drop >= 0, "--drop must be >= 0"),
            (self.div_warmup >= 0, "--div-warmup must be >= 0"),
            (self.alpha >= 0 and self.beta >= 0, "--alpha and --beta must be >= 0"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 2, "--batch-size must be >= 2 (the FC head has BatchNorm)"),
            (self.img_size >= 16, "--img-size must be >= 16"),
            (self.lr > 0, "--lr must be > 0"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.backbone_lr_factor > 0, "--backbone-lr-factor must be > 0"),
            (self.workers >= 0, "--workers must be >= 0"),
            (self.seed >= 0, "--seed must be >= 0"),
            (self.limit_batches is None or self.limit_batches >= 1, "--limit-batches must be >= 1"),
            (bool(self.backbone), "--backbone is required"),
            (bool(self.data), "--data is required"),
            (bool(self.out), "--out is required"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)
        if self.loss == "ce" and (self.alpha or self.beta):
            raise TrainError("--loss ce trains with CE only: alpha and beta must be 0")
        if self.loss == "dis" and self.beta:
            raise TrainError("--loss dis trains with CE + L_dis: beta must be 0")


def _normalize_override(key: str, value: Any) -> Any:
    if key == "xi" and isinstance(value, str):
        if value.lower() in ("auto", "none"):
            return None
        return int(value)
    if key == "pretrained" and isinstance(value, str) and value.lower() in ("", "none"):
        return None
    return value


def make_config(recipe: str = "official-scratch", **overrides: Any) -> TrainConfig:
    """Resolve a configuration: the recipe's values, then ``overrides`` (None means "not given").

    ``loss="ce"`` sets alpha = beta = 0 and ``loss="dis"`` sets beta = 0; giving a conflicting
    non-zero weight is an error. Use ``xi="auto"`` for the uneven split and ``pretrained="none"`` for
    random initialization.
    """
    if recipe not in RECIPES:
        raise TrainError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known - {"recipe"})
    if unknown:
        raise TrainError(f"unknown setting(s): {', '.join(unknown)}")
    given = {k: _normalize_override(k, v) for k, v in overrides.items() if v is not None and k != "recipe"}
    loss = given.get("loss", "mc")
    if loss == "ce":
        if given.get("alpha") or given.get("beta"):
            raise TrainError("--loss ce trains with CE only; do not also give a non-zero --alpha/--beta")
        given["alpha"], given["beta"] = 0.0, 0.0
    elif loss == "dis":
        if given.get("beta"):
            raise TrainError("--loss dis trains with CE + alpha·L_dis; do not also give a non-zero --beta")
        given["beta"] = 0.0
    values = {**RECIPES[recipe], **given, "recipe": recipe}
    if not values.get("backbone"):
        raise TrainError(f"--backbone is required with --recipe {recipe}")
    config = TrainConfig(**values)
    config.validate()
    return config


def config_for_resume(out: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The configuration saved in ``out``/config.json, with the resumable settings overridden.

    Raises:
        RunDirError: ``out`` is missing or not an mcloss run.
        TrainError: an override changes a setting that a resumed run must keep.
    """
    saved = read_run_config(out)["config"]
    values = {f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved}
    for key, value in (overrides or {}).items():
        if value is None or key in ("out", "resume"):
            continue
        if key in RESUME_OVERRIDABLE:
            values[key] = value
            continue
        if key not in saved:
            raise TrainError(f"unknown setting {key!r}")
        value = _normalize_override(key, value)
        if value != saved[key]:
            flag = "--" + key.replace("_", "-")
            raise TrainError(
                f"{flag} {value} differs from the run's {saved[key]} ({out}/config.json); a resumed run keeps its "
                "configuration (only --epochs, --workers, --device, --no-amp, --cpu-bf16, --limit-batches and --data may change)"
            )
    values.update(out=str(out), resume=True)
    config = TrainConfig(**values)
    config.validate()
    return config


# ---------------------------------------------------------------------------------------------- helpers


class _FeaturesAndLogits(nn.Module):
    """One forward giving (F, FC-head logits), so DDP sees a single ``forward``."""

    def __init__(self, model: MCModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        return features, self.model.head_logits(features)


def _derived_seed(*words: int) -> int:
    """A 63-bit seed derived from (seed, epoch, rank, ...)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _pretrained_parameter_names(model: MCModel, backbone: str, pretrained: str) -> set[str]:
    """Names of the trunk parameters that hold the pretrained weights (the rest are new layers)."""
    reference = load_backbone_weights(backbone, pretrained).state_dict()
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
    for tensor in reference.values():
        if tensor.is_floating_point():
            by_shape[tuple(tensor.shape)].append(tensor)
    names = set()
    for name, param in model.features.named_parameters():
        value = param.detach().cpu()
        if any(torch.equal(value, ref) for ref in by_shape.get(tuple(value.shape), ())):
            names.add(f"features.{name}")
    return names


def _param_groups(model: MCModel, config: TrainConfig, backbone_names: set[str]) -> list[dict]:
    """Head and new layers at lr; pretrained backbone at lr × backbone_lr_factor."""
    head, backbone = [], []
    for name, param in model.named_parameters():
        (backbone if name in backbone_names else head).append(param)
    groups = [{"params": head, "lr": config.lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_factor, "name": "backbone"})
    return groups


def _optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the official recipes), or AdamW (faster from scratch on small CPU budgets)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _milestones(epochs: int) -> list[int]:
    """lr / 10 at 50% and 75% of the epochs (150 and 225 of 300, as the official code)."""
    return sorted({max(1, round(0.5 * epochs)), max(1, round(0.75 * epochs))})


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=_milestones(config.epochs), gamma=0.1)


def _versions() -> dict[str, str]:
    return {
        "mcloss": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _synth_description(data: str | Path) -> dict | None:
    """{classes, per_class, size, seed, design} from a synthetic dataset's synth.json, if there is one."""
    path = Path(data) / "synth.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    return {key: meta.get(key) for key in ("classes", "per_class", "size", "seed")} | {"design": meta.get("design", "single")}


def _dataset_kind(config: TrainConfig) -> str:
    """The dataset kind actually used (``auto`` resolved when the layout is recognizable)."""
    if config.dataset != "auto":
        return config.dataset
    try:
        return detect_dataset(config.data)
    except DatasetError:
        return "auto"


def _load_datasets(config: TrainConfig, ctx: DistContext) -> tuple[Any, Any, list[str]]:
    train_tf = TrainTransform.for_recipe(config.recipe, config.img_size, config.normalization)
    eval_tf = EvalTransform.for_recipe(config.recipe, config.img_size, config.normalization)
    download = config.download
    if download and ctx.enabled and not ctx.is_main:
        ctx.barrier()  # rank 0 downloads first
        download = False
    result = build_datasets(config.data, config.dataset, train_tf, eval_tf, download=download)
    if config.download and ctx.enabled and ctx.is_main:
        ctx.barrier()
    train_ds, test_ds, class_names = result
    if len(train_ds) == 0:
        raise TrainError(f"--data {config.data}: the training split is empty")
    if len(test_ds) == 0:
        raise TrainError(f"--data {config.data}: the test split is empty")
    return train_ds, test_ds, list(class_names)


# ------------------------------------------------------------------------------------------------ the run


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
    ) -> None:
        self.config = config
        self.ctx = ctx
        self.device = device
        self.guard = guard
        self.on_batch_end = on_batch_end
        self.on_epoch_end = on_epoch_end
        self.out = Path(config.out)
        self.completed = 0
        self.progress = ctx.is_main and sys.stderr.isatty()

    # -------------------------------------------------------------------------------- preparation

    def _prepare_dir(self) -> dict:
        """Rank 0: check the run directory; on resume, load its state (nothing is unpickled)."""
        cfg = self.config
        if not cfg.resume:
            check_fresh_run_dir(self.out)
            return {"run": None, "state": None, "rows": [], "run_id": uuid.uuid4().hex}
        run = read_run_config(self.out)
        saved = run["config"]
        changed = [
            f.name
            for f in fields(TrainConfig)
            if f.name not in RESUME_OVERRIDABLE and f.name not in ("out", "resume") and saved.get(f.name) != getattr(cfg, f.name)
        ]
        if changed:
            raise TrainError(f"--resume: {self.out}: the configuration differs from the saved run in {', '.join(changed)}")
        state = load_resume_state(self.out / "resume.pt")
        if state.get("run_id") != run.get("run_id"):
            raise RunDirError(f"--resume: {self.out}/resume.pt belongs to another run than {self.out}/config.json")
        epoch = int(state["epoch"])
        last = self.out / "last.safetensors"
        if not last.is_file():
            raise RunDirError(f"--resume: {self.out} has no last.safetensors (the model weights to resume from)")
        card = read_metadata(last)["card"]
        if card.get("run_id") != run.get("run_id"):
            raise RunDirError(f"--resume: {last} belongs to another run than {self.out}/config.json")
        if card.get("epoch") != epoch:
            raise RunDirError(
                f"--resume: {last} is from epoch {card.get('epoch')} but resume.pt from epoch {epoch} "
                "(the run was killed while saving); cannot resume exactly"
            )
        rows = read_metrics(self.out / "metrics.csv", upto=epoch)
        return {"run": run, "state": state, "rows": rows, "run_id": run["run_id"]}

    def _load_last_weights(self, model: MCModel) -> None:
        path = self.out / "last.safetensors"
        last = load_checkpoint(path)
        if last.config.get("groups") != model.groups or last.class_names != model.class_names:
            raise RunDirError(f"--resume: {path} does not match the run's model (groups or class names differ)")
        model.load_state_dict(last.state_dict())

    # -------------------------------------------------------------------------------------- main

    def run(self) -> dict:
        cfg, ctx, device = self.config, self.ctx, self.device
        prep: dict | Exception | None = None
        if ctx.is_main:
            try:
                prep = self._prepare_dir()
            except (RunDirError, TrainError, CheckpointError) as exc:
                prep = exc
        prep = ctx.broadcast_object(prep)
        if isinstance(prep, Exception):
            raise prep
        run, state, rows = prep["run"], prep["state"], prep["rows"]
        self.rows = list(rows)
        self.run_id = prep["run_id"]
        self.run_record = run

        if cfg.cpu_bf16 and device.type == "cpu" and ctx.is_main and not cpu_has_native_bf16():
            print(
                "mcloss train: warning: --cpu-bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16): "
                "bf16 is emulated and slower than fp32",
                file=sys.stderr,
            )
        _seed_all(cfg.seed)
        train_ds, test_ds, class_names = _load_datasets(cfg, ctx)
        if run is not None and run.get("class_names") != class_names:
            raise TrainError(f"--data {cfg.data}: its classes differ from the run's ({self.out}/config.json)")
        self.class_names = class_names
        self.dataset_kind = _dataset_kind(cfg)
        self.train_size, self.test_size = len(train_ds), len(test_ds)

        eval_tf = EvalTransform.for_recipe(cfg.recipe, cfg.img_size, cfg.normalization)
        try:
            model = build_model(
                cfg.backbone,
                len(class_names),
                xi=cfg.xi,
                class_names=class_names,
                img_size=cfg.img_size,
                pretrained=None if state is not None else cfg.pretrained,
                transform=eval_tf,
            )
        except (RuntimeError, ValueError, FileNotFoundError) as exc:  # unknown backbone/weights, offline, too small
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TrainError(f"--backbone {cfg.backbone} (--pretrained {cfg.pretrained}, --img-size {cfg.img_size}): {first}") from None
        if state is not None:
            backbone_names = set(state["backbone_parameters"])
            if ctx.is_main:
                self._load_last_weights(model)
        elif cfg.pretrained and cfg.backbone_lr_factor != 1.0:
            backbone_names = _pretrained_parameter_names(model, cfg.backbone, cfg.pretrained)
        else:
            backbone_names = set()
        self.backbone_names = sorted(backbone_names)

        model.to(device)
        model.to(memory_format=torch.channels_last)  # faster convolutions on CUDA and on oneDNN CPUs alike
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.model = model
        step = _FeaturesAndLogits(model)
        if ctx.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.net: nn.Module = DistributedDataParallel(step, device_ids=ids)
        else:
            self.net = step

        self.optimizer = _optimizer(_param_groups(model, cfg, backbone_names), cfg)
        self.best_acc, self.best_epoch, start = -1.0, 0, 0
        if state is not None:
            start = int(state["epoch"])
            self.optimizer.load_state_dict(state["optimizer"])
            if int(state["epochs"]) == cfg.epochs:
                self.scheduler = _scheduler(self.optimizer, cfg)
                self.scheduler.load_state_dict(state["scheduler"])
            else:
                for group in self.optimizer.param_groups:
                    group["lr"] = group["initial_lr"]
                self.scheduler = _scheduler(self.optimizer, cfg)
                with warnings.catch_warnings():  # fast-forwarding steps the scheduler without optimizer steps
                    warnings.simplefilter("ignore", UserWarning)
                    for _ in range(start):
                        self.scheduler.step()
                if ctx.is_main:
                    print(
                        f"note: the schedule now spans {cfg.epochs} epochs instead of {state['epochs']}; "
                        f"epoch {start + 1} uses lr {self.optimizer.param_groups[0]['lr']:.4g}",
                        file=sys.stderr,
                    )
            self.best_acc, self.best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        else:
            self.scheduler = _scheduler(self.optimizer, cfg)

        self.criterion = MCLoss(model.groups, cfg.alpha, cfg.beta, drop=cfg.drop)
        self._make_loaders(train_ds, test_ds)

        if ctx.enabled and state is None:
            _seed_all(_derived_seed(cfg.seed, ctx.rank))  # distinct augmentation and masks per rank
        if state is not None:
            rng = state["rng"]
            if len(rng) == ctx.world_size:
                restore_rng(rng[ctx.rank])
            else:
                _seed_all(_derived_seed(cfg.seed, start, ctx.rank))
                if ctx.is_main:
                    print(
                        f"note: resumed with {ctx.world_size} process(es) instead of {len(rng)}; "
                        "random streams are reseeded",
                        file=sys.stderr,
                    )
        self.completed = start
        self.session_start = start
        if start >= cfg.epochs:
            if ctx.is_main:
                print(f"{self.out}: already trained {start} of {cfg.epochs} epochs; nothing to do")
            return self._summary("complete")
        try:
            for epoch in range(start + 1, cfg.epochs + 1):
                self._epoch(epoch)
        except KeyboardInterrupt:
            return self._summary("interrupted")
        return self._summary("complete")

    def _make_loaders(self, train_ds: Any, test_ds: Any) -> None:
        cfg, ctx = self.config, self.ctx
        if cfg.batch_size % ctx.world_size:
            raise TrainError(f"--batch-size {cfg.batch_size} does not split evenly over {ctx.world_size} processes")
        per_rank = cfg.batch_size // ctx.world_size
        self.loader_generator = torch.Generator()
        if ctx.enabled:
            self.train_sampler: Any = DistributedSampler(
                train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed
            )
            test_part = Subset(test_ds, range(ctx.rank, len(test_ds), ctx.world_size))
        else:
            self.train_sampler = RandomSampler(train_ds, generator=self.loader_generator)
            test_part = test_ds
        per_rank_samples = len(self.train_sampler)
        if per_rank_samples < 2:
            raise TrainError(f"--data {cfg.data}: too few training images for {ctx.world_size} process(es)")
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(
            train_ds,
            batch_size=per_rank,
            sampler=self.train_sampler,
            num_workers=cfg.workers,
            pin_memory=pin,
            drop_last=per_rank_samples % per_rank == 1,  # a batch of one breaks the head's BatchNorm
            generator=self.loader_generator,
        )
        self.test_loader = DataLoader(test_part, batch_size=per_rank, shuffle=False, num_workers=cfg.workers, pin_memory=pin)

    def _train_epoch(self, epoch: int) -> torch.Tensor:
        cfg, device = self.config, self.device
        self.loader_generator.manual_seed(_derived_seed(cfg.seed, epoch, self.ctx.rank))
        if self.ctx.enabled:
            self.train_sampler.set_epoch(epoch)
        self.net.train()
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        total = len(self.train_loader) if cfg.limit_batches is None else min(cfg.limit_batches, len(self.train_loader))
        bar = tqdm(self.train_loader, total=total, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not self.progress)
        for index, (images, targets) in enumerate(bar):
            if cfg.limit_batches is not None and index >= cfg.limit_batches:
                break
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            with autocast(device, cfg.amp, cpu=cfg.cpu_bf16):
                features, logits = self.net(images)
            logits = logits.float()
            self.criterion.beta = cfg.beta * div_warmup_factor(epoch - 1 + index / total, cfg.div_warmup)
            out = self.criterion(logits, features, targets)
            self.optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            self.optimizer.step()
            n = targets.shape[0]
            correct = (logits.detach().argmax(1) == targets).sum()
            parts = torch.stack([out.total.detach(), out.ce.detach(), out.dis.detach(), out.div.detach()]).double() * n
            sums += torch.cat([parts, torch.stack([correct.double(), torch.tensor(float(n), device=device, dtype=torch.float64)])])
            if self.on_batch_end is not None:
                self.on_batch_end(epoch, index)
        bar.close()
        return sums

    def _epoch(self, epoch: int) -> None:
        cfg, ctx = self.config, self.ctx
        started = time.perf_counter()
        train_sums = self._train_epoch(epoch)
        ctx.broadcast_buffers(self.model)  # the last step updated each rank's BatchNorm statistics locally
        test_sums = evaluation_sums(
            self.model, self.test_loader, self.device, amp=cfg.amp, limit_batches=cfg.limit_batches, progress=self.progress
        )
        sums = ctx.all_reduce_sum(torch.cat([train_sums, test_sums]))
        train_vals = sums[:6].cpu().tolist()
        n = train_vals[5]
        if n == 0:
            raise TrainError(f"epoch {epoch}: no training batch was run")
        if not all(np.isfinite(train_vals)):
            raise TrainError(f"epoch {epoch}: the training loss is not finite; try a lower --lr (nothing was saved for this epoch)")
        test = summarize_sums(sums[6:], self.model.num_classes)
        lr = self.optimizer.param_groups[0]["lr"]
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_vals[0] / n,
            "train_ce": train_vals[1] / n,
            "train_dis": train_vals[2] / n,
            "train_div": train_vals[3] / n,
            "train_acc": train_vals[4] / n,
            "test_loss": test["loss"],
            "test_acc_fc": test["fc_top1"],
            "test_acc_mc": test["mc_top1"],
            "time_s": time.perf_counter() - started,
        }
        self.scheduler.step()
        improved = row["test_acc_fc"] > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = row["test_acc_fc"], epoch
        rng = ctx.gather_objects(capture_rng())
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch, row, self.model)
        if ctx.is_main:
            with self.guard.critical():
                self._write_epoch(row, improved, rng)
                self.completed = epoch
            print(
                f"epoch {epoch}/{cfg.epochs}  lr {lr:.4g}  loss {row['train_loss']:.4f} "
                f"(ce {row['train_ce']:.4f} dis {row['train_dis']:.4f} div {row['train_div']:.4f})  "
                f"train {100 * row['train_acc']:.1f}%  test FC {100 * row['test_acc_fc']:.1f}% "
                f"MC {100 * row['test_acc_mc']:.1f}%  {row['time_s']:.1f}s",
                flush=True,
            )
        else:
            self.rows.append(row)
            self.completed = epoch

    # ------------------------------------------------------------------------------------- outputs

    def _run_record(self) -> dict:
        cfg = self.config
        if self.run_record is None:
            self.run_record = {
                "format": RUN_FORMAT,
                "run_id": self.run_id,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": cfg.command,
                "config": asdict(cfg),
                "data_root": str(Path(cfg.data).resolve()),
                "dataset_kind": self.dataset_kind,
                "synth": _synth_description(cfg.data),
                "class_names": self.class_names,
                "train_size": self.train_size,
                "test_size": self.test_size,
                "world_size": self.ctx.world_size,
                "device": str(self.device),
                "model": dict(self.model.config),
                "versions": _versions(),
                "resumes": [],
            }
        elif self.completed == self.session_start:
            self.run_record["config"] = asdict(cfg)
            self.run_record["resumes"].append(
                {
                    "command": cfg.command,
                    "from_epoch": self.session_start,
                    "epochs": cfg.epochs,
                    "world_size": self.ctx.world_size,
                    "device": str(self.device),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": _versions(),
                }
            )
        return self.run_record

    def _card(self, epoch: int, row: dict, which: str) -> dict:
        cfg = self.config
        card = {
            "run_id": self.run_id,
            "checkpoint": which,
            "data_root": str(Path(cfg.data).resolve()),
            "dataset_kind": self.dataset_kind,
            "seed": cfg.seed,
            "command": cfg.command,
            "epoch": epoch,
            "epochs": cfg.epochs,
            "recipe": cfg.recipe,
            "loss": cfg.loss,
            "alpha": cfg.alpha,
            "beta": cfg.beta,
            "div_warmup": cfg.div_warmup,
            "metrics": dict(row),
        }
        synth = _synth_description(cfg.data)
        if synth is not None:
            card["dataset"] = synth
        return card

    def _write_epoch(self, row: dict, improved: bool, rng: list[dict]) -> None:
        """Write every file of a completed epoch (rank 0, inside an interrupt-deferred section)."""
        epoch = row["epoch"]
        if epoch == self.session_start + 1:
            atomic_write_json(self.out / "config.json", self._run_record())
        self.rows.append(row)
        write_metrics(self.out / "metrics.csv", self.rows)
        plot_curves(self.rows, self.out / "curves.png", title=f"{self.config.backbone} · loss {self.config.loss} · {self.out.name}")
        if improved:
            self.model.card = self._card(epoch, row, "best")
            save_checkpoint(self.model, self.out / "best.safetensors")
        self.model.card = self._card(epoch, row, "last")
        save_checkpoint(self.model, self.out / "last.safetensors")
        save_resume_state(
            self.out / "resume.pt",
            {
                "run_id": self.run_id,
                "epoch": epoch,
                "epochs": self.config.epochs,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "best_acc": self.best_acc,
                "best_epoch": self.best_epoch,
                "backbone_parameters": self.backbone_names,
                "rng": rng,
                "world_size": self.ctx.world_size,
            },
        )

    def _summary(self, status: str) -> dict:
        last = self.rows[-1] if self.rows else None
        return {
            "status": status,
            "out": str(self.out),
            "run_id": self.run_id,
            "epochs_completed": self.completed,
            "epochs": self.config.epochs,
            "best_epoch": self.best_epoch,
            "best_test_acc_fc": self.best_acc if self.best_epoch else None,
            "last": last,
            "metrics": list(self.rows),
            "world_size": self.ctx.world_size,
            "rank": self.ctx.rank,
        }


def train(
    config: TrainConfig,
    *,
    on_batch_end: Callable[[int, int], None] | None = None,
    on_epoch_end: Callable[[int, dict, MCModel], None] | None = None,
) -> dict:
    """Train (or, with ``config.resume``, continue) a run; returns a run summary.

    Under torchrun (RANK/WORLD_SIZE set) this joins the process group, wraps the model in DDP and
    only rank 0 writes files. Ctrl-C / SIGTERM stop the run after keeping the last completed epoch;
    the summary's ``status`` is then ``"interrupted"``.

    Args:
        config: a resolved configuration (:func:`make_config`, :func:`config_for_resume`).
        on_batch_end: called as ``(epoch, batch_index)`` after each optimizer step.
        on_epoch_end: called as ``(epoch, metrics_row, model)`` on every rank before the epoch's files are
            written (the model holds the epoch's final weights).

    Returns:
        ``{"status": "complete"|"interrupted", "out", "run_id", "epochs_completed", "epochs",
        "best_epoch", "best_test_acc_fc", "last", "metrics", "world_size", "rank"}``.
    """
    config.validate()
    ctx, device = DistContext.setup(config.device)
    try:
        with InterruptGuard() as guard:
            return _Run(config, ctx, device, guard, on_batch_end, on_epoch_end).run()
    finally:
        ctx.close()


# ----------------------------------------------------------------------------------------------------- CLI


def _xi(text: str) -> int | str:
    if text.lower() in ("auto", "none"):
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcloss train",
        description="Train an MC-Loss (or CE-only) model. Unset options take the --recipe's values (GUIDE §1).",
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", help="dataset root (required unless --resume)")
    g.add_argument("--dataset", choices=DATASETS, help="dataset layout (default auto)")
    g.add_argument("--download", action="store_const", const=True, help="download torchvision datasets that support it")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", help="vgg16, resnet18, resnet50, ... (official-pretrained: resnet50)")
    g.add_argument("--pretrained", help="torchvision weights name (IMAGENET1K_V1), a local weights file, or none")
    g.add_argument("--xi", type=_xi, help="channels per class, or 'auto' for the uneven split of the native width")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=LOSSES, help="mc: CE + α·L_dis + β·L_div (default); ce: CE only; dis: CE + α·L_dis")
    g.add_argument("--alpha", type=float, help="weight of L_dis (scratch 1.5, pretrained 0.0005)")
    g.add_argument("--beta", type=float, help="weight of L_div (scratch 20, pretrained 0.005)")
    g.add_argument(
        "--div-warmup", type=float,
        help="ramp β linearly from 0 over the first N epochs (default 0: the official constant β)",
    )
    g.add_argument("--drop", type=int, help="channels masked per group in L_dis (default: 1 of 3, 4 of 10/11)")
    g = p.add_argument_group("optimization")
    g.add_argument("--recipe", choices=list(RECIPES), help="official-scratch (default) or official-pretrained (default with --pretrained)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="total batch per step (split over DDP ranks)")
    g.add_argument("--img-size", type=int, help="network input side S")
    g.add_argument("--lr", type=float, help="learning rate of the head and new layers")
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=SCHEDULES, help="step: /10 at 50%% and 75%% of the epochs; cosine")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="sgd (official, with --momentum) or adamw")
    g.add_argument("--backbone-lr-factor", type=float, help="pretrained backbone lr = lr × this (pretrained recipe 0.1)")
    g.add_argument("--normalization", choices=list(NORMALIZATIONS), help="half (0.5/0.5) or imagenet")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (default 2)")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--device", help="auto, cpu or cuda (default auto)")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    g.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="no bf16 autocast on CUDA")
    g.add_argument(
        "--cpu-bf16", action=argparse.BooleanOptionalAction, default=None,
        help="bf16 autocast of the training step on the CPU too: about 2x faster on CPUs with native bf16 "
        "(AVX512-BF16, AMX), slower elsewhere; evaluation stays fp32 (default off)",
    )
    g.add_argument("--limit-batches", type=int, help="at most N train and N test batches per epoch (for tests)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mcloss train``; returns 0 when done, 2 on bad input, 130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("out", "resume", "recipe")}
    given["command"] = shlex.join(["mcloss", "train", *argv])
    try:
        if args.resume:
            if args.recipe is not None:
                given["recipe"] = args.recipe
            config = config_for_resume(args.out, given)
        else:
            if "data" not in given:
                parser.error("--data is required (unless --resume)")
            pretrained = given.get("pretrained")
            recipe = args.recipe or (
                "official-pretrained" if pretrained and str(pretrained).lower() != "none" else "official-scratch"
            )
            config = make_config(recipe, out=args.out, **given)
        try:
            resolve_device(config.device)
        except RuntimeError as exc:  # CUDA asked for but absent
            raise TrainError(str(exc)) from None
        summary = train(config)
    except KeyboardInterrupt:
        print("\nmcloss train: interrupted before an epoch completed; nothing was written", file=sys.stderr)
        return 130
    except (TrainError, RunDirError) as exc:
        print(f"mcloss train: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"mcloss train: {first}", file=sys.stderr)
        return 2
    if summary["status"] == "interrupted":
        if summary["rank"] == 0:
            done = summary["epochs_completed"]
            if done:
                message = (
                    f"interrupted; kept epoch {done} in {summary['out']}. "
                    f"Continue with: mcloss train --out {shlex.quote(summary['out'])} --resume"
                )
            else:
                message = "interrupted before the first epoch completed; nothing was saved"
            print(f"\nmcloss train: {message}", file=sys.stderr)
        return 130
    if summary["rank"] == 0 and summary["best_epoch"]:
        print(f"best test FC top-1 {100 * summary['best_test_acc_fc']:.2f}% at epoch {summary['best_epoch']}; run in {summary['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
