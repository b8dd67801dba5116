"""Gemma 2 and Gemma 3 (text): the shared decoder with Gemma's norms and embeddings.

- RMSNorm scales by (1 + weight): the loader stores 1 + weight, so the engine's norm
  kernels apply it unchanged.
- Embeddings are multiplied by sqrt(hidden_size).
- Each layer norms the attention and MLP outputs before their residual adds, besides the
  usual norms before them.
- From the config: the attention scale (query_pre_attn_scalar), attention and final logit
  soft-capping (Gemma 2), sliding-window layers alternating with global ones, and for
  Gemma 3 per-head q/k norms and the local layers' own RoPE base.
"""

from __future__ import annotations

import torch
from torch import nn

from gpu_worker.model.config import ModelConfig
from gpu_worker.model.decoder import DecoderForCausalLM, DecoderLayer
from gpu_worker.model.layers import RMSNorm, RotaryEmbedding, default_weight_loader
from gpu_worker.parallel.groups import SINGLE_RANK, RankGroup


class OffsetRMSNorm(RMSNorm):
    """rms_norm(x) * (1 + weight), with the checkpoint's weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__(hidden_size, eps)
        self.weight.weight_loader = _load_plus_one  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field


def _load_plus_one(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None) -> None:
    # In fp32, then rounded once, as Gemma computes 1 + weight.
    default_weight_loader(param, loaded_weight.float() + 1.0, shard_id)


def whole(projection: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A projection's output in the activation dtype, adding up split-K partial sums
    (which only an add + norm reads directly; here a plain norm comes first)."""
    return projection.sum(dim=0).to(dtype) if projection.dim() == 3 else projection


class GemmaDecoderLayer(DecoderLayer):
    def __init__(
        self,
        config: ModelConfig,
        layer_index: int,
        rotary_emb: RotaryEmbedding,
        norm_class: type[RMSNorm] = OffsetRMSNorm,
        tp: RankGroup = SINGLE_RANK,
    ) -> None:
        super().__init__(config, layer_index, rotary_emb, norm_class, tp)
        self.pre_feedforward_layernorm = norm_class(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = norm_class(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed, residual = self.input_layernorm.norm_for(self.self_attn.qkv_proj, hidden_states, residual)
        dtype = residual.dtype
        hidden_states = self.post_attention_layernorm(whole(self.self_attn(positions, normed), dtype))
        hidden_states, residual = self.pre_feedforward_layernorm.add_and_norm(hidden_states, residual)
        hidden_states = self.post_feedforward_layernorm(whole(self.mlp(hidden_states), dtype))
        return hidden_states, residual


class GemmaForCausalLM(DecoderForCausalLM):
    layer_class = GemmaDecoderLayer
    norm_class = OffsetRMSNorm
    scale_embeddings = True
