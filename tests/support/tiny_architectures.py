"""Tiny random Hugging Face models of every architecture the worker serves.

Each is built by transformers itself, with sliding windows shorter than the test prompts
and caps low enough to bend the scores, so that every architecture's own features decide
the tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers

from tests.support.tiny_llama import TINY_DIMS

SLIDING_WINDOW = 5
# Gemma: a layer of each kind, the local one with its own RoPE base under Gemma 3.
GEMMA_DIMS = dict(
    TINY_DIMS,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=SLIDING_WINDOW,
    layer_types=["sliding_attention", "full_attention"],
)


def _llama() -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        tie_word_embeddings=False,
        # A small original context so that the llama3 scaling changes real frequencies.
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        **TINY_DIMS,
    )
    return transformers.LlamaForCausalLM(config)


def _qwen3() -> transformers.PreTrainedModel:
    config = transformers.Qwen3Config(tie_word_embeddings=True, head_dim=16, **TINY_DIMS)
    return transformers.Qwen3ForCausalLM(config)


def _qwen2() -> transformers.PreTrainedModel:
    # YaRN over a small original context, so that it changes real frequencies.
    yarn = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    config = transformers.Qwen2Config(tie_word_embeddings=True, rope_parameters=yarn, **TINY_DIMS)
    return transformers.Qwen2ForCausalLM(config)


def _mistral() -> transformers.PreTrainedModel:
    config = transformers.MistralConfig(sliding_window=SLIDING_WINDOW, head_dim=16, **TINY_DIMS)
    return transformers.MistralForCausalLM(config)


def _phi3() -> transformers.PreTrainedModel:
    # LongRoPE with an original context longer than the tests' sequences, whose short
    # factors then apply (see gpu_worker/model/layers.py).
    half = TINY_DIMS["hidden_size"] // TINY_DIMS["num_attention_heads"] // 2
    longrope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.25 * i for i in range(half)],
        "long_factor": [2.0 + 0.5 * i for i in range(half)],
        "original_max_position_embeddings": 128,
    }
    config = transformers.Phi3Config(
        sliding_window=SLIDING_WINDOW + 2,
        rope_parameters=longrope,
        original_max_position_embeddings=128,
        **TINY_DIMS,
    )
    return transformers.Phi3ForCausalLM(config)


def _gemma2() -> transformers.PreTrainedModel:
    config = transformers.Gemma2Config(attn_logit_softcapping=1.0, final_logit_softcapping=3.0, **GEMMA_DIMS)
    return transformers.Gemma2ForCausalLM(config)


def _gemma3_text() -> transformers.PreTrainedModel:
    config = transformers.Gemma3TextConfig(
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        **GEMMA_DIMS,
    )
    return transformers.Gemma3ForCausalLM(config)


def _mixtral() -> transformers.PreTrainedModel:
    config = transformers.MixtralConfig(
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=SLIDING_WINDOW + 1,
        head_dim=16,
        **TINY_DIMS,
    )
    return transformers.MixtralForCausalLM(config)


def _qwen3_moe() -> transformers.PreTrainedModel:
    # Top-2 of 4 experts without renormalizing, beside a dense layer.
    config = transformers.Qwen3MoeConfig(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        head_dim=16,
        **TINY_DIMS,
    )
    return transformers.Qwen3MoeForCausalLM(config)


BUILDERS: dict[str, Callable[[], transformers.PreTrainedModel]] = {
    "llama": _llama,
    "qwen3": _qwen3,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "phi3": _phi3,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
}


def build_tiny_model(model_type: str) -> transformers.PreTrainedModel:
    """The model in eval mode, its norm weights and biases randomized (their init is
    constant) so that a norm or bias loaded wrongly changes the logits."""
    model = BUILDERS[model_type]()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()
