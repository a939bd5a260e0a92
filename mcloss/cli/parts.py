"""``mcloss parts`` (moving here from mcloss.evaluation.parts)."""

from mcloss.evaluation.parts import main

__all__ = ["main"]
