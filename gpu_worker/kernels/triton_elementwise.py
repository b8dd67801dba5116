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


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    x_stride,
    partial_stride,
    residual_stride,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    dtype = out_ptr.dtype.element_ty
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
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * HIDDEN + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, residual: [T, hidden], or x fp32 partial sums [splits, T, hidden] of a projection
    (kernels/triton_linear.py) with a residual. Returns (rms_norm(x + residual) * weight,
    x + residual) in the activation dtype."""
    num_partials = x.shape[0] if x.dim() == 3 else 0
    num_tokens, hidden = x.shape[-2:]
    assert x.stride(-1) == 1 and (num_partials == 0 or residual is not None)
    dtype = residual.dtype if residual is not None else x.dtype
    out = torch.empty(num_tokens, hidden, dtype=dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else None
    if num_tokens == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(num_tokens,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        residual_out if residual_out is not None else out,
        x.stride(-2),
        x.stride(0) if num_partials else 0,
        residual.stride(0) if residual is not None else 0,
        eps,
        HIDDEN=hidden,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        NUM_PARTIALS=num_partials,
        num_warps=max(1, min(8, block // 256)),
        **pdl_launch(x.device),
    )
    return out, residual_out


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, x_stride, INTERMEDIATE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTERMEDIATE
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + INTERMEDIATE + cols, mask=mask, other=0.0)
    activated = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    out = activated.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * INTERMEDIATE + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] with gate then up. Returns silu(gate) * up, [T, I]."""
    num_tokens, width = x.shape
    intermediate = width // 2
    assert x.stride(1) == 1
    out = torch.empty(num_tokens, intermediate, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(intermediate))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(intermediate, block))](
        x, out, x.stride(0), INTERMEDIATE=intermediate, BLOCK=block, num_warps=4, **pdl_launch(x.device)
    )
    return out
