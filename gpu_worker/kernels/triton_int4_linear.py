"""Triton dequantize-GEMM for 4-bit weights with few rows (decode): y = x W^T where W is
in kernels/int4_linear.py's common layout.

Each program owns a tile of output columns and of rows and walks the input dimension:
it loads packed int32 words (eight weights each), their groups' scales and zeros by
g_idx (which covers GPTQ act_order without reordering anything), dequantizes the tile in
registers and multiplies it at once, so the weight crosses memory as 4-bit values only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.launch import pdl_launch, wait_for_previous_kernel
from gpu_worker.kernels.triton_linear import total_of


@triton.jit
def _int4_gemm_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    out_ptr,
    num_rows,
    out_features,
    in_features,
    x_stride,
    qweight_stride,
    group_stride,
    out_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row_tile = tl.program_id(1)
    col_tile = tl.program_id(0)
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < num_rows
    col_valid = cols < out_features
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(0, in_features, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_valid = ks < in_features
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * x_stride + ks[None, :],
            mask=row_valid[:, None] & k_valid[None, :],
            other=0.0,
        )
        tile_mask = k_valid[:, None] & col_valid[None, :]
        packed = tl.load(
            qweight_ptr + (ks[:, None] // 8).to(tl.int64) * qweight_stride + cols[None, :],
            mask=tile_mask,
            other=0,
        )
        values = (packed >> ((ks[:, None] % 8) * 4)) & 0xF
        groups = tl.load(g_idx_ptr + ks, mask=k_valid, other=0).to(tl.int64)
        group_offsets = groups[:, None] * group_stride + cols[None, :]
        scales = tl.load(scales_ptr + group_offsets, mask=tile_mask, other=0.0)
        zeros = tl.load(zeros_ptr + group_offsets, mask=tile_mask, other=0.0)
        weight = (values.to(tl.float32) - zeros.to(tl.float32)) * scales.to(tl.float32)
        acc = tl.dot(x, weight.to(x.dtype), acc)
    out_offsets = rows[:, None].to(tl.int64) * out_stride + cols[None, :]
    tl.store(
        out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :]
    )


def int4_linear_triton(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """x [rows, in]; returns [rows, out] in x's dtype. The weight tensors' rows must be
    contiguous (the kernel steps along them by one)."""
    x = x.contiguous()
    if qweight.stride(1) != 1 or scales.stride(1) != 1 or zeros.stride(0) != scales.stride(0):
        raise ValueError("int4_linear_triton: qweight, scales and zeros must be contiguous")
    num_rows, in_features = x.shape
    out_features = qweight.shape[1]
    out = torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device)
    # tl.dot needs 16 rows at least; decode batches pad up to that inside the tile.
    block_m = max(16, min(64, triton.next_power_of_2(num_rows)))
    block_n, block_k = 64, 64
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(num_rows, block_m))
    _int4_gemm_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        g_idx,
        out,
        num_rows,
        out_features,
        in_features,
        x.stride(0),
        qweight.stride(0),
        scales.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out


@triton.jit
def _int4_split_k_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    partials_ptr,
    num_rows,
    out_features,
    x_stride,
    qweight_stride,
    group_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    col_tile = tl.program_id(0)
    row_tile = tl.program_id(1)
    split = tl.program_id(2)
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < num_rows
    col_valid = cols < out_features
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in range(0, K_PER_SPLIT // BLOCK_K):
        k_start = split * K_PER_SPLIT + step * BLOCK_K
        # Each int32 word is read once and opened into its eight values along k.
        words = k_start // 8 + tl.arange(0, BLOCK_K // 8)
        packed = tl.load(
            qweight_ptr + words[:, None].to(tl.int64) * qweight_stride + cols[None, :],
            mask=col_valid[None, :],
            other=0,
        )
        values = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, [BLOCK_K, BLOCK_N])
        # The tile lies within one group: one scale and one zero per column.
        group_offsets = (k_start // GROUP_SIZE) * group_stride + cols
        scales = tl.load(scales_ptr + group_offsets, mask=col_valid, other=0.0).to(tl.float32)
        zeros = tl.load(zeros_ptr + group_offsets, mask=col_valid, other=0.0).to(tl.float32)
        weight = (values.to(tl.float32) - zeros[None, :]) * scales[None, :]
        ks = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * x_stride + ks[None, :], mask=row_valid[:, None], other=0.0
        )
        acc = tl.dot(x, weight.to(x.dtype), acc)
    out_rows = (split * num_rows + rows).to(tl.int64)
    tl.store(
        partials_ptr + out_rows[:, None] * out_features + cols[None, :],
        acc.to(partials_ptr.dtype.element_ty),
        mask=row_valid[:, None] & col_valid[None, :],
    )


# Rows up to which int4_linear_grouped_triton runs: one tile of rows. On an
# H200 with Llama-3.1-8B's projections, a layer's four took 0.19 ms at 32 rows and 0.26 at
# 64 against 0.32 dequantized for cuBLAS; at 128 rows, two tiles, 0.49 against 0.38.
MAX_SPLIT_K_ROWS = 64
# Programs that keep an H200's 132 multiprocessors loading (a few per multiprocessor).
_TARGET_PROGRAMS = 528
_MAX_SPLITS = 16


def grouped_split_k_block(in_features: int, group_size: int) -> int | None:
    """The reduction tile for a weight whose groups follow the input order, or None where
    no tile both stays within a group and divides the input features."""
    block_k = min(128, group_size)
    if block_k < 16 or group_size % block_k or in_features % block_k:
        return None
    return block_k


def int4_split_k_plan(
    out_features: int, in_features: int, group_size: int, num_rows: int = 1
) -> dict[str, int] | None:
    """Launch parameters of int4_linear_grouped_triton for this shape (None: it cannot tile
    it): the input split into the fewest slices that make programs enough, and one tile of
    rows up to 64 of them, since each tile of rows opens every weight again. Depends on the
    shape alone, so CUDA graphs stay valid. Chosen by a sweep on an H200 with
    Llama-3.1-8B's projections, where it is within 10% of each shape's best at 1-16 rows."""
    block_k = grouped_split_k_block(in_features, group_size)
    if block_k is None:
        return None
    # tl.dot needs 16 rows at least; fewer are padded inside the tile.
    block_m = min(MAX_SPLIT_K_ROWS, max(16, triton.next_power_of_2(num_rows)))
    block_n = 128
    num_splits = fewest_splits(triton.cdiv(out_features, block_n), in_features // block_k, _TARGET_PROGRAMS)
    return {
        "block_m": block_m,
        "block_k": block_k,
        "block_n": block_n,
        "num_splits": num_splits,
        "num_warps": 4,
        "num_stages": 4,
    }


def fewest_splits(col_tiles: int, k_tiles: int, target_programs: int) -> int:
    """The fewest slices of the input (a divisor of its tiles, at most _MAX_SPLITS) that
    make target_programs programs with col_tiles column tiles; the most where none does."""
    splits = [s for s in range(1, min(k_tiles, _MAX_SPLITS) + 1) if k_tiles % s == 0]
    return next((s for s in splits if col_tiles * s >= target_programs), splits[-1])


def int4_linear_grouped_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    plan: dict[str, int] | None = None,
) -> torch.Tensor:
    """int4_linear_triton for groups in input order (g_idx = k // group_size: AWQ, and
    GPTQ without act_order), split along the input dimension as the bf16 and fp8 decode
    projections are (kernels/triton_linear.py), so that a few rows keep every
    multiprocessor loading; each tile takes its group's scale and zero once per column.
    plan: int4_split_k_plan's parameters, or others (benchmarks sweep them)."""
    x = x.contiguous()
    num_rows, in_features = x.shape
    out_features = qweight.shape[1]
    plan = plan or int4_split_k_plan(out_features, in_features, group_size, num_rows)
    if plan is None or qweight.stride(1) != 1 or scales.stride(1) != 1 or zeros.stride(0) != scales.stride(0):
        raise ValueError("int4_linear_grouped_triton: groups or layout it cannot tile")
    num_splits = plan["num_splits"]
    # One slice writes the result itself; several write fp32 partials, summed after.
    out_dtype = x.dtype if num_splits == 1 else torch.float32
    partials = torch.empty(num_splits, num_rows, out_features, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(out_features, plan["block_n"]), triton.cdiv(num_rows, plan["block_m"]), num_splits)
    _int4_split_k_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        partials,
        num_rows,
        out_features,
        x.stride(0),
        qweight.stride(0),
        scales.stride(0),
        BLOCK_M=plan["block_m"],
        BLOCK_N=plan["block_n"],
        BLOCK_K=plan["block_k"],
        K_PER_SPLIT=in_features // num_splits,
        GROUP_SIZE=group_size,
        num_warps=plan["num_warps"],
        num_stages=plan["num_stages"],
        **pdl_launch(x.device),
    )
    return total_of(partials, x.dtype)
