"""``mcloss train`` (moving here from mcloss.training.loop)."""

from mcloss.training.loop import main

__all__ = ["main"]
