"""Llama 2/3 and the architectures that are Llama with different config values.

Qwen3 adds an RMSNorm over each query and key head (ModelConfig.use_qk_norm); Qwen2 biases
q/k/v (ModelConfig.qkv_bias); Mistral attends within a sliding window
(ModelConfig.sliding_windows), which is plain Llama when its config has none. The shared
decoder (decoder.py) turns each on from the config.
"""

from __future__ import annotations

from gpu_worker.model.decoder import DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    pass
