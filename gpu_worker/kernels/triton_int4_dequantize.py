"""Triton dequantization of a 4-bit weight (kernels/int4_linear.py's layout) into the
activation dtype, for the rows that multiply it with cuBLAS afterwards.

Many rows make the product a GEMM whose FLOPs, not its bytes, are the cost, where the
4-bit kernels would open every weight once per tile of rows. One pass here reads the
4-bit weight and writes it widened ([in, out], the packed layout's order, so that each
program reads and writes whole rows of columns); cuBLAS then multiplies as for bf16.
Any g_idx (GPTQ's act_order included): each input row looks up its group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_K = 64
_BLOCK_N = 128


@triton.jit
def _dequantize_int4_kernel(
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    out_ptr,
    in_features,
    out_features,
    qweight_stride,
    group_stride,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_valid = ks < in_features
    mask = k_valid[:, None] & (cols < out_features)[None, :]
    words = tl.load(
        qweight_ptr + (ks // 8).to(tl.int64)[:, None] * qweight_stride + cols[None, :], mask=mask, other=0
    )
    values = (words >> ((ks % 8) * 4)[:, None]) & 0xF
    groups = tl.load(g_idx_ptr + ks, mask=k_valid, other=0)
    group_offsets = groups.to(tl.int64)[:, None] * group_stride + cols[None, :]
    scales = tl.load(scales_ptr + group_offsets, mask=mask, other=0.0)
    zeros = tl.load(zeros_ptr + group_offsets, mask=mask, other=0.0)
    # As the reference rounds: the subtraction and the product each in the scales' dtype.
    weight = ((values.to(scales.dtype) - zeros) * scales).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + ks.to(tl.int64)[:, None] * out_features + cols[None, :], weight, mask=mask)


def dequantize_int4_triton(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The weight as [in, out] in `dtype` (its transpose is int4_linear.dequantize_int4's
    [out, in]); scales and zeros [groups, out] with the same row stride."""
    in_features, out_features = g_idx.shape[0], qweight.shape[1]
    if qweight.stride(1) != 1 or scales.stride(1) != 1 or zeros.stride(0) != scales.stride(0):
        raise ValueError("dequantize_int4_triton: qweight, scales and zeros need contiguous columns")
    out = torch.empty(in_features, out_features, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(in_features, _BLOCK_K), triton.cdiv(out_features, _BLOCK_N))
    _dequantize_int4_kernel[grid](
        qweight,
        scales,
        zeros,
        g_idx,
        out,
        in_features,
        out_features,
        qweight.stride(0),
        scales.stride(0),
        BLOCK_K=_BLOCK_K,
        BLOCK_N=_BLOCK_N,
        num_warps=4,
    )
    return out
