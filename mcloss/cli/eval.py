"""``mcloss eval`` (moving here from mcloss.evaluation.classification)."""

from mcloss.evaluation.classification import main

__all__ = ["main"]
