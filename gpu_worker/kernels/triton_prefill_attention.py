"""Triton paged attention for any mixed batch: prefills, chunks of prefill over a cached
prefix, and decodes, all reading keys and values from the paged cache.

Computes exactly kernels.paged_attention.paged_attention. One program handles BLOCK_M query
tokens of one sequence for all the query heads of one KV head: the rows of its tile are
(token, head-in-group) pairs, so each KV tile is loaded once per group rather than once per
query head. The batch's tiles are numbered one after the other across sequences, and a
map made on the device says each tile's sequence and first token: the grid then depends
on the token and sequence counts alone, not on the longest query, so one launch serves
every batch of a CUDA graph's size. Query token i of a sequence with q_len new tokens and seq_len in its context
sits at position seq_len - q_len + i and sees keys [0, position], or the last
`sliding_window` of them; scores may be soft-capped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.launch import pdl_launch, wait_for_previous_kernel
from gpu_worker.kernels.paged_attention import check_cache_layout
from gpu_worker.kernels.triton_attention_options import soft_cap
from gpu_worker.kernels.triton_paged_kv import in_operand_dtype, load_kv_tile, slot_run

_LOG2E = 1.4426950408889634


# The block table's width and the batch's sequence count change from step to step;
# specializing on them (1, divisible by 16, or neither) would compile a new variant
# mid-run: the graphs capture sequence slots of multiples of 16, eager steps any count.
@triton.jit(do_not_specialize=["block_table_stride", "num_seqs"])
def _prefill_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    tile_seq_ptr,
    tile_first_ptr,
    num_seqs,
    output_ptr,
    scale_log2,
    window,
    softcap_log2,
    value_scale,
    query_token_stride,
    query_head_stride,
    output_token_stride,
    output_head_stride,
    block_table_stride,
    cache_block_stride,
    cache_slot_stride,
    cache_head_stride,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLOT_RUN: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    if seq >= num_seqs:
        return
    first_token = tl.load(tile_first_ptr + tile)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
    rows = tl.arange(0, ROWS)
    tokens = first_token + rows // GROUP_PAD
    group_index = rows % GROUP_PAD
    row_valid = (tokens < query_len) & (group_index < GROUP)
    heads = kv_head * GROUP + group_index
    query_positions = context_len + tokens
    dims = tl.arange(0, HEAD_DIM)
    token_rows = (query_start + tokens).to(tl.int64)
    query = tl.load(
        query_ptr
        + token_rows[:, None] * query_token_stride
        + heads[:, None] * query_head_stride
        + dims[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )
    query = in_operand_dtype(query, key_cache_ptr)

    row_max = tl.full([ROWS], float("-inf"), tl.float32)
    row_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    # Keys past the tile's last query position are masked for every row of the tile.
    key_end = tl.minimum(seq_len, context_len + first_token + BLOCK_M)
    key_start = 0
    if USE_WINDOW:
        # The tile's first query sees no key before its own position - window + 1; tiles
        # start at multiples of BLOCK_N (load_kv_tile's promise), the rest is masked below.
        key_start = tl.maximum(context_len + first_token - window + 1, 0)
    for tile_start in range(key_start // BLOCK_N * BLOCK_N, key_end, BLOCK_N):
        keys, values, key_positions, key_valid = load_kv_tile(
            key_cache_ptr,
            value_cache_ptr,
            block_table,
            tile_start,
            key_start,
            key_end,
            kv_head,
            dims,
            cache_block_stride,
            cache_slot_stride,
            cache_head_stride,
            BLOCK_N,
            BLOCK_SIZE,
            HEAD_DIM,
            SLOT_RUN,
            USE_WINDOW,
        )
        # In the dtype of in_operand_dtype's query (a no-op for a cache of the model's dtype).
        keys, values = keys.to(query.dtype), values.to(query.dtype)
        scores = tl.dot(query, tl.trans(keys)).to(tl.float32) * scale_log2
        if USE_SOFTCAP:
            scores = soft_cap(scores, softcap_log2)
        visible = key_valid[None, :] & (key_positions[None, :] <= query_positions[:, None])
        if USE_WINDOW:
            visible &= key_positions[None, :] > query_positions[:, None] - window
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # Rows that have seen no visible key yet (padding rows) keep a finite reference.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - safe_max[:, None])
        correction = tl.exp2(row_max - safe_max)
        row_sum = row_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.dot(probs.to(values.dtype), values).to(tl.float32)
        row_max = new_max

    # value_scale: what the cache's values were divided by as they were stored.
    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None] * value_scale
    tl.store(
        output_ptr
        + token_rows[:, None] * output_token_stride
        + heads[:, None] * output_head_stride
        + dims[None, :],
        out.to(output_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


def prefill_tile_map(
    query_start_loc: torch.Tensor, block_m: int, num_tiles: int, single_token_queries: bool = True
) -> tuple[torch.Tensor, ...]:
    """(tile_seq, tile_first) [num_tiles]: each tile's sequence (num_seqs past the batch's
    last tile) and its first query token. Device ops only: no host sync.
    single_token_queries False: sequences with one query token get no tile (the decode
    kernel computes them)."""
    num_seqs = query_start_loc.shape[0] - 1
    tiles = torch.arange(num_tiles, dtype=torch.int32, device=query_start_loc.device)
    if num_seqs == 0:
        return torch.zeros_like(tiles), tiles
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    seq_tiles = (query_lens + block_m - 1) // block_m
    if not single_token_queries:
        seq_tiles = torch.where(query_lens > 1, seq_tiles, 0)
    tile_ends = torch.cumsum(seq_tiles, 0, dtype=torch.int32)
    tile_seq = torch.searchsorted(tile_ends, tiles, right=True, out_int32=True)
    first_tile = (tile_ends - seq_tiles)[tile_seq.clamp(max=num_seqs - 1)]
    return tile_seq, (tiles - first_tile) * block_m


def max_prefill_tiles(num_tokens: int, num_seqs: int, block_m: int) -> int:
    """Tiles enough for any batch of these counts: each sequence's last tile may be partial."""
    return triton.cdiv(num_tokens, block_m) + num_seqs


def prefill_block_m(num_heads: int, num_kv_heads: int) -> int:
    """About 64 (token, head) rows per tile against 32 keys, whatever the batch: one
    compiled variant per model, so no step compiles a new one. The fastest of a sweep on
    an H200 with Qwen3-0.6B's heads (benchmarks/kernels/prefill_step.py)."""
    return max(1, 64 // triton.next_power_of_2(num_heads // num_kv_heads))


def prefill_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    block_m: int | None = None,
    block_n: int = 32,
    num_warps: int | None = None,
    num_stages: int = 2,
    tile_map: tuple[torch.Tensor, ...] | None = None,
    output: torch.Tensor | None = None,
    value_scale: float = 1.0,
) -> torch.Tensor:
    """Same contract as kernels.paged_attention.paged_attention. tile_map: prefill_tile_map
    for this block_m (made here if None; a step's layers share one); rows of sequences it
    gives no tile are left as they are in `output` (made if None). value_scale: the factor
    of the cache's values (kernels.paged_attention.KVScales)."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    assert num_heads % num_kv_heads == 0 and query.stride(2) == 1 and block_tables.stride(1) == 1
    assert head_dim == triton.next_power_of_2(head_dim), "head_dim must be a power of two"
    check_cache_layout(key_cache, value_cache)
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m = block_m or prefill_block_m(num_heads, num_kv_heads)
    if output is None:
        output = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return output
    if tile_map is None:
        tile_map = prefill_tile_map(
            query_start_loc, block_m, max_prefill_tiles(num_tokens, num_seqs, block_m)
        )
    tile_seq, tile_first = tile_map
    grid = (tile_seq.shape[0], num_kv_heads)
    _prefill_kernel[grid](
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        tile_seq,
        tile_first,
        num_seqs,
        output,
        scale * _LOG2E,
        sliding_window or 0,
        (logit_softcap or 1.0) * _LOG2E,
        value_scale,
        query.stride(0),
        query.stride(1),
        output.stride(0),
        output.stride(1),
        block_tables.stride(0),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SLOT_RUN=slot_run(block_size, block_n),
        num_warps=num_warps or (4 if block_m * group_pad <= 64 else 8),
        num_stages=num_stages,
        USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=logit_softcap is not None,
        **pdl_launch(query.device),
    )
    return output
