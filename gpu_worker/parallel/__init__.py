"""Tensor and pipeline parallelism: one engine's ranks (config.py, which imports no torch,
so that every command line can read it) and their groups and collectives (groups.py)."""
