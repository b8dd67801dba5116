"""The per-step attention context and the attention layer that reads it.

The model's forward signature stays (input_ids, positions) for every kind of batch; what
differs between steps (where each token's KV goes, which blocks each sequence owns) is set
once per step by the runner in an attention context that the attention layers read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gpu_worker.kernels.attention_backend import attention, rotate_and_store
from gpu_worker.kernels.paged_attention import UNSCALED, KVScales
from gpu_worker.model.layers import RMSNorm, RotaryEmbedding


@dataclass(frozen=True)
class AttentionMetadata:
    """What every attention layer needs to know about the flattened batch of one step."""

    # [num_tokens] cache slot of each token's key and value (-1: padding, not stored).
    slot_mapping: torch.Tensor
    # [num_seqs + 1] offsets of each sequence's tokens in the flattened batch.
    query_start_loc: torch.Tensor
    # [num_seqs] tokens in each sequence's context after this step (cached + new).
    seq_lens: torch.Tensor
    # [num_seqs, max_blocks_per_seq] block ids, padded with 0 past each sequence's blocks.
    block_tables: torch.Tensor
    # Largest query and context lengths of the batch, for kernels' launch grids.
    max_query_len: int
    max_seq_len: int
    # Every sequence's context is exactly its new tokens (fresh prefills only), so attention
    # may read this step's keys and values directly instead of the cache.
    no_cached_context: bool = False
    # Whether a sequence may have exactly one query token: a mixed step's such sequences
    # go to the decode kernel. A verification graph's sequences never do.
    may_have_decodes: bool = True
    # Where seq_lens has rows to spare (a graph's sequence slots), how many sequences at
    # least the batch holds; None: every row is a sequence. A mixed step's decode kernel
    # splits contexts for this many: split for the slots, a batch filling a quarter of them
    # left most multiprocessors idle while each program walked a whole context (H100).
    fewest_seqs: int | None = None
    # What kernels derive from the above once per step and every layer reads (derived()).
    _derived: dict[Any, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def derived(self, key: Any, make: Callable[[], Any]) -> Any:
        """make()'s result, made on the first call with this key for this step."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]


_current_metadata: ContextVar[AttentionMetadata | None] = ContextVar("attention_metadata", default=None)


@contextmanager
def attention_context(metadata: AttentionMetadata) -> Iterator[AttentionMetadata]:
    """Makes `metadata` visible to the attention layers for the duration of one forward."""
    token = _current_metadata.set(metadata)
    try:
        yield metadata
    finally:
        # Reset even when the forward raises, so that no later call sees stale slots.
        _current_metadata.reset(token)


def get_attention_metadata() -> AttentionMetadata:
    metadata = _current_metadata.get()
    if metadata is None:
        raise RuntimeError("attention layers run only inside attention_context(...)")
    return metadata


class PagedAttention(nn.Module):
    """Rotates queries and keys (after Qwen3's per-head norm), stores keys and values in the
    paged cache, then attends over it."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        rotary_emb: RotaryEmbedding,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        # A query attends to this many most recent positions (None: all); scores are
        # soft-capped at logit_softcap (None: not capped).
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # Shared by all layers; its cos/sin table is a buffer, not a weight.
        self.rotary_emb = rotary_emb
        # Plain attributes rather than buffers: the cache is not part of the weights.
        self.key_cache: torch.Tensor | None = None
        self.value_cache: torch.Tensor | None = None
        # A checkpoint's calibrated scales for an fp8 cache, if it has them (1 if not).
        self.k_scale: torch.Tensor
        self.v_scale: torch.Tensor
        self.register_buffer("k_scale", _kv_scale(), persistent=False)
        self.register_buffer("v_scale", _kv_scale(), persistent=False)
        self.kv_scales = UNSCALED

    def bind_kv_cache(self, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        self.key_cache = key_cache
        self.value_cache = value_cache
        # A cache in the model's dtype holds keys and values as they are.
        fp8 = key_cache.dtype.itemsize == 1
        self.kv_scales = KVScales(float(self.k_scale), float(self.v_scale)) if fp8 else UNSCALED

    def bound_kv_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's key and value caches, once bound."""
        if self.key_cache is None or self.value_cache is None:
            raise RuntimeError("no KV cache bound to this attention layer")
        return self.key_cache, self.value_cache

    def forward(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        """positions: [T]; query: [T, num_heads, head_dim]; key, value: [T, num_kv_heads,
        head_dim]; q_norm and k_norm: Qwen3's per-head norms, or None. Returns [T, num_heads * head_dim]."""
        key_cache, value_cache = self.bound_kv_cache()
        metadata = get_attention_metadata()
        if q_norm is not None and k_norm is not None:
            q_norm_weight, k_norm_weight, norm_eps = q_norm.weight, k_norm.weight, q_norm.eps
        else:
            q_norm_weight, k_norm_weight, norm_eps = None, None, 0.0
        query, rotated_key = rotate_and_store(
            positions,
            query,
            key,
            value,
            self.rotary_emb.cos_sin_cache,
            q_norm_weight,
            k_norm_weight,
            norm_eps,
            key_cache,
            value_cache,
            metadata.slot_mapping,
            keep_key=metadata.no_cached_context,
            kv_scales=self.kv_scales,
        )
        output = attention(
            query,
            rotated_key,
            value,
            key_cache,
            value_cache,
            metadata,
            self.scale,
            self.sliding_window,
            self.logit_softcap,
            self.kv_scales,
        )
        return output.reshape(output.shape[0], self.num_heads * self.head_dim)


def _kv_scale() -> torch.Tensor:
    """One fp32 scale for a whole layer's keys (or values), as llm-compressor's
    kv_cache_scheme writes `self_attn.k_scale` and `self_attn.v_scale`: a buffer, not a
    weight (random weights leave it at 1), that the loader fills where the checkpoint has
    it and leaves at 1 where not."""
    scale = torch.ones((), dtype=torch.float32)
    scale.weight_loader = _load_kv_scale  # type: ignore[attr-defined]  # a loader hook
    scale.optional = True  # type: ignore[attr-defined]  # read by the loader
    return scale


def _load_kv_scale(param: torch.Tensor, loaded: torch.Tensor, shard_id: str | None = None) -> None:
    if loaded.numel() != 1:
        raise ValueError(
            f"KV cache scales of shape {tuple(loaded.shape)}: only one scale per layer (per tensor) "
            "is supported, not one per head or channel"
        )
    if not float(loaded) > 0:
        raise ValueError(f"KV cache scale {float(loaded)} must be positive")
    param.data.fill_(float(loaded))
