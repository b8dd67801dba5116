"""Configuration of one GPU worker, passed in explicitly by whoever starts it.

Every service's command line reads these defaults, so this module does not import torch
until a worker resolves its device and dtype."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gpu_worker.model.quantization.config import QUANTIZATION_METHODS
from gpu_worker.parallel.config import ParallelConfig
from services.common.speculative import SpeculativeConfig
from services.common.step_limits import StepLimits

if TYPE_CHECKING:
    import torch

# Each accepted dtype name, and the torch dtype it names.
# --kv-cache-dtype values.
KV_CACHE_DTYPES = ("auto", "fp8")

_DTYPES_BY_NAME: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}

# How the weights are read (--load-format): the checkpoint's, or random ones of its shapes.
LOAD_FORMATS = ("safetensors", "dummy")

# Steps launched and not finished at once (gpu_worker/step_pipeline.py): the standard
# depth, which the worker reports and its scheduler adopts.
MAX_STEPS_LAUNCHED = StepLimits.max_steps_in_flight


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
    # Run every step eagerly: no CUDA graphs at all (CUDA only).
    enforce_eager: bool = False
    # Replay CUDA graphs for steps with prompt tokens too (up to 2,048 tokens; CUDA, one
    # pipeline stage): gpu_worker/prefill_graphs.py. On by default: launched eagerly, such
    # a step holds every decoding sequence for its ~20 ms of host launches, which was the
    # tail of time to first token and of inter-token latency below saturation.
    prefill_graphs: bool = True
    # "safetensors": the model directory's weights; "dummy": random weights made on the
    # device with the architecture's shapes, only config.json read (benchmarks).
    load_format: str = "safetensors"
    # Quantize the linear layers (--quantization): "int8" or "fp8" W8A8 from an unquantized
    # checkpoint, "awq" or "gptq" for checkpoints quantized so; None: as the checkpoint's
    # quantization_config says (unquantized without one).
    quantization: str | None = None
    # The KV cache's element (--kv-cache-dtype): "auto", the model's dtype; "fp8", float8
    # e4m3 with a per-tensor scale of 1.0 (half the bytes of bf16, twice the sequences).
    kv_cache_dtype: str = "auto"
    # Most sequences in one step: the largest decode batch captured in a CUDA graph and
    # the size of the input staging buffers. Reported in WorkerInfo; the scheduler adopts it.
    max_num_seqs: int = StepLimits.max_num_seqs
    # Most tokens in one step: the forward profiled on CUDA to reserve activation memory
    # before the KV cache takes the rest. Reported in WorkerInfo; the scheduler adopts it.
    max_num_batched_tokens: int = StepLimits.max_num_batched_tokens
    # Appends one JSON line per step to this file: its host and device times
    # (gpu_worker/step_timeline.py). For finding where a run's time goes.
    step_timeline_path: Path | None = None
    # This worker's rank among the workers that together hold one model replica, and how
    # the model is split over them; one rank holds it whole by default.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Speculative decoding: how tokens are proposed and how many per step at most.
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

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
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; choose one of "
                f"{', '.join(KV_CACHE_DTYPES)}"
            )
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(
                f"quantization {self.quantization!r} is not supported; "
                f"choose one of {', '.join(QUANTIZATION_METHODS)}"
            )
        if self.kv_cache_dtype != "auto" and self.speculative.method == "draft":
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype} with a draft model is not supported: "
                "the draft's cache keeps the model's dtype"
            )
        if self.speculative.enabled and self.parallel.world_size > 1:
            raise ValueError(
                f"speculative decoding runs on an engine of one rank, not {self.parallel.world_size}"
            )
        # Checks the limits too.
        self.step_limits()

    def step_limits(self) -> StepLimits:
        """The steps this worker is built for, as its WorkerInfo reports them."""
        return StepLimits(self.max_num_seqs, self.max_num_batched_tokens, MAX_STEPS_LAUNCHED)

    def resolve_device(self) -> torch.device:
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and self.parallel.world_size > 1:
            # One GPU per rank: the ranks of a host take its GPUs in rank order (a host with
            # one GPU, such as a pod per rank, gives each rank its only GPU).
            return torch.device("cuda", self.parallel.rank % torch.cuda.device_count())
        return torch.device(device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        import torch

        if self.dtype is not None:
            return getattr(torch, _DTYPES_BY_NAME[self.dtype])
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    def resolve_kv_cache_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The cache's element, for a model computing in `dtype`."""
        import torch

        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8" else dtype
