"""Data: safe image I/O and the one encoder, CUB-layout and other dataset readers, input-file discovery, and
the synthetic bird-parts dataset (``synth``)."""
