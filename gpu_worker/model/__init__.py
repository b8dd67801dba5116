"""Model architectures the worker can serve, chosen by the config's model_type."""

from __future__ import annotations

from gpu_worker.model.config import SUPPORTED_MODEL_TYPES, ModelConfig
from gpu_worker.model.decoder import DecoderForCausalLM
from gpu_worker.model.gemma import GemmaForCausalLM
from gpu_worker.model.llama import LlamaForCausalLM
from gpu_worker.model.moe import MoEForCausalLM
from gpu_worker.model.phi3 import Phi3ForCausalLM

# Qwen2, Qwen3 and Mistral are the Llama decoder with config-driven features (llama.py);
# Gemma 2 and 3 differ from each other only in config values (gemma.py).
MODEL_CLASSES: dict[str, type[DecoderForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "phi3": Phi3ForCausalLM,
    "gemma2": GemmaForCausalLM,
    "gemma3_text": GemmaForCausalLM,
    "mixtral": MoEForCausalLM,
    "qwen3_moe": MoEForCausalLM,
}
assert set(MODEL_CLASSES) == set(SUPPORTED_MODEL_TYPES), "config.SUPPORTED_MODEL_TYPES is out of step"


def model_class_for(config: ModelConfig) -> type[DecoderForCausalLM]:
    try:
        return MODEL_CLASSES[config.model_type]
    except KeyError:
        raise ValueError(
            f"no model class for model_type {config.model_type!r}; known: {sorted(MODEL_CLASSES)}"
        ) from None
