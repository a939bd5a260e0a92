"""Explainability: explanations from one forward pass (channel maps, CCMP, Grad-CAM), targets, geometry,
rendering, the files of an explanation, batch export and the throughput benchmark."""
