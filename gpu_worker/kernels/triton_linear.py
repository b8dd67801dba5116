"""Triton split-K matmul for the decode step's narrow projections: y = x W^T with few rows.

A decode step multiplies a few to a few hundred rows by each weight: it must stream every
weight in once and does little arithmetic on it. A projection with few output columns
(attention's o_proj and the MLP's down_proj: 1,024 in Qwen3-0.6B) gives a plain tiling
only a few dozen programs, too few to keep every multiprocessor's loads in flight, so the
reduction dimension is split as well and each program writes fp32 partial sums of its
slice. Nothing adds them up here: the add + RMSNorm that reads these projections sums the
partials as it loads them (kernels/elementwise.py), so the split costs no extra pass.

Programs that share a weight tile run side by side (row tiles vary fastest in the grid),
so each weight tile comes from memory once and from L2 after.

The weight may also be fp8 (e4m3) with one scale per output channel: its tiles are widened
to the activations' dtype as they load, and the scale applied to each partial sum. At a
few rows a step is bound by reading weights, and fp8 weights are half the bytes; this is
how an fp8 model decodes small batches (gpu_worker/kernels/w8a8.py). With a scale per
block of [block_out, block_in] instead (gpu_worker/kernels/block_fp8.py), each tile's
product is scaled before it joins the sum, a tile lying within one block of inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.launch import pdl_launch, wait_for_previous_kernel

# Reduction columns per loop iteration; plans split the reduction into whole tiles of it.
_BLOCK_K = 128


@triton.jit
def _partial_sums_kernel(
    x_ptr,
    weight_ptr,
    partials_ptr,
    num_rows,
    out_features,
    x_stride,
    weight_stride,
    scale_ptr,
    scale_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """HAS_SCALE: one scale per output column; SCALE_BLOCK_N > 0: one per block of
    [SCALE_BLOCK_N, SCALE_BLOCK_K] weights, scale_stride apart by rows of blocks."""
    wait_for_previous_kernel(PDL)
    row_tile = tl.program_id(0)
    col_tile = tl.program_id(1)
    split = tl.program_id(2)
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = split * K_PER_SPLIT + tl.arange(0, BLOCK_K)
    row_valid = rows < num_rows
    col_valid = cols < out_features
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * x_stride + ks[None, :]
    w_ptrs = weight_ptr + cols[:, None].to(tl.int64) * weight_stride + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in range(0, K_PER_SPLIT // BLOCK_K):
        x = tl.load(x_ptrs, mask=row_valid[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=col_valid[:, None], other=0.0).to(x.dtype)
        if SCALE_BLOCK_N > 0:
            k_block = (split * K_PER_SPLIT + step * BLOCK_K) // SCALE_BLOCK_K
            block_offsets = (cols // SCALE_BLOCK_N) * scale_stride + k_block
            block_scale = tl.load(scale_ptr + block_offsets, mask=col_valid, other=0.0)
            acc += tl.dot(x, tl.trans(w)) * block_scale[None, :]
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + cols, mask=col_valid, other=0.0)[None, :]
    out_rows = (split * num_rows + rows).to(tl.int64)
    tl.store(
        partials_ptr + out_rows[:, None] * out_features + cols[None, :],
        acc,
        mask=row_valid[:, None] & col_valid[None, :],
    )


def linear_partial_sums(
    x: torch.Tensor,
    weight: torch.Tensor,
    num_splits: int,
    block_m: int,
    block_n: int,
    block_k: int = _BLOCK_K,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """x: [M, K]; weight: [N, K]. Returns fp32 [num_splits, M, N] whose sum over the first
    dimension is x W^T; K must split into num_splits slices of whole block_k tiles."""
    return _launch(x, weight, None, num_splits, block_m, block_n, block_k, num_warps, num_stages)


def scaled_linear_partial_sums(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, plan: dict[str, int]
) -> torch.Tensor:
    """linear_partial_sums for a weight of another dtype (fp8) with weight_scale [N]
    (fp32): the partials sum to x (W * scale)^T."""
    return _launch(x, weight, weight_scale, plan["num_splits"], plan["block_m"], plan["block_n"])


def block_scaled_linear_partial_sums(
    x: torch.Tensor, weight: torch.Tensor, block_scale: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """linear_partial_sums for an fp8 weight [N, K] with block_scale [N / bn, K / bk] (fp32),
    block = (bn, bk): the partials sum to x (W * the scales over their blocks)^T."""
    plan = block_scaled_plan(x.shape[0], weight.shape[0], weight.shape[1], block[1])
    return _launch(
        x,
        weight,
        block_scale,
        plan["num_splits"],
        plan["block_m"],
        plan["block_n"],
        plan["block_k"],
        plan["num_warps"],
        plan["num_stages"],
        scale_block=block,
    )


@triton.jit
def _sum_splits_kernel(
    partials_ptr, out_ptr, numel, NUM_SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    wait_for_previous_kernel(PDL)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < numel
    total = tl.zeros([BLOCK], tl.float32)
    for split in tl.static_range(NUM_SPLITS):
        total += tl.load(partials_ptr + split * numel + offsets, mask=valid, other=0.0)
    tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=valid)


_SUM_BLOCK = 1024


def total_of(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The sum of [splits, M, N] partial sums, in `dtype`, for a consumer that cannot read
    partials itself. One launch: torch's sum and cast took two, which at a decode step of
    a 4-bit model (four projections a layer) cost a tenth of the step."""
    num_splits = partials.shape[0]
    if num_splits == 1 and partials.dtype == dtype:
        return partials[0]
    partials = partials.contiguous()
    out = torch.empty(partials.shape[1:], dtype=dtype, device=partials.device)
    numel = out.numel()
    _sum_splits_kernel[(triton.cdiv(numel, _SUM_BLOCK),)](
        partials,
        out,
        numel,
        NUM_SPLITS=num_splits,
        BLOCK=_SUM_BLOCK,
        num_warps=4,
        **pdl_launch(partials.device),
    )
    return out


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    num_splits: int,
    block_m: int,
    block_n: int,
    block_k: int = _BLOCK_K,
    num_warps: int = 4,
    num_stages: int = 4,
    scale_block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """scale_block: weight_scale holds a scale per block of that shape, not per column."""
    num_rows, in_features = x.shape
    out_features = weight.shape[0]
    assert weight.shape[1] == in_features and in_features % (num_splits * block_k) == 0
    assert x.stride(1) == 1 and weight.stride(1) == 1
    partials = torch.empty(num_splits, num_rows, out_features, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(out_features, block_n), num_splits)
    _partial_sums_kernel[grid](
        x,
        weight,
        partials,
        num_rows,
        out_features,
        x.stride(0),
        weight.stride(0),
        weight_scale if weight_scale is not None else partials,
        weight_scale.stride(0) if scale_block is not None and weight_scale is not None else 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        K_PER_SPLIT=in_features // num_splits,
        HAS_SCALE=weight_scale is not None and scale_block is None,
        SCALE_BLOCK_N=scale_block[0] if scale_block is not None else 0,
        SCALE_BLOCK_K=scale_block[1] if scale_block is not None else 0,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch(x.device),
    )
    return partials


# Past this many rows a plain tiling has programs enough, and cuBLAS is as fast.
MAX_SPLIT_K_ROWS = 128
_TARGET_PROGRAMS = 128
_MAX_SPLITS = 8


def split_k_plan(num_rows: int, out_features: int, in_features: int) -> dict[str, int] | None:
    """Launch parameters of linear_partial_sums for this shape, or None where a plain
    matmul is the better choice. Depends on the shape alone, so CUDA graphs stay valid."""
    if num_rows > MAX_SPLIT_K_ROWS or in_features % _BLOCK_K:
        return None
    block_m = min(64, max(16, triton.next_power_of_2(num_rows)))
    block_n = 32
    tiles = triton.cdiv(num_rows, block_m) * triton.cdiv(out_features, block_n)
    k_tiles = in_features // _BLOCK_K
    # The fewest splits into whole tiles that make programs enough, at most _MAX_SPLITS.
    splits = [s for s in range(1, min(k_tiles, _MAX_SPLITS) + 1) if k_tiles % s == 0]
    num_splits = next((s for s in splits if tiles * s >= _TARGET_PROGRAMS), splits[-1])
    return {"num_splits": num_splits, "block_m": block_m, "block_n": block_n}


def block_scaled_plan(num_rows: int, out_features: int, in_features: int, block_in: int) -> dict[str, int]:
    """Launch parameters of block_scaled_linear_partial_sums: split_k_plan's at few rows,
    one slice of wide tiles past them; tiles of at most 128 inputs that lie within one
    block. Depends on the shape alone, so CUDA graphs stay valid. The wide tiles' warps
    and stages are chosen from their sm_90 code (147 registers, 112 KB of shared memory:
    two programs a multiprocessor), not yet from timings."""
    block_k = min(_BLOCK_K, block_in)
    assert block_in % block_k == 0 and in_features % block_k == 0, "inputs in whole blocks"
    narrow = {"block_k": block_k, "num_warps": 4, "num_stages": 4}
    if block_k == _BLOCK_K and (plan := split_k_plan(num_rows, out_features, in_features)) is not None:
        return {**plan, **narrow}
    if num_rows <= MAX_SPLIT_K_ROWS:
        return {"num_splits": 1, "block_m": 16, "block_n": 64, **narrow}
    return {
        "num_splits": 1,
        "block_m": 64,
        "block_n": 128,
        "block_k": block_k,
        "num_warps": 8,
        "num_stages": 3,
    }
