"""``mcloss synth``: a synthetic fine-grained bird-parts dataset in CUB_200_2011 layout, with part keypoints.

Modules: :mod:`~mcloss.data.synth.design` (parts, attributes, classes), :mod:`~mcloss.data.synth.drawing`
(one bird on a cluttered background, its keypoints and part label map), :mod:`~mcloss.data.synth.writing`
(the dataset on disk, with ``segmentations/`` and ``part_masks/``).
"""

from mcloss.data.synth.design import (
    ATTRIBUTES,
    BASE_ATTRIBUTES,
    BODY_LABEL,
    CLASS_PARTS,
    COLOURS,
    DESIGNS,
    PART_NAMES,
    BirdClass,
    SynthError,
    class_definitions,
    max_classes,
)
from mcloss.data.synth.drawing import RenderedBird, instance_rng, render_bird
from mcloss.data.synth.writing import generate_dataset, is_synth_output, read_synth_meta

__all__ = [
    "ATTRIBUTES",
    "BASE_ATTRIBUTES",
    "BODY_LABEL",
    "CLASS_PARTS",
    "COLOURS",
    "DESIGNS",
    "PART_NAMES",
    "BirdClass",
    "RenderedBird",
    "SynthError",
    "class_definitions",
    "generate_dataset",
    "instance_rng",
    "is_synth_output",
    "max_classes",
    "read_synth_meta",
    "render_bird",
]
