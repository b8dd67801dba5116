"""Reading the paged KV cache from Triton kernels (layout in kernels.paged_attention)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(
    key_cache_ptr,
    value_cache_ptr,
    block_table,
    positions,
    valid,
    kv_head,
    dims,
    cache_block_stride,
    cache_slot_stride,
    cache_head_stride,
    BLOCK_SIZE: tl.constexpr,
):
    """Keys and values [len(positions), len(dims)] of one KV head at the context
    `positions` of the sequence whose block-table row starts at `block_table`; rows that
    are not `valid` read no memory and are zero."""
    block_ids = tl.load(block_table + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    offsets = (
        block_ids * cache_block_stride
        + (positions % BLOCK_SIZE) * cache_slot_stride
        + kv_head * cache_head_stride
    )
    keys = tl.load(key_cache_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
    values = tl.load(value_cache_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
    return keys, values


@triton.jit
def in_operand_dtype(query, key_cache_ptr):
    """The query in the dtype the attention's dot products take, to which each KV tile is
    converted as it is read: fp16 for an fp8 cache under a bf16 model, since the device
    widens e4m3 pairs to fp16 pairs in one instruction, where to bf16 it goes through
    fp32, a quarter-rate conversion per value (the kernels were no faster than on a bf16
    cache); else the query's own dtype (the cache's, or fp32's precision kept)."""
    if key_cache_ptr.dtype.element_ty.is_fp8() and query.dtype == tl.bfloat16:
        query = query.to(tl.float16)
    return query
