"""What produced an output: the versions of mcloss and of the libraries it ran on."""

from __future__ import annotations

import importlib.metadata
import platform

from mcloss.core.version import __version__

__all__ = ["versions"]


def versions() -> dict[str, str | None]:
    """Versions of mcloss, torch, torchvision, captum and numpy, plus Python and the platform."""
    import numpy
    import torch
    import torchvision

    try:
        captum: str | None = importlib.metadata.version("captum")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - captum is a dependency
        captum = None
    return {
        "mcloss": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "captum": captum,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
