"""Which implementation computes a step's KV store and attention: the one place that
chooses.

- CPU (or any non-CUDA device): the PyTorch references in kernels/paged_attention.py.
- CUDA, decode-only step (one query token per sequence): the Triton split-context decode
  kernel, whose launch depends on the batch size alone (CUDA-graph safe).
- CUDA, a step of fresh prefills only (no sequence has cached context): flash-attn's varlen
  kernel if it is installed, else PyTorch's FlashAttention-2 varlen kernel if this torch has
  it, over the step's own keys and values.
- CUDA, anything else (chunked prefill over a cached prefix, prefix-cache hits, prefills
  mixed with decodes): the Triton paged prefill kernel, which reads the cache, for the
  sequences with several query tokens, and the decode kernel for those with one.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gpu_worker.kernels.elementwise import qk_norm_rope_reference
from gpu_worker.kernels.paged_attention import UNSCALED, KVScales, paged_attention, store_kv

if TYPE_CHECKING:
    from gpu_worker.model.attention import AttentionMetadata

log = logging.getLogger(__name__)

FreshPrefill = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def rotate_and_store(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    keep_key: bool,
    kv_scales: KVScales = UNSCALED,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-head RMSNorm of queries and keys when weights are given (Qwen3), rotary
    embedding of both, and keys and values into their cache slots, divided by kv_scales.
    Returns the rotated queries, and the rotated keys if keep_key (a fresh prefill attends
    to them directly, unscaled)."""
    if query.is_cuda:
        from gpu_worker.kernels.triton_rope_store import rope_store_triton

        return rope_store_triton(
            positions,
            query,
            key,
            value,
            cos_sin_cache,
            q_weight,
            k_weight,
            eps,
            key_cache,
            value_cache,
            slot_mapping,
            keep_key,
            kv_scales,
        )
    query, key = qk_norm_rope_reference(positions, query, key, cos_sin_cache, q_weight, k_weight, eps)
    store_kv(key / kv_scales.key, value / kv_scales.value, key_cache, value_cache, slot_mapping)
    return query, key if keep_key else None


def attention(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    kv_scales: KVScales = UNSCALED,
) -> torch.Tensor:
    """query: [T, H, D]; key, value: this step's [T, H_kv, D], already stored in the cache
    (key may be None unless metadata.no_cached_context). sliding_window and logit_softcap
    as in kernels.paged_attention; the cache holds keys and values divided by kv_scales.
    Returns [T, H, D]."""
    # The cache's keys times kv_scales.key are the keys: their factor joins the softmax's.
    cache_scale = scale * kv_scales.key
    if not query.is_cuda:
        output = paged_attention(
            query,
            key_cache,
            value_cache,
            metadata.block_tables,
            metadata.query_start_loc,
            metadata.seq_lens,
            cache_scale,
            sliding_window,
            logit_softcap,
        )
        return output if kv_scales.value == 1.0 else output * kv_scales.value
    value_scale = kv_scales.value
    if metadata.max_query_len == 1:
        return _decode(
            query, key_cache, value_cache, metadata, cache_scale, sliding_window, logit_softcap, value_scale
        )
    fresh_prefill = fresh_prefill_kernel()
    # The varlen kernels are called without window or soft-cap options: those steps go to
    # the paged prefill kernel, which has both.
    if (
        metadata.no_cached_context
        and sliding_window is None
        and logit_softcap is None
        and key is not None
        and fresh_prefill is not None
        and not _fresh_prefill_failed
    ):
        try:
            return fresh_prefill(query, key, value, metadata.query_start_loc, metadata.max_query_len, scale)
        except (RuntimeError, TypeError, ValueError) as error:
            # A varlen kernel that rejects this build's arguments or dtypes is not worth a
            # failed step: the paged kernel computes the same thing.
            _disable_fresh_prefill(error)
    return _paged_prefill(
        query, key_cache, value_cache, metadata, cache_scale, sliding_window, logit_softcap, value_scale
    )


def _decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    logit_softcap: float | None,
    value_scale: float,
    mixed_output: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decode kernel over a decode-only step, or, given a mixed step's output, over its
    sequences with one query token, into their rows of it."""
    from gpu_worker.kernels.triton_decode_attention import choose_num_splits, decode_attention_triton

    num_splits = None
    if mixed_output is not None and metadata.fewest_seqs is not None:
        num_splits = choose_num_splits(metadata.fewest_seqs, key_cache.shape[2])
    return decode_attention_triton(
        query,
        key_cache,
        value_cache,
        metadata.block_tables,
        metadata.seq_lens,
        scale,
        sliding_window=sliding_window,
        logit_softcap=logit_softcap,
        num_splits=num_splits,
        query_start_loc=None if mixed_output is None else metadata.query_start_loc,
        output=mixed_output,
        value_scale=value_scale,
    )


def _paged_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    logit_softcap: float | None,
    value_scale: float = 1.0,
) -> torch.Tensor:
    from gpu_worker.kernels import triton_prefill_attention as prefill

    block_m = prefill.prefill_block_m(query.shape[1], key_cache.shape[2])
    num_tiles = prefill.max_prefill_tiles(query.shape[0], metadata.seq_lens.shape[0], block_m)
    # Made by the step's first layer, read by the others.
    decodes_apart = metadata.may_have_decodes
    tile_map = metadata.derived(
        ("prefill_tiles", block_m),
        lambda: prefill.prefill_tile_map(
            metadata.query_start_loc, block_m, num_tiles, single_token_queries=not decodes_apart
        ),
    )
    output = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if decodes_apart:
        # Both kernels are launched whatever the batch (a graph serves any mix); each
        # program of a sequence the other one computes returns at once.
        _decode(
            query, key_cache, value_cache, metadata, scale, sliding_window, logit_softcap, value_scale, output
        )
    return prefill.prefill_attention_triton(
        query,
        key_cache,
        value_cache,
        metadata.block_tables,
        metadata.query_start_loc,
        metadata.seq_lens,
        scale,
        sliding_window=sliding_window,
        logit_softcap=logit_softcap,
        block_m=block_m,
        tile_map=tile_map,
        output=output,
        value_scale=value_scale,
    )


_fresh_prefill_failed = False


def _disable_fresh_prefill(error: Exception) -> None:
    global _fresh_prefill_failed
    _fresh_prefill_failed = True
    log.warning("varlen prefill kernel failed (%s); using the Triton paged prefill kernel", error)


@functools.cache
def fresh_prefill_kernel() -> FreshPrefill | None:
    """Causal varlen attention over contiguous keys/values (cu_seqlens_k == cu_seqlens_q)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:

        def flash_attn_prefill(query, key, value, cu_seqlens, max_len, scale):
            return flash_attn_varlen_func(
                query,
                key,
                value.contiguous(),
                cu_seqlens,
                cu_seqlens,
                max_len,
                max_len,
                softmax_scale=scale,
                causal=True,
            )

        return flash_attn_prefill
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    # Keywords of whichever varlen_attn this torch has, so typed loosely.
    causal: dict[str, Any] = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    if "window_size" not in parameters and "is_causal" not in parameters:
        return None
    native_gqa = "enable_gqa" in parameters

    def torch_varlen_prefill(query, key, value, cu_seqlens, max_len, scale):
        extra: dict[str, Any]
        if native_gqa:
            extra = {"enable_gqa": True}
        else:
            group = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
            extra = {}
        value = value.contiguous()
        return varlen_attn(
            query, key, value, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, **causal, **extra
        )

    return torch_varlen_prefill
