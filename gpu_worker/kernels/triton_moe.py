"""Fused mixture-of-experts in Triton: a grouped GEMM over tokens sorted by expert.

Computes kernels.moe.fused_moe_reference. The (token, choice) pairs of a batch, T * k of
them, are sorted by expert and each expert's run is padded to a multiple of BLOCK_M, so
that every tile of BLOCK_M rows belongs to one expert: the tile multiplies its rows by
that expert's weights only, and no expert's weights are read for tokens that did not pick
it. Two launches: gate/up for every pair, then down, scaled by the pair's routing weight;
the k outputs of each token are summed last. Under SiLU the first launch also applies the
activation: each program multiplies a tile of gate columns and the matching tile of up
columns and writes silu(gate) * up, so the [pairs, 2 * I] product is never written and
read back; other activations run as a separate kernel between the two.

Every buffer is sized for the worst case (each expert's run padded by BLOCK_M - 1), so
the launch depends only on the batch size and the shapes: CUDA-graph safe.

fp8 experts (a fine-grained fp8 checkpoint's, kernels.moe.ExpertScales) are widened as
their tiles load, and each tile's product is scaled by its block's scale before it joins
the sum: the activations are not quantized.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.elementwise import GATED_ACTIVATIONS
from gpu_worker.kernels.moe import ExpertScales
from gpu_worker.kernels.triton_moe_align import align_by_expert_triton, fits_one_program


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Returns (sorted_ids, expert_of_block, num_padded): sorted_ids [max_padded] holds
    flat pair indices (token * k + choice) grouped by expert, each group padded with
    num_pairs to a multiple of block_m; expert_of_block the expert of each tile;
    num_padded [1] how many rows are in use."""
    if fits_one_program(topk_ids, num_experts):
        # Decode-sized batches: one launch instead of the twenty-odd small ones below.
        return align_by_expert_triton(topk_ids, num_experts, block_m)
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    max_padded = num_pairs + num_experts * (block_m - 1)
    # A scatter rather than bincount, whose output size depends on the data (a device sync).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded_counts.cumsum(0)
    order = torch.argsort(flat, stable=True)
    experts_in_order = flat[order]
    first_of_expert = counts.cumsum(0) - counts
    rank_in_expert = torch.arange(num_pairs, device=flat.device) - first_of_expert[experts_in_order]
    destination = (padded_ends - padded_counts)[experts_in_order] + rank_in_expert
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int64, device=flat.device)
    sorted_ids[destination] = order
    block_starts = torch.arange(0, max_padded, block_m, device=flat.device)
    expert_of_block = torch.searchsorted(padded_ends, block_starts, right=True).clamp_max(num_experts - 1)
    return sorted_ids, expert_of_block, padded_ends[-1:]


@triton.jit
def _expert_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    weights_ptr,
    sorted_ids_ptr,
    expert_of_block_ptr,
    num_padded_ptr,
    num_pairs,
    N,
    K,
    stride_am,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    b_scale_ptr,
    stride_scale_e,
    stride_scale_n,
    A_ROW_DIV: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    SILU_AND_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr,
):
    """C[pair] = A[pair // A_ROW_DIV] @ B[expert]^T (times the pair's weight), for the
    pairs of one tile of sorted rows and one tile of output columns. SILU_AND_MUL: B has
    2 * N rows, gate then up, and C[pair] = silu(A B_gate^T) * (A B_up^T). SCALE_BLOCK_N
    > 0: B is fp8 with one scale per block of [SCALE_BLOCK_N, SCALE_BLOCK_K] weights."""
    tile_m = tl.program_id(0)
    tile_n = tl.program_id(1)
    if tile_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + rows)
    valid = pairs < num_pairs
    expert = tl.load(expert_of_block_ptr + tile_m).to(tl.int64)
    a_rows = (pairs // A_ROW_DIV).to(tl.int64)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    # Under SiLU one weight tile holds the gate rows of these columns, then the up rows.
    B_COLS: tl.constexpr = BLOCK_N * (1 + SILU_AND_MUL)
    b_offsets = tl.arange(0, B_COLS)
    b_cols = tile_n * BLOCK_N + b_offsets % BLOCK_N
    b_col_valid = b_cols < N
    b_cols += (b_offsets // BLOCK_N) * N
    acc = tl.zeros([BLOCK_M, B_COLS], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_valid = ks < K
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + ks[None, :],
            mask=valid[:, None] & k_valid[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + expert * stride_be + b_cols[None, :] * stride_bn + ks[:, None] * stride_bk,
            mask=b_col_valid[None, :] & k_valid[:, None],
            other=0.0,
        )
        if SCALE_BLOCK_N > 0:
            scale_offsets = (b_cols // SCALE_BLOCK_N) * stride_scale_n + k_start // SCALE_BLOCK_K
            block_scale = tl.load(
                b_scale_ptr + expert * stride_scale_e + scale_offsets, mask=b_col_valid, other=0.0
            )
            acc += tl.dot(a, b.to(a.dtype)) * block_scale[None, :]
        else:
            acc += tl.dot(a, b)
    if SILU_AND_MUL:
        gate, up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), [0, 2, 1]))
        # Rounded where the separate kernels round: the product to the activation dtype,
        # silu(gate) to it again (kernels/triton_elementwise.py).
        gate = gate.to(c_ptr.dtype.element_ty).to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(c_ptr.dtype.element_ty)
        acc = activated.to(tl.float32) * up.to(c_ptr.dtype.element_ty).to(tl.float32)
    if MUL_WEIGHT:
        # Routing weights come in fp32; rounded to the activation dtype as the reference
        # rounds them, here rather than by a launch of its own.
        weights = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(c_ptr.dtype.element_ty)
        acc = acc * weights.to(tl.float32)[:, None]
    tl.store(
        c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + cols[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=valid[:, None] & col_valid[None, :],
    )


def moe_plan(num_pairs: int, num_experts: int) -> dict[str, int]:
    """Tile sizes of both expert GEMMs for a batch of num_pairs (token, choice) pairs.
    The row tile follows the pairs an expert gets on average: few pad few rows and read
    long slices of weights, many take tensor-core-sized tiles. Depends on the batch size
    alone, so CUDA graphs stay valid. From a sweep on an H200 with Qwen3-30B-A3B's
    experts (within 3% of the best tiles at 1 to 8,192 tokens)."""
    pairs_per_expert = num_pairs / num_experts
    if pairs_per_expert <= 16:
        return {"block_m": 16, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4}
    if pairs_per_expert <= 64:
        return {"block_m": 64, "block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 3}
    return {"block_m": 128, "block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 3}


def _expert_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    weights: torch.Tensor,
    alignment: tuple[torch.Tensor, ...],
    a_row_div: int,
    mul_weight: bool,
    plan: dict[str, int],
    silu_and_mul: bool = False,
    scale: torch.Tensor | None = None,
    scale_block: tuple[int, int] = (0, 0),
) -> None:
    """scale: b's block scales [E, rows / bn, K / bk], scale_block = (bn, bk)."""
    sorted_ids, expert_of_block, num_padded = alignment
    k = b.shape[2]
    n = b.shape[1] // 2 if silu_and_mul else b.shape[1]
    block_m, block_n = plan["block_m"], plan["block_n"]
    if silu_and_mul:
        # Two tiles of columns per program, gate and up: the accumulators and the weight
        # tiles of the plan's width, and as many programs.
        block_n //= 2
    block_k = plan["block_k"] if k >= plan["block_k"] else max(16, triton.next_power_of_2(k))
    if scale is not None:
        # A tile of inputs within one block; under SiLU the up rows start a block of their own.
        block_k = min(block_k, scale_block[1])
        assert scale_block[1] % block_k == 0 and not (silu_and_mul and n % scale_block[0])
    grid = (triton.cdiv(sorted_ids.numel(), block_m), triton.cdiv(n, block_n))
    _expert_gemm_kernel[grid](
        a,
        b,
        out,
        weights,
        sorted_ids,
        expert_of_block,
        num_padded,
        out.shape[0],
        n,
        k,
        a.stride(0),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        out.stride(0),
        scale if scale is not None else weights,
        scale.stride(0) if scale is not None else 0,
        scale.stride(1) if scale is not None else 0,
        A_ROW_DIV=a_row_div,
        MUL_WEIGHT=mul_weight,
        SILU_AND_MUL=silu_and_mul,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SCALE_BLOCK_N=scale_block[0] if scale is not None else 0,
        SCALE_BLOCK_K=scale_block[1] if scale is not None else 0,
        num_warps=plan["num_warps"],
        num_stages=plan["num_stages"],
    )


def fused_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    hidden_act: str,
    plans: tuple[dict[str, int], dict[str, int]] | None = None,
    scales: ExpertScales | None = None,
) -> torch.Tensor:
    """Same contract as kernels.moe.fused_moe_reference. plans: the gate/up and the down
    GEMM's tiles (one block_m for both), moe_plan's unless given (benchmarks sweep them).
    scales: w13 and w2 are fp8 with these block scales."""
    num_tokens, top_k = topk_ids.shape
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1
    num_pairs = num_tokens * top_k
    gate_up_plan, down_plan = plans or (moe_plan(num_pairs, w13.shape[0]),) * 2
    assert gate_up_plan["block_m"] == down_plan["block_m"], "both GEMMs read one alignment"
    alignment = align_by_expert(topk_ids, w13.shape[0], gate_up_plan["block_m"])
    weights = topk_weights.contiguous().view(-1)
    w13_scale, w2_scale, block = scales if scales is not None else (None, None, (0, 0))
    if hidden_act == "silu":
        hidden = torch.empty(num_pairs, w13.shape[1] // 2, dtype=x.dtype, device=x.device)
        _expert_gemm(x, w13, hidden, weights, alignment, top_k, False, gate_up_plan, True, w13_scale, block)
    else:
        gate_up = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)
        _expert_gemm(x, w13, gate_up, weights, alignment, top_k, False, gate_up_plan, False, w13_scale, block)
        hidden = GATED_ACTIVATIONS[hidden_act](gate_up)
    down = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    _expert_gemm(hidden, w2, down, weights, alignment, 1, True, down_plan, False, w2_scale, block)
    return down.view(num_tokens, top_k, -1).sum(dim=1)
