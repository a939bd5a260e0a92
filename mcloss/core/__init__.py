"""The model and the method: channel groups, the Mutual-Channel Loss, MCModel, checkpoints, transforms,
devices, error types and provenance records."""
