"""Benchmarks of the GPU kernels on Qwen3-0.6B's shapes, each run as
`python -m benchmarks.kernels.NAME` on a CUDA device."""
