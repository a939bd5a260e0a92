"""mcloss: train and explain fine-grained classifiers with the Mutual-Channel Loss.

The public API is imported lazily: ``import mcloss`` is cheap, and ``mcloss.explain`` (say) loads only
the modules it needs.

Packages, in layers (each imports only its own and those above it in this list):
    core: channel groups, the loss, the model, checkpoints, transforms, file primitives, devices, errors.
    metrics: pure metric math (localization, defining-part mass).
    data: safe image I/O, dataset readers (CUB, ImageFolder, torchvision), input files, ``synth``, the
        parts that define each class (``defining``).
    explainability: map kinds, explanations (channel maps, CCMP, Grad-CAM), rendering, export, benchmark.
    evaluation: classification accuracy, ``parts``, faithfulness, sanity checks.
    interop: other projects' checkpoints in (``mcloss import``), maps out to Captum and Quantus.
    training: configuration, the epoch loop, resume, run-directory writer, DDP, interrupts.
    cli: the ``mcloss`` command (the only place that parses arguments, prints or draws progress bars).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mcloss.core.version import __version__

#: public name → module that defines it
_EXPORTS: dict[str, str] = {
    # core
    "MCModel": "mcloss.core.model",
    "FCHead": "mcloss.core.model",
    "HeadSpec": "mcloss.core.model",
    "build_model": "mcloss.core.model",
    "MCLoss": "mcloss.core.loss",
    "MCLossOutput": "mcloss.core.loss",
    "ccmp": "mcloss.core.loss",
    "draw_channel_mask": "mcloss.core.loss",
    "mutual_channel_loss": "mcloss.core.loss",
    "normalize_groups": "mcloss.core.groups",
    "split_channels": "mcloss.core.groups",
    "CheckpointError": "mcloss.core.checkpoint",
    "MclossError": "mcloss.core.errors",
    "ParameterError": "mcloss.core.errors",
    "OutputError": "mcloss.core.errors",
    "FolderBusyError": "mcloss.core.errors",
    "UnknownClassError": "mcloss.core.errors",
    "OutOfRangeError": "mcloss.core.errors",
    "default_checkpoint": "mcloss.core.checkpoint",
    "load_checkpoint": "mcloss.core.checkpoint",
    "read_metadata": "mcloss.core.checkpoint",
    "save_checkpoint": "mcloss.core.checkpoint",
    "EvalTransform": "mcloss.core.transforms",
    "Geometry": "mcloss.core.transforms",
    "TrainTransform": "mcloss.core.transforms",
    "resolve_device": "mcloss.core.device",
    # interop
    "import_model": "mcloss.interop.sources",
    "import_checkpoint": "mcloss.interop.sources",
    "ChannelGroupAttribution": "mcloss.interop.captum",
    # data
    "ImageLoadError": "mcloss.data.io",
    "load_image": "mcloss.data.io",
    "CUBDataset": "mcloss.data.cub",
    "is_cub_layout": "mcloss.data.cub",
    "DatasetError": "mcloss.core.errors",
    "DomainCheck": "mcloss.core.domain",
    "build_datasets": "mcloss.data.datasets",
    "generate_dataset": "mcloss.data.synth",
    "defining_parts": "mcloss.data.defining",
    "PartAnnotations": "mcloss.data.annotations",
    "image_annotations": "mcloss.data.annotations",
    # explainability
    "MapKind": "mcloss.explainability.kinds",
    "register_map_kind": "mcloss.explainability.kinds",
    "DefiningSummary": "mcloss.explainability.defining",
    "defining_summaries": "mcloss.explainability.defining",
    "defining_summary": "mcloss.explainability.defining",
    "Explanation": "mcloss.explainability.explanation",
    "GroupMaps": "mcloss.explainability.explanation",
    "explain": "mcloss.explainability.explanation",
    "explain_tensor": "mcloss.explainability.explanation",
    "Contrast": "mcloss.explainability.contrast",
    "finer_weights": "mcloss.explainability.contrast",
    "group_contrast": "mcloss.explainability.contrast",
    "channel_peaks": "mcloss.explainability.geometry",
    "to_original": "mcloss.explainability.geometry",
    "captum_gradcam": "mcloss.explainability.gradcam",
    "fused_gradcam": "mcloss.explainability.gradcam",
    "gradcam_from_weights": "mcloss.explainability.gradcam",
    "model_guard": "mcloss.core.model",
    "Style": "mcloss.explainability.render",
    "overlay": "mcloss.explainability.render",
    "explanation_figure": "mcloss.explainability.render",
    "explanation_montage": "mcloss.explainability.render",
    # evaluation
    "evaluate": "mcloss.evaluation.classification",
    "evaluate_parts": "mcloss.evaluation.parts",
    "evaluate_contrast": "mcloss.evaluation.contrast",
    "fit_domain": "mcloss.evaluation.domain",
    # training
    "TrainConfig": "mcloss.training.config",
    "make_config": "mcloss.training.config",
    "train": "mcloss.training.loop",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mcloss' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs; nothing is imported at run time
    from mcloss.core.checkpoint import (
        CheckpointError,
        default_checkpoint,
        load_checkpoint,
        read_metadata,
        save_checkpoint,
    )
    from mcloss.core.device import resolve_device
    from mcloss.core.errors import (
        DatasetError,
        FolderBusyError,
        MclossError,
        OutOfRangeError,
        OutputError,
        ParameterError,
        UnknownClassError,
    )
    from mcloss.core.groups import normalize_groups, split_channels
    from mcloss.core.loss import MCLoss, MCLossOutput, ccmp, draw_channel_mask, mutual_channel_loss
    from mcloss.core.model import FCHead, HeadSpec, MCModel, build_model, model_guard
    from mcloss.core.transforms import EvalTransform, Geometry, TrainTransform
    from mcloss.data.annotations import PartAnnotations, image_annotations
    from mcloss.data.cub import CUBDataset, is_cub_layout
    from mcloss.data.datasets import build_datasets
    from mcloss.data.defining import defining_parts
    from mcloss.data.io import ImageLoadError, load_image
    from mcloss.data.synth import generate_dataset
    from mcloss.evaluation.classification import evaluate
    from mcloss.evaluation.parts import evaluate_parts
    from mcloss.explainability.defining import DefiningSummary, defining_summaries, defining_summary
    from mcloss.explainability.explanation import Explanation, GroupMaps, explain, explain_tensor
    from mcloss.explainability.geometry import channel_peaks, to_original
    from mcloss.explainability.gradcam import captum_gradcam, fused_gradcam, gradcam_from_weights
    from mcloss.explainability.kinds import MapKind, register_map_kind
    from mcloss.explainability.render import Style, explanation_figure, explanation_montage, overlay
    from mcloss.interop.captum import ChannelGroupAttribution
    from mcloss.interop.sources import import_checkpoint, import_model
    from mcloss.training.config import TrainConfig, make_config
    from mcloss.training.loop import train
