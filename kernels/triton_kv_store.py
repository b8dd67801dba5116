"""Triton KV-cache store: the fused form of kernels.paged_attention.store_kv.

One program per token copies its keys and values (all KV heads, contiguous in both the
source row and the cache slot) to its slot; padding tokens (slot -1) write nothing, which
is what lets a CUDA graph captured for a larger batch run a smaller one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    key_token_stride,
    value_token_stride,
    ROW_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = (offsets < ROW_SIZE) & (slot >= 0)
    key = tl.load(key_ptr + token * key_token_stride + offsets, mask=mask)
    value = tl.load(value_ptr + token * value_token_stride + offsets, mask=mask)
    tl.store(key_cache_ptr + slot * ROW_SIZE + offsets, key, mask=mask)
    tl.store(value_cache_ptr + slot * ROW_SIZE + offsets, value, mask=mask)


def store_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as kernels.paged_attention.store_kv; key/value rows may be strided
    (views of a fused qkv projection) as long as each token's heads are contiguous."""
    num_tokens, num_kv_heads, head_dim = key.shape
    row_size = num_kv_heads * head_dim
    for tensor in (key, value):
        assert tensor.stride(2) == 1 and tensor.stride(1) == head_dim, "heads must be contiguous"
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert key.dtype == key_cache.dtype, "store casts nothing: project in the cache dtype"
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        ROW_SIZE=row_size,
        BLOCK=triton.next_power_of_2(row_size),
    )
