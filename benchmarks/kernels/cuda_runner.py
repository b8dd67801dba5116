"""The worker's model runner on the GPU, as the kernel benchmarks build it."""

from __future__ import annotations

from pathlib import Path

from gpu_worker.config import WorkerConfig
from gpu_worker.model_runner import ModelRunner

# Longer than any context or prompt the kernel benchmarks give a runner.
MAX_MODEL_LEN = 4096


def build_cuda_runner(model_dir: Path, **worker_options: object) -> ModelRunner:
    """A ModelRunner on CUDA for `model_dir`; `worker_options` are WorkerConfig's other
    fields (gpu_memory_utilization, max_num_seqs, enforce_eager, quantization,
    kv_cache_dtype, load_format, ...)."""
    return ModelRunner(
        WorkerConfig(model_path=model_dir, device="cuda", max_model_len=MAX_MODEL_LEN, **worker_options)
    )
