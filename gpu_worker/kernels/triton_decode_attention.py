"""Triton paged attention for decode steps (one query token per sequence), GQA-aware and
split along the context.

Computes what kernels.paged_attention.paged_attention computes when every sequence has
exactly one query token. One program handles one (sequence, KV head, context split): it
loads each KV tile once for all the query heads that share it (the group is padded to the
16 rows a tensor-core dot needs), and keeps an online softmax. When there is more than one
split, each writes its partial output and log-sum-exp and a second kernel merges them.

Everything that shapes the launch depends only on the batch size, never on context
lengths (each program reads its sequence's length from device memory), so a launch can be
captured once in a CUDA graph and replayed for any contexts. A sequence of length 0 is a
padding row: its output is zeros.

In a mixed batch (query_start_loc given) the kernel computes the sequences with exactly one
query token, reading each one's row from query_start_loc, and leaves every other row to
the paged prefill kernel (kernels/triton_prefill_attention.py): there a decode would take
a whole tile of query rows and walk its context alone, 32 keys at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.launch import pdl_launch, wait_for_previous_kernel
from gpu_worker.kernels.paged_attention import check_cache_layout
from gpu_worker.kernels.triton_attention_options import soft_cap
from gpu_worker.kernels.triton_paged_kv import in_operand_dtype, load_kv_tile, slot_run

# Enough programs to occupy every multiprocessor about twice is where splitting stops
# paying; more splits only add merge work.
_TARGET_PROGRAMS = 264
_MAX_SPLITS = 16
_LOG2E = 1.4426950408889634
# e4m3's largest finite value, to which each head's query is scaled.
_E4M3_MAX = tl.constexpr(448.0)
# The probabilities (at most 1) times this before they become e4m3: weights down to 2^-14
# keep e4m3's full 3-bit mantissa, where unscaled only those above 2^-6 would.
_PROBS_SCALE = tl.constexpr(256.0)


# Eager steps pass a block table as wide as the batch's longest sequence needs, which
# changes from step to step; specializing on it would compile a new variant mid-run.
@triton.jit(do_not_specialize=["block_table_stride"])
def _decode_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    output_ptr,
    partial_output_ptr,
    partial_lse_ptr,
    scale_log2,
    window,
    softcap_log2,
    value_scale,
    query_token_stride,
    query_head_stride,
    block_table_stride,
    output_token_stride,
    output_head_stride,
    cache_block_stride,
    cache_slot_stride,
    cache_head_stride,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLOT_RUN: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    MIXED: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    FP8_PRODUCTS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    # Where a tile's keys lie in its scores: their second axis, or their first under
    # FP8_PRODUCTS, whose products are transposed.
    KEY_AXIS: tl.constexpr = 0 if FP8_PRODUCTS else 1
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row = _query_row(query_start_loc_ptr, seq, MIXED)
    if row < 0:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    group_rows = tl.arange(0, GROUP_PAD)
    row_valid = group_rows < GROUP
    heads = kv_head * GROUP + group_rows
    dims = tl.arange(0, HEAD_DIM)
    query = tl.load(
        query_ptr + row * query_token_stride + heads[:, None] * query_head_stride + dims[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )
    if FP8_PRODUCTS:
        query, score_scale = _fp8_query(query, key_cache_ptr.dtype.element_ty, scale_log2)
        acc = tl.zeros([HEAD_DIM, GROUP_PAD], tl.float32)
    else:
        query = in_operand_dtype(query, key_cache_ptr)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)

    row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([GROUP_PAD], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    window_start = 0
    if USE_WINDOW:
        # The query sits at seq_len - 1 and sees the `window` positions up to it; the
        # splits before the window stay empty, and tiles keep starting at multiples of
        # BLOCK_N (load_kv_tile's promise), so the window's first tile is masked.
        window_start = tl.maximum(seq_len - window, 0)
        start = tl.maximum(start, window_start // BLOCK_N * BLOCK_N)
    for tile_start in range(start, end, BLOCK_N):
        keys, values, positions, visible = load_kv_tile(
            key_cache_ptr,
            value_cache_ptr,
            block_table,
            tile_start,
            window_start,
            end,
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
        if USE_WINDOW:
            visible &= positions >= window_start
        if FP8_PRODUCTS:
            scores = tl.dot(keys, query) * score_scale[None, :]
        else:
            # In the dtype of in_operand_dtype's query (a no-op for a cache of the model's dtype).
            keys, values = keys.to(query.dtype), values.to(query.dtype)
            scores = tl.dot(query, tl.trans(keys)).to(tl.float32) * scale_log2
        if USE_SOFTCAP:
            scores = soft_cap(scores, softcap_log2)
        scores = tl.where(tl.expand_dims(visible, 1 - KEY_AXIS), scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=KEY_AXIS))
        probs = tl.exp2(scores - tl.expand_dims(new_max, KEY_AXIS))
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(probs, axis=KEY_AXIS)
        if FP8_PRODUCTS:
            weighted = tl.dot(tl.trans(values), (probs * _PROBS_SCALE).to(values.dtype))
        else:
            weighted = tl.dot(probs.to(values.dtype), values).to(tl.float32)
        acc = acc * tl.expand_dims(correction, KEY_AXIS) + weighted
        row_max = new_max

    if FP8_PRODUCTS:
        acc = tl.trans(acc) * (1.0 / _PROBS_SCALE)
    # An empty split (or a padding row) leaves row_sum at 0: its output is 0, its weight 0.
    safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
    # value_scale: what the cache's values were divided by as they were stored.
    out = acc / safe_sum[:, None] * value_scale
    if NUM_SPLITS == 1:
        tl.store(
            output_ptr + row * output_token_stride + heads[:, None] * output_head_stride + dims[None, :],
            out.to(output_ptr.dtype.element_ty),
            mask=row_valid[:, None],
        )
    else:
        # Partial results are [num_seqs, num_heads, NUM_SPLITS, (HEAD_DIM)], fp32.
        lse = tl.where(row_sum > 0, row_max + tl.log2(safe_sum), float("-inf"))
        partial_rows = (seq * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split
        tl.store(
            partial_output_ptr + partial_rows[:, None] * HEAD_DIM + dims[None, :],
            out,
            mask=row_valid[:, None],
        )
        tl.store(partial_lse_ptr + partial_rows, lse, mask=row_valid)


@triton.jit
def _fp8_query(query, fp8_dtype, scale_log2):
    """The query as the fp8 operand of keys @ query, [HEAD_DIM, GROUP_PAD], each head
    scaled to e4m3's range, and each head's factor from those products to log2 scores.
    The tensor cores then take the fp8 keys and values as they were copied, and the
    probabilities rounded to e4m3 too, as FlashAttention-3's fp8 path does: on sm_90 a
    quarter fewer instructions a tile than widening each key and value to fp16 first."""
    query = query.to(tl.float32)
    absmax = tl.max(tl.abs(query), axis=1)
    head_scale = tl.where(absmax > 0, absmax / _E4M3_MAX, 1.0)
    return tl.trans((query / head_scale[:, None]).to(fp8_dtype)), head_scale * scale_log2


@triton.jit
def _query_row(query_start_loc_ptr, seq, MIXED: tl.constexpr):
    """The sequence's query row; -1 in a mixed batch where it has other than one query
    token (the prefill kernel's to compute)."""
    if MIXED:
        row = tl.load(query_start_loc_ptr + seq)
        if tl.load(query_start_loc_ptr + seq + 1) - row != 1:
            row = -1
    else:
        row = seq
    return row


@triton.jit
def _merge_splits_kernel(
    partial_output_ptr,
    partial_lse_ptr,
    query_start_loc_ptr,
    output_ptr,
    output_token_stride,
    output_head_stride,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    MIXED: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    query_row = _query_row(query_start_loc_ptr, seq, MIXED)
    if query_row < 0:
        return
    row = seq * tl.num_programs(1) + head
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(partial_lse_ptr + row * NUM_SPLITS + splits)
    max_lse = tl.max(lse, axis=0)
    # All splits empty (padding row): every weight is 0 and so is the output.
    safe_max = tl.where(max_lse == float("-inf"), 0.0, max_lse)
    weights = tl.exp2(lse - safe_max)
    total = tl.sum(weights, axis=0)
    weights = weights / tl.where(total > 0, total, 1.0)
    partial = tl.load(partial_output_ptr + (row * NUM_SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :])
    out = tl.sum(partial * weights[:, None], axis=0)
    tl.store(
        output_ptr + query_row * output_token_stride + head * output_head_stride + dims,
        out.to(output_ptr.dtype.element_ty),
    )


# Keys per tile: larger tiles cost fewer loop iterations per byte, which pays once there
# are sequences enough to fill the device without splitting them (an H200 sweep of ragged
# 200-2,000-token contexts: 128 keys 3-4% faster at 128 and 256 sequences, 10% slower at 32).
# An fp8 cache's tiles are half the bytes, and there 128 keys are as fast or faster at every
# batch (an H100 sweep of the same contexts: 3-18% from 16 to 127 sequences, the 8B
# workload through gRPC 0.9% faster).
_LARGE_TILE_MIN_SEQS = 128


def choose_block_n(num_seqs: int, cache_dtype: torch.dtype) -> int:
    """Keys per tile: a function of the batch size and the cache's dtype alone, so graphs
    stay valid."""
    if cache_dtype.itemsize == 1 or num_seqs >= _LARGE_TILE_MIN_SEQS:
        return 128
    return 64


def choose_num_splits(num_seqs: int, num_kv_heads: int) -> int:
    """Splits per sequence: a function of the batch shape alone, so graphs stay valid."""
    programs = max(num_seqs * num_kv_heads, 1)
    splits = triton.cdiv(_TARGET_PROGRAMS, programs)
    return min(triton.next_power_of_2(splits), _MAX_SPLITS)


def _split_buffers(output: torch.Tensor, num_seqs: int, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each split's fp32 partial output and log-sum-exp, merged by a second kernel; with one
    split the kernel writes the output directly and these are unused."""
    if num_splits == 1:
        return output, output
    _, num_heads, head_dim = output.shape
    partial_output = torch.empty(
        num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=output.device
    )
    partial_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=output.device)
    return partial_output, partial_lse


def decode_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    query_start_loc: torch.Tensor | None = None,
    output: torch.Tensor | None = None,
    fp8_products: bool = False,
    value_scale: float = 1.0,
) -> torch.Tensor:
    """query: [num_seqs, num_heads, head_dim], one token per sequence; the caches, block tables, seq_lens,
    sliding_window and logit_softcap as in kernels.paged_attention. Returns [num_seqs, num_heads, head_dim].
    fp8_products: over an fp8 cache, multiply in e4m3 (_fp8_query); value_scale: the factor of the cache's
    values (kernels.paged_attention.KVScales). A mixed batch passes query_start_loc: query is then
    [num_tokens, num_heads, head_dim], and only its single-token sequences' rows are written, into output."""
    num_heads, head_dim = query.shape[1:]
    num_seqs = seq_lens.shape[0]
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    assert cache_head_dim == head_dim and num_heads % num_kv_heads == 0
    assert head_dim == triton.next_power_of_2(head_dim), "head_dim must be a power of two"
    assert query.stride(2) == 1 and block_tables.stride(1) == 1
    assert key_cache.dtype.itemsize == 1 or not fp8_products, "fp8 products need an fp8 cache"
    check_cache_layout(key_cache, value_cache)
    group = num_heads // num_kv_heads
    num_splits = num_splits or choose_num_splits(num_seqs, num_kv_heads)
    block_n = block_n or choose_block_n(num_seqs, key_cache.dtype)
    output = torch.empty_like(query) if output is None else output
    if num_seqs == 0:
        return output
    # Unread unless mixed; a tensor all the same, as the kernels take a pointer.
    row_starts = query_start_loc if query_start_loc is not None else seq_lens
    partial_output, partial_lse = _split_buffers(output, num_seqs, num_splits)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        row_starts,
        output,
        partial_output,
        partial_lse,
        scale * _LOG2E,
        sliding_window or 0,
        (logit_softcap or 1.0) * _LOG2E,
        value_scale,
        query.stride(0),
        query.stride(1),
        block_tables.stride(0),
        output.stride(0),
        output.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        SLOT_RUN=slot_run(block_size, block_n),
        NUM_SPLITS=num_splits,
        MIXED=query_start_loc is not None,
        num_warps=num_warps,
        num_stages=num_stages,
        USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=logit_softcap is not None,
        FP8_PRODUCTS=fp8_products,
        **pdl_launch(query.device),
    )
    if num_splits > 1:
        _merge_splits(partial_output, partial_lse, row_starts, output, query_start_loc is not None)
    return output


def _merge_splits(
    partial_output: torch.Tensor,
    partial_lse: torch.Tensor,
    row_starts: torch.Tensor,
    output: torch.Tensor,
    mixed: bool,
) -> None:
    num_seqs, num_heads, num_splits, head_dim = partial_output.shape
    # Launched in plain stream order: launched early (kernels/launch.py), its programs
    # would wait beside the decode kernel's last wave, and 16-sequence decode steps took
    # 8% longer so (H200).
    _merge_splits_kernel[(num_seqs, num_heads)](
        partial_output,
        partial_lse,
        row_starts,
        output,
        output.stride(0),
        output.stride(1),
        HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits,
        MIXED=mixed,
    )
