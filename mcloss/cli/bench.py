"""``mcloss bench`` (moving here from mcloss.explainability.benchmark)."""

from mcloss.explainability.benchmark import main

__all__ = ["main"]
