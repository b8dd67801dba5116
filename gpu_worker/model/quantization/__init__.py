"""Quantized linear layers: the configuration (config.py, no torch), the methods that
create, load and apply quantized weights (methods.py), and the checkpoint layouts they
read (int4_formats.py). The GEMMs and their references live in kernels/."""
