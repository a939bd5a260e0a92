"""The configuration of a training run: the official recipes, their overrides, and what a resume may change."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mcloss.core.errors import MclossError
from mcloss.core.loss import RECIPE_WEIGHTS
from mcloss.core.transforms import NORMALIZATIONS
from mcloss.data.datasets import DATASET_KINDS
from mcloss.training.run_dir import read_run_config

__all__ = [
    "TrainConfig",
    "TrainError",
    "RECIPES",
    "LOSSES",
    "SCHEDULES",
    "OPTIMIZERS",
    "RESUME_OVERRIDABLE",
    "make_config",
    "config_for_resume",
]

LOSSES = ("mc", "ce", "dis")
SCHEDULES = ("step", "cosine")
OPTIMIZERS = ("sgd", "adamw")

#: The official recipes (README.md, "The method, as computed here" and "Training"): the official
#: from-scratch recipe and the official pretrained ResNet-50 recipe. Explicit settings override them.
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

#: Settings a user may change when resuming a run; everything else is fixed by the run's config.json.
RESUME_CHANGEABLE = ("epochs", "workers", "device", "amp", "cpu_bf16", "limit_batches", "data")
#: What a resume takes from the new call rather than from config.json: those, and how it was called.
RESUME_OVERRIDABLE = (*RESUME_CHANGEABLE, "download", "command")


class TrainError(MclossError, ValueError):
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
    last_stage: int | None = None
    alpha: float = 1.5
    beta: float = 20.0
    drop: int | None = None
    div_warmup: float = 0.0
    dis_topk: float = 1.0
    dis_topk_from: float | None = None
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
        """Raise TrainError for out-of-range or inconsistent settings (naming them)."""
        for ok, names, message in self._checks():
            if not ok:
                raise TrainError(message, parameter=names)
        if self.loss == "ce" and (self.alpha or self.beta):
            raise TrainError("loss ce trains with CE only: alpha and beta must be 0", parameter="loss")
        if self.loss == "dis" and self.beta:
            raise TrainError("loss dis trains with CE + L_dis: beta must be 0", parameter="loss")

    def _checks(self) -> list[tuple[bool, str | tuple[str, ...], str]]:
        """(holds, the settings it is about, what it requires), in the order they are checked."""
        return [
            (self.dataset in DATASET_KINDS, "dataset", f"dataset must be one of {', '.join(DATASET_KINDS)}"),
            (self.loss in LOSSES, "loss", f"loss must be one of {', '.join(LOSSES)}"),
            (self.schedule in SCHEDULES, "schedule", f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.recipe in RECIPES, "recipe", f"recipe must be one of {', '.join(RECIPES)}"),
            (self.normalization in NORMALIZATIONS, "normalization", f"normalization must be one of {', '.join(NORMALIZATIONS)}"),
            (self.xi is None or self.xi >= 1, "xi", "xi must be >= 1 (or 'auto')"),
            (self.last_stage in (None, 2, 3, 4), "last_stage", "last_stage must be 2, 3 or 4"),
            (self.drop is None or self.drop >= 0, "drop", "drop must be >= 0"),
            (self.div_warmup >= 0, "div_warmup", "div_warmup must be >= 0"),
            (0 < self.dis_topk <= 1, "dis_topk", "dis_topk must be in (0, 1]"),
            (
                self.dis_topk_from is None or self.dis_topk <= self.dis_topk_from <= 1,
                ("dis_topk_from", "dis_topk"),
                "dis_topk_from must be in [dis_topk, 1]",
            ),
            (self.alpha >= 0 and self.beta >= 0, ("alpha", "beta"), "alpha and beta must be >= 0"),
            (self.epochs >= 1, "epochs", "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size", "batch_size must be >= 2 (the FC head has BatchNorm)"),
            (self.img_size >= 16, "img_size", "img_size must be >= 16"),
            (self.lr > 0, "lr", "lr must be > 0"),
            (0 <= self.momentum < 1, "momentum", "momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", "weight_decay must be >= 0"),
            (self.backbone_lr_factor > 0, "backbone_lr_factor", "backbone_lr_factor must be > 0"),
            (self.workers >= 0, "workers", "workers must be >= 0"),
            (self.seed >= 0, "seed", "seed must be >= 0"),
            (self.limit_batches is None or self.limit_batches >= 1, "limit_batches", "limit_batches must be >= 1"),
            (bool(self.backbone), "backbone", "backbone is required"),
            (bool(self.data), "data", "data is required"),
            (bool(self.out), "out", "out is required"),
        ]


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
        raise TrainError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}", parameter="recipe")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known - {"recipe"})
    if unknown:
        raise TrainError(f"unknown setting(s): {', '.join(unknown)}")
    given = {k: _normalize_override(k, v) for k, v in overrides.items() if v is not None and k != "recipe"}
    loss = given.get("loss", "mc")
    if loss == "ce":
        if given.get("alpha") or given.get("beta"):
            raise TrainError(
                "loss ce trains with CE only; alpha and beta must then be 0 or not given", parameter=("loss", "alpha", "beta")
            )
        given["alpha"], given["beta"] = 0.0, 0.0
    elif loss == "dis":
        if given.get("beta"):
            raise TrainError(
                "loss dis trains with CE + alpha·L_dis; do not also give a non-zero beta", parameter=("loss", "beta")
            )
        given["beta"] = 0.0
    values = {**RECIPES[recipe], **given, "recipe": recipe}
    if not values.get("backbone"):
        raise TrainError(f"backbone is required with recipe {recipe}", parameter=("backbone", "recipe"))
    config = TrainConfig(**values)
    config.validate()
    return config


def config_for_resume(out: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The configuration saved in ``out``/config.json, with the resumable settings overridden.

    Raises:
        RunDirError: ``out`` is missing or not an mcloss run.
        TrainError: an override changes a setting that a resumed run must keep.
    """
    run = read_run_config(out)
    saved = run["config"]
    values = {f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved}
    if isinstance(run.get("data_root"), str) and not Path(str(saved.get("data", ""))).is_absolute():
        values["data"] = run["data_root"]  # typed relative to where the run started: resumable from anywhere
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
            may_change = RESUME_CHANGEABLE
            raise TrainError(
                f"{key} {value} differs from the run's {saved[key]} ({out}/config.json); a resumed run keeps its "
                f"configuration (only {', '.join(may_change[:-1])} and {may_change[-1]} may change)",
                parameter=(key, *may_change),
            )
    values.update(out=str(out), resume=True)
    config = TrainConfig(**values)
    config.validate()
    return config
