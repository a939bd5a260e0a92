"""Training: the resolved configuration, setup, the epoch loop, resume, the run-directory writer, DDP and
interrupt handling."""
