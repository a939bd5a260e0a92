"""What a training session is built from: seeds, datasets, the model, its optimizer and schedule, the loaders."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

from mcloss.core.device import cpu_has_native_bf16
from mcloss.core.distributed import DistContext
from mcloss.core.errors import MclossError, first_line
from mcloss.core.loss import trained_pool_share
from mcloss.core.model import MCModel, build_model, load_backbone_weights
from mcloss.core.transforms import EvalTransform, TrainTransform
from mcloss.data.datasets import DatasetError, build_datasets, detect_dataset
from mcloss.training.config import TrainConfig, TrainError

__all__ = [
    "FeaturesAndLogits",
    "Loaders",
    "derived_seed",
    "seed_all",
    "warn_if_bf16_is_emulated",
    "load_datasets",
    "dataset_kind",
    "make_model",
    "pretrained_parameter_names",
    "place_model",
    "param_groups",
    "build_optimizer",
    "milestones",
    "build_scheduler",
    "build_loaders",
]

log = logging.getLogger(__name__)


class FeaturesAndLogits(nn.Module):
    """One forward giving (F, FC-head logits), so DDP sees a single ``forward``."""

    def __init__(self, model: MCModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        return features, self.model.head_logits(features)


# ------------------------------------------------------------------------------------------------- seeds


def derived_seed(*words: int) -> int:
    """A 63-bit seed derived from (seed, epoch, rank, ...)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_all(seed: int) -> None:
    """Seed the python, numpy and torch random streams."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warn_if_bf16_is_emulated(config: TrainConfig, device: torch.device) -> None:
    """Warn (logging) when ``cpu_bf16`` would run on a CPU that only emulates bf16."""
    if config.cpu_bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning(
            "cpu_bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16): bf16 is emulated and slower than fp32"
        )


# ---------------------------------------------------------------------------------------------- datasets


def load_datasets(config: TrainConfig, ctx: DistContext) -> tuple[Any, Any, list[str]]:
    """The (train, test, class names) of ``config.data``; under DDP rank 0 downloads first."""
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
        raise TrainError(f"data {config.data}: the training split is empty", parameter="data")
    if len(test_ds) == 0:
        raise TrainError(f"data {config.data}: the test split is empty", parameter="data")
    labels = getattr(train_ds, "labels", None) or getattr(train_ds, "targets", None)  # CUB, ImageFolder: read for free
    unseen = sorted(set(range(len(class_names))) - set(labels or range(len(class_names))))
    if unseen:  # a class the model could never learn (all its images marked test, or none at all)
        raise TrainError(
            f"data {config.data}: class {class_names[unseen[0]]!r} has no training image ({len(unseen)} such classes)",
            parameter="data",
        )
    return train_ds, test_ds, list(class_names)


def dataset_kind(config: TrainConfig) -> str:
    """The dataset kind actually used (``auto`` resolved when the layout is recognizable)."""
    if config.dataset != "auto":
        return config.dataset
    try:
        return detect_dataset(config.data)
    except DatasetError:
        return "auto"


# ------------------------------------------------------------------------------------------------- model


def make_model(config: TrainConfig, class_names: list[str], *, pretrained: bool = True) -> MCModel:
    """The run's model; ``pretrained=False`` skips loading weights (a resumed run loads its own).

    Raises:
        TrainError: unknown backbone or weights, weights unavailable offline, or an input too small.
    """
    eval_tf = EvalTransform.for_recipe(config.recipe, config.img_size, config.normalization)
    try:
        return build_model(
            config.backbone,
            len(class_names),
            xi=config.xi,
            class_names=class_names,
            img_size=config.img_size,
            pretrained=config.pretrained if pretrained else None,
            transform=eval_tf,
            last_stage=config.last_stage,
            mc_pool_share=trained_pool_share(config.dis_topk, config.alpha),
        )
    except (MclossError, RuntimeError, ValueError, FileNotFoundError) as exc:  # ours, or torchvision's (unknown backbone)
        raise TrainError(
            f"backbone {config.backbone} (pretrained {config.pretrained}, img_size {config.img_size}): {first_line(exc)}",
            parameter=("backbone", "pretrained", "img_size"),
        ) from None


def pretrained_parameter_names(model: MCModel, backbone: str, pretrained: str) -> set[str]:
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


def place_model(model: MCModel, device: torch.device, ctx: DistContext) -> nn.Module:
    """Move ``model`` to ``device`` (channels-last) and return the module to train: DDP-wrapped under torchrun."""
    model.to(device)
    model.to(memory_format=torch.channels_last)  # faster convolutions on CUDA and on oneDNN CPUs alike
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    step = FeaturesAndLogits(model)
    if not ctx.enabled:
        return step
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=ids)


# ---------------------------------------------------------------------------------- optimizer and schedule


def param_groups(model: MCModel, config: TrainConfig, backbone_names: set[str]) -> list[dict]:
    """Head and new layers at lr; pretrained backbone at lr × backbone_lr_factor."""
    head, backbone = [], []
    for name, param in model.named_parameters():
        (backbone if name in backbone_names else head).append(param)
    groups = [{"params": head, "lr": config.lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_factor, "name": "backbone"})
    return groups


def build_optimizer(model: MCModel, config: TrainConfig, backbone_names: set[str]) -> torch.optim.Optimizer:
    """SGD with momentum (the official recipes), or AdamW (faster from scratch on small CPU budgets)."""
    groups = param_groups(model, config, backbone_names)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def milestones(epochs: int) -> list[int]:
    """lr / 10 at 50% and 75% of the epochs (150 and 225 of 300, as the official code)."""
    return sorted({max(1, round(0.5 * epochs)), max(1, round(0.75 * epochs))})


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch lr schedule: cosine over the epochs, or step (:func:`milestones`)."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones(config.epochs), gamma=0.1)


# ------------------------------------------------------------------------------------------------ loaders


@dataclass
class Loaders:
    """This rank's train and test loaders; :meth:`start_epoch` fixes an epoch's shuffle and workers' seeds."""

    train: DataLoader
    test: DataLoader
    sampler: Any
    generator: torch.Generator
    seed: int
    rank: int

    def start_epoch(self, epoch: int) -> None:
        """Make the epoch's data order a function of (seed, epoch, rank) only."""
        self.generator.manual_seed(derived_seed(self.seed, epoch, self.rank))
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)


def build_loaders(train_ds: Any, test_ds: Any, config: TrainConfig, ctx: DistContext, device: torch.device) -> Loaders:
    """Loaders of ``batch_size / world_size`` samples per rank; each rank tests a disjoint share.

    Raises:
        TrainError: the batch does not split over the ranks, or too few training images.
    """
    if config.batch_size % ctx.world_size:
        raise TrainError(
            f"batch_size {config.batch_size} does not split evenly over {ctx.world_size} processes", parameter="batch_size"
        )
    per_rank = config.batch_size // ctx.world_size
    generator = torch.Generator()
    if ctx.enabled:
        sampler: Any = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed)
        test_part = Subset(test_ds, range(ctx.rank, len(test_ds), ctx.world_size))
    else:
        sampler = RandomSampler(train_ds, generator=generator)
        test_part = test_ds
    per_rank_samples = len(sampler)
    if per_rank_samples < 2:
        raise TrainError(f"data {config.data}: too few training images for {ctx.world_size} process(es)", parameter="data")
    pin = device.type == "cuda"
    train = DataLoader(
        train_ds,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=config.workers,
        pin_memory=pin,
        drop_last=per_rank_samples % per_rank == 1,  # a batch of one breaks the head's BatchNorm
        generator=generator,
    )
    test = DataLoader(test_part, batch_size=per_rank, shuffle=False, num_workers=config.workers, pin_memory=pin)
    return Loaders(train, test, sampler, generator, config.seed, ctx.rank)
