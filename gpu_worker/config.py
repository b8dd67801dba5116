"""Configuration of one GPU worker, passed in explicitly by whoever starts it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class WorkerConfig:
    # A Hugging Face model directory: config.json and *.safetensors.
    model_path: Path
    # "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
    device: str = "auto"
    # Weight and KV cache dtype by name ("float32", "bfloat16", "float16"); None picks
    # float32 on CPU (CPU half-precision matmuls are slow and inexact) and bfloat16 on CUDA.
    dtype: str | None = None
    # Tokens per KV block; must match the scheduler's block size.
    block_size: int = 16
    # Upper bound on the number of KV blocks; None means as many as the memory budget allows.
    num_kv_blocks: int | None = None
    # KV cache budget on CPU, where there is no device memory to measure.
    kv_cache_memory_bytes: int = 1 << 30
    # Host memory for the CPU swap pool that preempted sequences' KV moves to
    # (--swap-space); 0 turns swapping off. Allocated up front, pinned on CUDA.
    swap_space_bytes: int = 4 << 30
    # Fraction of the GPU's total memory the worker may use (weights + KV cache + activations).
    gpu_memory_utilization: float = 0.9
    # Longest sequence served; None means the model's max_position_embeddings.
    max_model_len: int | None = None
    # Keys the random draws of sequences that come without a seed (the scheduler always
    # sends one); None draws it at random.
    seed: int | None = 0
    # Run every step eagerly: no CUDA graphs for decode steps (CUDA only).
    enforce_eager: bool = False
    # Largest decode batch captured in a CUDA graph; larger ones run eagerly. Match the
    # scheduler's max_num_seqs.
    max_num_seqs: int = 256
    # Largest step the scheduler sends, in tokens: the forward profiled on CUDA to reserve
    # activation memory before the KV cache takes the rest. Match the scheduler's setting.
    max_num_batched_tokens: int = 8192
    # Appends one JSON line per step to this file: its host and device times
    # (gpu_worker/step_timeline.py). For finding where a run's time goes.
    step_timeline_path: Path | None = None

    def __post_init__(self) -> None:
        # Accept plain strings (CLI, YAML) for the path.
        object.__setattr__(self, "model_path", Path(self.model_path))
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.swap_space_bytes < 0:
            raise ValueError(f"swap_space_bytes must be >= 0, got {self.swap_space_bytes}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must lie in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype is not None and self.dtype not in _DTYPES_BY_NAME:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {sorted(_DTYPES_BY_NAME)}")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is not None:
            return _DTYPES_BY_NAME[self.dtype]
        return torch.bfloat16 if device.type == "cuda" else torch.float32
