"""Triton forms of the per-token ops in kernels/elementwise.py: residual-add + RMSNorm and
SiLU-and-mul (per-head RMSNorm + rotary embedding is fused with the KV store, in
kernels/triton_rope_store.py).

Each reproduces its reference's rounding points (where the reference rounds to the
activation dtype, so does the kernel), so that the two agree to the last bit or two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.launch import pdl_launch, wait_for_previous_kernel
from gpu_worker.kernels.triton_quantize import store_fp8_row
from gpu_worker.kernels.w8a8 import Fp8Rows


# With FP8_OUT the grid covers the padding rows of the fp8 output, whose count changes
# from step to step; specializing on it would compile a new variant mid-run.
@triton.jit(do_not_specialize=["num_rows"])
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    scale_ptr,
    residual_out_ptr,
    num_rows,
    x_stride,
    partial_stride,
    residual_stride,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,
    FP8_OUT: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    row_mask = cols < HIDDEN
    # Rows past num_rows are the fp8 output's padding: zeros.
    mask = row_mask & (row < num_rows)
    # The activation dtype: x's, or with partial sums the residual's (x's without one).
    dtype = residual_ptr.dtype.element_ty
    if NUM_PARTIALS > 0:
        # fp32 split-K partial sums of a projection: their total, rounded to the
        # activation dtype, is what the unsplit matmul would have returned.
        total = tl.zeros([BLOCK], tl.float32)
        for split in range(NUM_PARTIALS):
            total += tl.load(x_ptr + split * partial_stride + row * x_stride + cols, mask=mask, other=0.0)
        x = total.to(dtype)
    else:
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0)
        # The sum is rounded to the activation dtype, as the unfused "x + residual" is.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(dtype)
        tl.store(residual_out_ptr + row * HIDDEN + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / HIDDEN
    normed = (x32 * tl.rsqrt(variance + eps)).to(dtype)
    weight = tl.load(weight_ptr + cols, mask=row_mask, other=0.0)
    out = (normed.to(tl.float32) * weight.to(tl.float32)).to(dtype)
    if FP8_OUT:
        store_fp8_row(out_ptr + row * HIDDEN, scale_ptr, row, cols, row_mask, out.to(tl.float32))
    else:
        tl.store(out_ptr + row * HIDDEN + cols, out, mask=mask)


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, residual: [T, hidden], or x fp32 partial sums [splits, T, hidden] of a projection
    (kernels/triton_linear.py) with a residual. Returns (rms_norm(x + residual) * weight,
    x + residual) in the activation dtype."""
    out = torch.empty(x.shape[-2:], dtype=_activation_dtype(x, residual), device=x.device)
    return out, _add_rms_norm(x, residual, weight, eps, out, None)


def add_rms_norm_fp8_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[Fp8Rows, torch.Tensor | None]:
    """add_rms_norm_triton with the normed rows quantized per token for an fp8 projection."""
    num_tokens, hidden = x.shape[-2:]
    rows = Fp8Rows.empty(num_tokens, hidden, _activation_dtype(x, residual), x.device)
    return rows, _add_rms_norm(x, residual, weight, eps, rows.values, rows.scales)


def _activation_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    return residual.dtype if residual is not None else x.dtype


def _add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    fp8_scales: torch.Tensor | None,
) -> torch.Tensor | None:
    """Launches the kernel into `out` (fp8 values with fp8_scales, their rows padded);
    returns x + residual, or None without a residual."""
    num_partials = x.shape[0] if x.dim() == 3 else 0
    num_tokens, hidden = x.shape[-2:]
    assert x.stride(-1) == 1 and (num_partials == 0 or residual is not None)
    residual_out = (
        torch.empty(num_tokens, hidden, dtype=residual.dtype, device=x.device)
        if residual is not None
        else None
    )
    if num_tokens == 0:
        return residual_out
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(out.shape[0],)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        fp8_scales if fp8_scales is not None else out,
        residual_out if residual_out is not None else out,
        num_tokens,
        x.stride(-2),
        x.stride(0) if num_partials else 0,
        residual.stride(0) if residual is not None else 0,
        eps,
        HIDDEN=hidden,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        NUM_PARTIALS=num_partials,
        FP8_OUT=fp8_scales is not None,
        num_warps=max(1, min(8, block // 256)),
        **pdl_launch(x.device),
    )
    return residual_out


@triton.jit(do_not_specialize=["num_rows"])
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    scale_ptr,
    num_rows,
    x_stride,
    INTERMEDIATE: tl.constexpr,
    BLOCK: tl.constexpr,
    FP8_OUT: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row_mask = cols < INTERMEDIATE
    mask = row_mask & (row < num_rows)
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + INTERMEDIATE + cols, mask=mask, other=0.0)
    activated = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    out = (activated.to(tl.float32) * up.to(tl.float32)).to(up.dtype)
    if FP8_OUT:
        store_fp8_row(out_ptr + row * INTERMEDIATE, scale_ptr, row, cols, row_mask, out.to(tl.float32))
    else:
        tl.store(out_ptr + row * INTERMEDIATE + cols, out, mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] with gate then up. Returns silu(gate) * up, [T, I]."""
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
    _silu_and_mul(x, out, None)
    return out


def silu_and_mul_fp8_triton(x: torch.Tensor) -> Fp8Rows:
    """silu_and_mul_triton quantized per token for an fp8 projection."""
    rows = Fp8Rows.empty(x.shape[0], x.shape[1] // 2, x.dtype, x.device)
    _silu_and_mul(x, rows.values, rows.scales)
    return rows


def _silu_and_mul(x: torch.Tensor, out: torch.Tensor, fp8_scales: torch.Tensor | None) -> None:
    num_tokens, width = x.shape
    intermediate = width // 2
    assert x.stride(1) == 1
    if num_tokens == 0:
        return
    if fp8_scales is None:
        block, num_warps = min(1024, triton.next_power_of_2(intermediate)), 4
    else:
        # A whole row a program: its scale needs it all.
        block = triton.next_power_of_2(intermediate)
        num_warps = min(16, max(4, block // 1024))
    _silu_and_mul_kernel[(out.shape[0], triton.cdiv(intermediate, block))](
        x,
        out,
        fp8_scales if fp8_scales is not None else out,
        num_tokens,
        x.stride(0),
        INTERMEDIATE=intermediate,
        BLOCK=block,
        FP8_OUT=fp8_scales is not None,
        num_warps=num_warps,
        **pdl_launch(x.device),
    )
