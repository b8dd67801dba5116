"""The worker's model runner on the GPU, as the kernel benchmarks build it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gpu_worker.config import WorkerConfig
from gpu_worker.model_runner import ModelRunner

# Longer than any context or prompt the kernel benchmarks give a runner.
MAX_MODEL_LEN = 4096


def build_cuda_runner(model_dir: Path, **worker_options: Any) -> ModelRunner:
    """A ModelRunner on CUDA for `model_dir`; `worker_options` are WorkerConfig's other
    fields (gpu_memory_utilization, max_num_seqs, enforce_eager, quantization,
    kv_cache_dtype, load_format, ...)."""
    return ModelRunner(
        WorkerConfig(model_path=model_dir, device="cuda", max_model_len=MAX_MODEL_LEN, **worker_options)
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model's options as serve takes them: its quantization, the KV cache's dtype,
    and random weights made on the device (--load-format dummy)."""
    parser.add_argument("--quantization", default=None, help="as serve's: int8 or fp8 (W8A8), awq, gptq")
    parser.add_argument("--kv-cache-dtype", default="auto", help="as serve's")
    parser.add_argument(
        "--load-format", default="safetensors", help="dummy: random weights made on the device"
    )


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """add_model_options' values as build_cuda_runner's worker options."""
    return {
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "load_format": args.load_format,
    }
