"""Evaluation: classification accuracy of both heads, ``mcloss parts`` (localization and defining-part
metrics, from :mod:`mcloss.metrics`) and its report, deletion/insertion faithfulness and sanity checks."""
