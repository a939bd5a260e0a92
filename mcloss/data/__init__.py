"""Data: safe image I/O and the one encoder, CUB-layout and other dataset readers, input-file discovery and
images prepared for the network (``inputs``), the synthetic bird-parts dataset (``synth``), the parts that
define each class (``defining``), and where an image's parts are (``annotations``)."""
