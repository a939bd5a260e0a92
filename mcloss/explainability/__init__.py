"""Explainability: the table of map kinds (``kinds``), explanations from one forward pass (channel maps, CCMP,
Grad-CAM), targets, geometry, rendering (``render``), the files of an explanation, batch export, the atlas and
the throughput benchmark."""
