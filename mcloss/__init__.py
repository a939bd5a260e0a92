"""mcloss: train and explain fine-grained classifiers with the Mutual-Channel Loss."""

from .checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from .data import CUBDataset, DatasetError, build_datasets, is_cub_layout
from .device import resolve_device
from .groups import normalize_groups, split_channels
from .io import ImageLoadError, load_image
from .loss import MCLoss, MCLossOutput, ccmp, draw_channel_mask, mutual_channel_loss
from .maps import Explanation, GroupMaps, explain, to_original
from .model import FCHead, MCModel, build_model
from .parts import evaluate_parts
from .synth import generate_dataset
from .transforms import EvalTransform, Geometry, TrainTransform

__version__ = "0.1.0"

__all__ = [
    "CUBDataset",
    "CheckpointError",
    "DatasetError",
    "Explanation",
    "GroupMaps",
    "build_datasets",
    "evaluate_parts",
    "explain",
    "generate_dataset",
    "is_cub_layout",
    "to_original",
    "EvalTransform",
    "FCHead",
    "Geometry",
    "ImageLoadError",
    "MCLoss",
    "MCLossOutput",
    "MCModel",
    "TrainTransform",
    "build_model",
    "ccmp",
    "draw_channel_mask",
    "load_checkpoint",
    "load_image",
    "mutual_channel_loss",
    "normalize_groups",
    "read_metadata",
    "resolve_device",
    "save_checkpoint",
    "split_channels",
    "__version__",
]
