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
