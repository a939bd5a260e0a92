"""Pure metric math on numpy arrays (no models, no files), usable from every layer above core: it imports
only numpy and :mod:`mcloss.core.errors`.

Modules:
    coverage: the "distinct parts" claim counted: each channel's majority part, coverage of the defining parts.
    localization: hit radii, nearest keypoints, peak hits, top-k masks, IoU, perturbation steps and AUC.
    mass: mass per area on a class's defining parts, geometric means and their bootstrap intervals.
"""

__all__ = ["coverage", "localization", "mass"]
