"""``mcloss export`` (moving here from mcloss.explainability.export)."""

from mcloss.explainability.export import main

__all__ = ["main"]
