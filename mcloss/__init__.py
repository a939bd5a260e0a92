"""mcloss: train and explain fine-grained classifiers with the Mutual-Channel Loss.

Submodules whose name is also a function (``mcloss.train.train``, ``mcloss.evaluate.evaluate``) are
not re-exported by that name, so that ``mcloss.train`` stays the module.
"""

__version__ = "0.1.0"  # defined before the imports below: mcloss.train reads it

from .checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint  # noqa: E402
from .data import CUBDataset, DatasetError, build_datasets, is_cub_layout  # noqa: E402
from .device import resolve_device  # noqa: E402
from .gradcam import captum_gradcam, fused_gradcam, gradcam_from_weights, model_guard  # noqa: E402
from .groups import normalize_groups, split_channels  # noqa: E402
from .io import ImageLoadError, load_image  # noqa: E402
from .loss import MCLoss, MCLossOutput, ccmp, draw_channel_mask, mutual_channel_loss  # noqa: E402
from .maps import Explanation, GroupMaps, channel_peaks, explain, explain_tensor, to_original  # noqa: E402
from .model import FCHead, MCModel, build_model  # noqa: E402
from .parts import evaluate_parts  # noqa: E402
from .render import explanation_figure, explanation_montage, overlay  # noqa: E402
from .synth import generate_dataset  # noqa: E402
from .train import TrainConfig, make_config  # noqa: E402
from .transforms import EvalTransform, Geometry, TrainTransform  # noqa: E402

__all__ = [
    "CUBDataset",
    "CheckpointError",
    "DatasetError",
    "Explanation",
    "GroupMaps",
    "build_datasets",
    "captum_gradcam",
    "channel_peaks",
    "evaluate_parts",
    "explain",
    "explain_tensor",
    "explanation_figure",
    "explanation_montage",
    "fused_gradcam",
    "generate_dataset",
    "gradcam_from_weights",
    "is_cub_layout",
    "make_config",
    "model_guard",
    "overlay",
    "to_original",
    "EvalTransform",
    "FCHead",
    "Geometry",
    "ImageLoadError",
    "MCLoss",
    "MCLossOutput",
    "MCModel",
    "TrainConfig",
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
