"""Triton kernel that prepares a step's attention inputs in one pass: per-head RMSNorm of
queries and keys (Qwen3), rotary embedding of both, and keys and values written to their
cache slots.

Computes what kernels.elementwise.qk_norm_rope_reference followed by
kernels.paged_attention.store_kv computes, with the same rounding points, so the two
agree to the last bit or two. One program handles one head of one token (decode) or of a
block of tokens (prefill), and the programs of key heads also move their value heads: one
kernel per layer for all of this. Padding tokens (slot -1) write nothing to the cache,
which is what lets a CUDA graph captured for a larger batch run a smaller one; their
rotated queries and keys are left unwritten, as nothing reads them, so that the padding
rows of a graph's step cost a slot load and no more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.launch import pdl_launch, wait_for_previous_kernel
from gpu_worker.kernels.paged_attention import UNSCALED, KVScales, check_cache_layout


@triton.jit
def _load_norm_and_rotate(
    source, valid, weight_ptr, cos, sin, eps, HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr
):
    """source: [tokens, HEAD_DIM / 2] pointers to the first half of one head, the second
    half HEAD_DIM / 2 further. Returns the rotated halves in fp32, from inputs rounded where
    the reference rounds."""
    HALF: tl.constexpr = HEAD_DIM // 2
    x1 = tl.load(source, mask=valid, other=0.0)
    x2 = tl.load(source + HALF, mask=valid, other=0.0)
    if HAS_NORM:
        half = tl.arange(0, HALF)
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        rstd = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / HEAD_DIM + eps)[:, None]
        w1 = tl.load(weight_ptr + half).to(tl.float32)[None, :]
        w2 = tl.load(weight_ptr + HALF + half).to(tl.float32)[None, :]
        x1 = ((a * rstd).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype)
        x2 = ((b * rstd).to(x2.dtype).to(tl.float32) * w2).to(x2.dtype)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    return a * cos - b * sin, b * cos + a * sin


# A step's token count changes from step to step; specializing on it (divisible by 16 or
# not) would compile a new variant mid-run, the first time a prefill of each kind comes.
@triton.jit(do_not_specialize=["num_tokens"])
def _rope_store_kernel(
    query_ptr,
    key_ptr,
    value_ptr,
    positions_ptr,
    slot_mapping_ptr,
    cos_sin_ptr,
    q_weight_ptr,
    k_weight_ptr,
    query_out_ptr,
    key_out_ptr,
    key_cache_ptr,
    value_cache_ptr,
    num_tokens,
    query_token_stride,
    key_token_stride,
    value_token_stride,
    eps,
    key_scale_inv,
    value_scale_inv,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_NORM: tl.constexpr,
    KEEP_KEY: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    ROW: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
    half = tl.arange(0, HALF)[None, :]
    valid = (tokens < num_tokens)[:, None]
    rows = tokens.to(tl.int64)[:, None]
    slots = tl.load(slot_mapping_ptr + rows, mask=valid, other=-1).to(tl.int64)
    if tl.max(slots) < 0:
        return
    positions = tl.load(positions_ptr + rows, mask=valid, other=0).to(tl.int64)
    cos = tl.load(cos_sin_ptr + positions * HEAD_DIM + half, mask=valid, other=0.0)
    sin = tl.load(cos_sin_ptr + positions * HEAD_DIM + HALF + half, mask=valid, other=0.0)
    if head < NUM_HEADS:
        source = query_ptr + rows * query_token_stride + head * HEAD_DIM + half
        out1, out2 = _load_norm_and_rotate(source, valid, q_weight_ptr, cos, sin, eps, HEAD_DIM, HAS_NORM)
        target = query_out_ptr + (rows * NUM_HEADS + head) * HEAD_DIM + half
        tl.store(target, out1.to(query_out_ptr.dtype.element_ty), mask=valid)
        tl.store(target + HALF, out2.to(query_out_ptr.dtype.element_ty), mask=valid)
    else:
        kv_head = head - NUM_HEADS
        key_source = key_ptr + rows * key_token_stride + kv_head * HEAD_DIM + half
        rotated1, rotated2 = _load_norm_and_rotate(
            key_source, valid, k_weight_ptr, cos, sin, eps, HEAD_DIM, HAS_NORM
        )
        if KEEP_KEY:
            key_target = key_out_ptr + (rows * NUM_KV_HEADS + kv_head) * HEAD_DIM + half
            tl.store(key_target, rotated1.to(key_out_ptr.dtype.element_ty), mask=valid)
            tl.store(key_target + HALF, rotated2.to(key_out_ptr.dtype.element_ty), mask=valid)
        fp8_cache = value_cache_ptr.dtype.element_ty.is_fp8()
        if fp8_cache:
            # Over the layer's scales (kernels/paged_attention.py's KVScales).
            rotated1 *= key_scale_inv
            rotated2 *= key_scale_inv
        # Rounded to the cache's element: the model's dtype, or fp8 (--kv-cache-dtype).
        key1 = rotated1.to(key_cache_ptr.dtype.element_ty)
        key2 = rotated2.to(key_cache_ptr.dtype.element_ty)
        stored = valid & (slots >= 0)
        cache_slot = slots * ROW + kv_head * HEAD_DIM
        tl.store(key_cache_ptr + cache_slot + half, key1, mask=stored)
        tl.store(key_cache_ptr + cache_slot + HALF + half, key2, mask=stored)
        dims = tl.arange(0, HEAD_DIM)[None, :]
        value = tl.load(value_ptr + rows * value_token_stride + kv_head * HEAD_DIM + dims, mask=stored)
        # The attention kernels read an fp8 cache's values a whole block at a time,
        # weighting the slots past a sequence's end by zero: a non-finite value left there
        # by an earlier owner of the block would turn that zero into NaN, so none is stored
        # (in any cache: one rule for every store).
        finite = tl.abs(value.to(tl.float32)) < float("inf")
        value = tl.where(finite, value, 0.0).to(tl.float32)
        if fp8_cache:
            value *= value_scale_inv
        value = value.to(value_cache_ptr.dtype.element_ty)
        if fp8_cache:
            # An fp8 cache's values are [block, head, dim, slot] (kernels/paged_attention.py).
            value_slot = (
                (slots // BLOCK_SIZE) * (BLOCK_SIZE * ROW)
                + kv_head * (HEAD_DIM * BLOCK_SIZE)
                + slots % BLOCK_SIZE
            )
            tl.store(value_cache_ptr + value_slot + dims * BLOCK_SIZE, value, mask=stored)
        else:
            tl.store(value_cache_ptr + cache_slot + dims, value, mask=stored)


# Tokens per program: one in decode steps, so that a small batch still spreads over many
# programs; more in prefills, so that a long one is not a hundred thousand tiny programs.
def _tokens_per_program(num_tokens: int) -> int:
    return 1 if num_tokens <= 512 else 16


def rope_store_triton(
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
    """query: [T, H, D]; key, value: [T, H_kv, D] (token rows may be strided, as views of
    a fused qkv projection; heads contiguous); cos_sin_cache: [max_position, D] fp32, cos
    then sin; caches in kernels/paged_attention.py's layout, contiguous; an fp8 cache takes
    keys and values divided by kv_scales. Returns the rotated queries, contiguous, and the
    rotated keys if keep_key (else None), unscaled."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    for tensor in (query, key, value):
        assert tensor.stride(2) == 1 and tensor.stride(1) == head_dim, "heads must be contiguous"
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous()
    check_cache_layout(key_cache, value_cache)
    assert key.dtype == key_cache.dtype or key_cache.dtype == torch.float8_e4m3fn, (
        "the store casts to fp8 caches only: project in the cache dtype"
    )
    has_norm = q_weight is not None and k_weight is not None
    query_out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    key_out = (
        torch.empty(num_tokens, num_kv_heads, head_dim, dtype=key.dtype, device=key.device)
        if keep_key
        else None
    )
    if num_tokens == 0:
        return query_out, key_out
    block_t = _tokens_per_program(num_tokens)
    _rope_store_kernel[(triton.cdiv(num_tokens, block_t), num_heads + num_kv_heads)](
        query,
        key,
        value,
        positions,
        slot_mapping,
        cos_sin_cache,
        q_weight if has_norm else cos_sin_cache,
        k_weight if has_norm else cos_sin_cache,
        query_out,
        key_out if keep_key else query_out,
        key_cache,
        value_cache,
        num_tokens,
        query.stride(0),
        key.stride(0),
        value.stride(0),
        eps,
        1.0 / kv_scales.key,
        1.0 / kv_scales.value,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=key_cache.shape[1],
        BLOCK_T=block_t,
        HAS_NORM=has_norm,
        KEEP_KEY=keep_key,
        num_warps=1 if block_t == 1 else 4,
        **pdl_launch(query.device),
    )
    return query_out, key_out
