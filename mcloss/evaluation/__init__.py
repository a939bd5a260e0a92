"""Evaluation: classification accuracy of both heads, localization metrics, ``mcloss parts`` and its report,
and deletion/insertion faithfulness."""
