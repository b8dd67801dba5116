"""Model architectures the worker can serve, chosen by the config's model_type."""

from __future__ import annotations

from gpu_worker.model.config import ModelConfig
from gpu_worker.model.llama import LlamaForCausalLM

# Qwen3 is the Llama decoder with per-head q/k norms (ModelConfig.use_qk_norm).
MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
}


def model_class_for(config: ModelConfig) -> type[LlamaForCausalLM]:
    try:
        return MODEL_CLASSES[config.model_type]
    except KeyError:
        raise ValueError(
            f"no model class for model_type {config.model_type!r}; known: {sorted(MODEL_CLASSES)}"
        ) from None
