"""Pure metric math on numpy arrays (no models, no files): the lowest layer, usable from every other.

Modules:
    localization: hit radii, nearest keypoints, peak hits, top-k masks, IoU, perturbation steps and AUC.
    mass: mass per area on a class's defining parts, geometric means and their bootstrap intervals.
"""
