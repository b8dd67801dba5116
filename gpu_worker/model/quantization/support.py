"""The combinations of quantization, model, device and parallelism the worker refuses at
start-up, each named in its message."""

from __future__ import annotations

import dataclasses

import torch

from gpu_worker.config import WorkerConfig
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.quantization.config import QuantizationConfig, resolve_quantization
from gpu_worker.parallel.config import ParallelConfig

# fp8 GEMMs (torch._scaled_mm) need Ada or Hopper.
_FP8_MIN_CAPABILITY = (8, 9)


def check_quantization_supported(
    quantization: QuantizationConfig | None,
    model_config: ModelConfig,
    device: torch.device,
    parallel: ParallelConfig,
) -> None:
    if quantization is None:
        return
    method = quantization.method
    if model_config.num_experts and quantization.weight_block is None:
        raise ValueError(
            f"quantization {method} with model_type {model_config.model_type}: "
            "quantized mixture-of-experts layers are implemented for fine-grained fp8 checkpoints only"
        )
    if (quantization.weight_only or quantization.prequantized) and model_config.model_type == "phi3":
        # Phi-3 stores q/k/v and gate/up fused; splitting packed 4-bit tensors, or scales
        # per tensor or per block, is not done.
        raise ValueError(f"{method} checkpoints of model_type phi3 are not implemented")
    if method == "gptq" and quantization.desc_act and parallel.tensor_parallel_size > 1:
        raise ValueError(
            "GPTQ act_order (desc_act) checkpoints with tensor_parallel_size "
            f"{parallel.tensor_parallel_size} are not supported; serve them on one rank per stage"
        )
    if method == "fp8" and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < _FP8_MIN_CAPABILITY:
            raise ValueError(
                f"quantization fp8 needs compute capability 8.9 or later; {device} has "
                f"{capability[0]}.{capability[1]} (use --quantization int8)"
            )


def with_requested_quantization(model_config: ModelConfig, config: WorkerConfig) -> ModelConfig:
    """The model's configuration with the quantization it is served with."""
    quantization = resolve_quantization(config.quantization, model_config.quantization, config.load_format)
    return dataclasses.replace(model_config, quantization=quantization)
