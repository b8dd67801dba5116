"""The decoder that every architecture shares, with the hooks in which they differ.

The skeleton is Llama's: embed, N x (norm, attention, norm, gated MLP) with the residual add
deferred into the next norm, final norm, LM head. What an architecture changes is set once,
at construction, from the ModelConfig (attention biases, per-head q/k norms, the attention
scale, a sliding window and score soft-capping per layer, the MLP's activation) or by a
subclass replacing a class attribute (the norm, the decoder layer, embedding scaling, how
a fused checkpoint tensor splits), so that a feature that is off costs no Python work per
layer. Module names follow the Hugging Face checkpoints, except that q/k/v and gate/up are
fused (see loader.STACKED_PARAMS).

Under tensor parallelism each rank holds its heads and its slice of the MLP (see
parallel_layers). Under pipeline parallelism each stage holds a contiguous run of decoder
layers (parallel.config.stage_layer_range); the others are parameterless placeholders, so
that parameter names keep the checkpoint's layer numbers. The first stage embeds, the last
applies the final norm and the LM head.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gpu_worker.kernels.elementwise import GATED_ACTIVATIONS, silu_and_mul_fp8
from gpu_worker.kernels.w8a8 import Fp8Rows
from gpu_worker.model.attention import PagedAttention
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.layers import RMSNorm, RotaryEmbedding
from gpu_worker.model.parallel_layers import (
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    merged_column_parallel_linear,
    qkv_parallel_linear,
)
from gpu_worker.model.quantization.methods import make_quant_method
from gpu_worker.parallel.config import check_model_fits, stage_layer_range
from gpu_worker.parallel.groups import SINGLE_RANK, SINGLE_RANK_CONTEXT, ParallelContext, RankGroup


class DecoderAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_index: int,
        rotary_emb: RotaryEmbedding,
        norm_class: type[RMSNorm] = RMSNorm,
        tp: RankGroup = SINGLE_RANK,
    ) -> None:
        super().__init__()
        # This rank's heads.
        self.num_heads = config.num_attention_heads // tp.size
        self.num_kv_heads = max(1, config.num_key_value_heads // tp.size)
        self.head_dim = config.head_dim
        self.qkv_proj = qkv_parallel_linear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.qkv_bias,
            tp=tp,
            quant_method=make_quant_method(config.quantization),
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            bias=config.attention_bias,
            tp=tp,
            quant_method=make_quant_method(config.quantization),
        )
        if config.use_qk_norm:
            self.q_norm: RMSNorm | None = norm_class(self.head_dim, config.rms_norm_eps)
            self.k_norm: RMSNorm | None = norm_class(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            config.attention_scale,
            rotary_emb,
            sliding_window=config.sliding_window(layer_index),
            logit_softcap=config.attn_logit_softcapping,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor | Fp8Rows) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        num_tokens = qkv.shape[0]
        query, key, value = self.qkv_proj.split(qkv)
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(positions, query, key, value, self.q_norm, self.k_norm))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig, tp: RankGroup = SINGLE_RANK) -> None:
        super().__init__()
        size = config.intermediate_size
        quant = config.quantization
        self.gate_up_proj = merged_column_parallel_linear(
            config.hidden_size,
            [("gate", size), ("up", size)],
            bias=config.mlp_bias,
            tp=tp,
            quant_method=make_quant_method(quant),
        )
        self.down_proj = RowParallelLinear(
            size, config.hidden_size, bias=config.mlp_bias, tp=tp, quant_method=make_quant_method(quant)
        )
        self.act_and_mul = GATED_ACTIVATIONS[config.hidden_act]
        self.silu = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.silu and self.down_proj.takes_fp8_rows(gate_up.shape[0], gate_up.dtype, gate_up.device):
            return self.down_proj(silu_and_mul_fp8(gate_up))
        return self.down_proj(self.act_and_mul(gate_up))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_index: int,
        rotary_emb: RotaryEmbedding,
        norm_class: type[RMSNorm] = RMSNorm,
        tp: RankGroup = SINGLE_RANK,
    ) -> None:
        super().__init__()
        self.input_layernorm = norm_class(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config, layer_index, rotary_emb, norm_class, tp)
        self.post_attention_layernorm = norm_class(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.make_mlp(config, layer_index, tp)

    def make_mlp(self, config: ModelConfig, layer_index: int, tp: RankGroup) -> nn.Module:
        """The layer's feed-forward block: a gated MLP, or routed experts (moe.py)."""
        return GatedMLP(config, tp)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it). The residual
        add is deferred into the next norm, so that each add and norm is one pass."""
        # The previous layer's deferred residual add, then this layer's input norm; the
        # first layer of a stage starts the residual stream instead.
        normed, residual = self.input_layernorm.norm_for(self.self_attn.qkv_proj, hidden_states, residual)
        hidden_states = self.self_attn(positions, normed)
        mlp_input = self.mlp.gate_up_proj if isinstance(self.mlp, GatedMLP) else None
        normed, residual = self.post_attention_layernorm.norm_for(mlp_input, hidden_states, residual)
        return self.mlp(normed), residual


class OtherStageLayer(nn.Module):
    """Stands in for a decoder layer that another pipeline stage holds: no parameters."""


def residual_stream(hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The residual add that the next layer's norm would have done: hidden_states + residual
    in the activation dtype, summed in fp32 when hidden_states are split-K partial sums."""
    if hidden_states.dim() == residual.dim() + 1:
        return (hidden_states.sum(dim=0) + residual.float()).to(residual.dtype)
    return hidden_states + residual


class DecoderModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        max_position: int,
        parallel: ParallelContext,
        layer_class: type[DecoderLayer],
        norm_class: type[RMSNorm],
        embedding_scale: float | None,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        tp = parallel.tp
        if parallel.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        # Rounded to the activation dtype, as the Gemma checkpoints expect, once here.
        self.embedding_scale = (
            None
            if embedding_scale is None
            else float(torch.tensor(embedding_scale, dtype=torch.get_default_dtype()))
        )
        rotary_emb = RotaryEmbedding(config.head_dim, max_position, config.rope_theta, config.rope_scaling)
        local_rotary_emb = rotary_emb
        if config.local_rope_theta is not None:
            local_rotary_emb = RotaryEmbedding(
                config.head_dim, max_position, config.local_rope_theta, config.local_rope_scaling
            )
        self.start_layer, self.end_layer = stage_layer_range(
            config.num_hidden_layers, parallel.num_stages, parallel.stage
        )
        self.layers = nn.ModuleList(
            layer_class(
                config,
                index,
                local_rotary_emb if config.sliding_window(index) is not None else rotary_emb,
                norm_class,
                tp,
            )
            if self.start_layer <= index < self.end_layer
            else OtherStageLayer()
            for index in range(config.num_hidden_layers)
        )
        # A plain tuple, not a second registration: the loop below runs every step.
        self.stage_layers = tuple(self.layers[self.start_layer : self.end_layer])
        if parallel.is_last_stage:
            self.norm = norm_class(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate: torch.Tensor | None
    ) -> torch.Tensor:
        if self.parallel.is_first_stage:
            hidden_states = self.embed_tokens(input_ids)
            if self.embedding_scale is not None:
                hidden_states = hidden_states * self.embedding_scale
        else:
            assert intermediate is not None, "a later pipeline stage runs on the previous stage's output"
            hidden_states = intermediate
        residual = None
        for layer in self.stage_layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        assert residual is not None, "every pipeline stage holds at least one layer"
        if not self.parallel.is_last_stage:
            return residual_stream(hidden_states, residual)
        return self.norm.add_and_norm(hidden_states, residual)[0]


class DecoderForCausalLM(nn.Module):
    """forward() maps a flattened batch to final hidden states; compute_logits() projects
    only the rows that are sampled, so prefill tokens never pay for the vocabulary matmul.

    Pipeline stages: the first runs on input_ids, a later one on `intermediate`, the
    previous stage's output; every stage but the last returns the residual stream after
    its layers, [T, hidden] in the activation dtype, which is what the next stage takes.

    An architecture subclasses this and replaces the class attributes below.
    """

    layer_class: type[DecoderLayer] = DecoderLayer
    norm_class: type[RMSNorm] = RMSNorm
    # Embeddings are multiplied by sqrt(hidden_size) (Gemma).
    scale_embeddings: bool = False

    def __init__(
        self, config: ModelConfig, max_position: int, parallel: ParallelContext = SINGLE_RANK_CONTEXT
    ) -> None:
        super().__init__()
        check_model_fits(config, parallel.config)
        self.config = config
        self.parallel = parallel
        embedding_scale = config.hidden_size**0.5 if self.scale_embeddings else None
        self.model = DecoderModel(
            config, max_position, parallel, self.layer_class, self.norm_class, embedding_scale
        )
        self.final_logit_softcap = config.final_logit_softcapping
        if parallel.is_last_stage:
            tied_to = (
                self.model.embed_tokens if config.tie_word_embeddings and parallel.is_first_stage else None
            )
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, tied_to=tied_to, tp=parallel.tp
            )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; runs inside attention_context(...). Returns [T, hidden]."""
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[rows, vocab_size] on every rank of the last stage."""
        logits = self.lm_head(hidden_states)
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits

    def attention_layers(self) -> list[PagedAttention]:
        """This stage's attention layers, in order: the KV cache holds these only."""
        return [
            layer.self_attn.attn
            for layer in self.model.stage_layers
            if isinstance(layer, DecoderLayer)  # all of them: narrows nn.Module for the checker
        ]

    def split_checkpoint_tensor(
        self, checkpoint_name: str, tensor: torch.Tensor
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint tensors that `tensor` stands for: itself, unless the architecture
        stores projections fused that the engine loads separately (Phi-3)."""
        return ((checkpoint_name, tensor),)

    def stage_checkpoint_name(self, checkpoint_name: str) -> str | None:
        """The parameter name under which this rank holds a checkpoint tensor, or None when
        another pipeline stage holds it. A tied LM head apart from the embedding (on the
        last stage of several) loads the embedding's tensor."""
        parts = checkpoint_name.split(".")
        if parts[:2] == ["model", "layers"]:
            index = int(parts[2])
            return checkpoint_name if self.model.start_layer <= index < self.model.end_layer else None
        if checkpoint_name.startswith("model.embed_tokens."):
            if self.parallel.is_first_stage:
                return checkpoint_name
            if self.config.tie_word_embeddings and self.parallel.is_last_stage:
                return "lm_head." + checkpoint_name.removeprefix("model.embed_tokens.")
            return None
        if checkpoint_name.startswith(("model.norm.", "lm_head.")):
            return checkpoint_name if self.parallel.is_last_stage else None
        return checkpoint_name
