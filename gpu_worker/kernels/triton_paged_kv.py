"""Reading the paged KV cache from Triton kernels (layout in kernels.paged_attention)."""

from __future__ import annotations

import math

import triton
import triton.language as tl


def slot_run(block_size: int, block_n: int) -> int:
    """Slots that lie side by side in an fp8 value tile of block_n keys starting at a
    multiple of block_n: load_kv_tile's promise to the compiler, which copies runs in one
    piece."""
    return math.gcd(block_size, block_n)


@triton.jit
def load_kv_tile(
    key_cache_ptr,
    value_cache_ptr,
    block_table,
    tile_start,
    begin,
    end,
    kv_head,
    dims,
    cache_block_stride,
    cache_slot_stride,
    cache_head_stride,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SLOT_RUN: tl.constexpr,
    WINDOWED: tl.constexpr,
):
    """Keys and values [BLOCK_N, len(dims)] of one KV head at the context positions
    tile_start + [0, BLOCK_N) of the sequence whose block-table row starts at
    `block_table`, tile_start a multiple of BLOCK_N, their positions, and the mask of those
    before `end`. Only blocks holding a position in [begin, end) are read: a block wholly
    before `begin` (WINDOWED: the first position a query of the tile may see) may have left
    the table (a sliding window's FREED_BLOCK): block 0 stands in for it. Keys, and values of
    a 16-bit cache, at or past `end` are zero. An fp8 cache's values are read a whole block
    at a time, so those outside [begin, end) in its first and last blocks hold whatever the
    block held (finite: the cache starts zeroed and its stores write finite values only);
    the caller gives them no weight."""
    positions = tile_start + tl.arange(0, BLOCK_N)
    valid = positions < end
    block_index = positions // BLOCK_SIZE
    fp8_values = value_cache_ptr.dtype.element_ty.is_fp8()
    in_read_block = block_index < tl.cdiv(end, BLOCK_SIZE) if fp8_values else valid
    if WINDOWED:
        in_read_block &= block_index >= begin // BLOCK_SIZE
    if fp8_values:
        # One value per run of SLOT_RUN slots (which never crosses a block's edge), so that
        # value offsets are contiguous across each run, the partial last block's included.
        in_read_block = tl.max_constancy(in_read_block, SLOT_RUN)
    block_ids = tl.load(block_table + block_index, mask=in_read_block, other=0).to(tl.int64)
    slots = positions % BLOCK_SIZE
    offsets = block_ids * cache_block_stride + slots * cache_slot_stride + kv_head * cache_head_stride
    keys = tl.load(key_cache_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
    if fp8_values:
        # A value block is [head, dim, slot]: the tile is read as [dim, key], in runs of
        # SLOT_RUN slots that start at multiples of it.
        value_offsets = block_ids * cache_block_stride + kv_head * (HEAD_DIM * BLOCK_SIZE) + slots
        value_offsets = tl.max_contiguous(tl.multiple_of(value_offsets, SLOT_RUN), SLOT_RUN)
        values_by_dim = tl.load(
            value_cache_ptr + value_offsets[None, :] + dims[:, None] * BLOCK_SIZE,
            mask=in_read_block[None, :],
            other=0.0,
        )
        values = tl.trans(values_by_dim)
    else:
        values = tl.load(value_cache_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
    return keys, values, positions, valid


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
