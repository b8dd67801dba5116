"""Per-token fp8 quantization of activations in one kernel, for the fp8 GEMM's rows.

The reference (kernels/w8a8.py quantize_rows) is some eight PyTorch kernels: abs, amax,
divide, clamp, cast and the copies around them, and the padding of the rows to the
multiple of 16 that cuBLASLt wants. Ahead of each of a decode step's projections they cost
more than the GEMM saves over bf16 at a few dozen rows. Here each program reads one row
once, finds its largest magnitude, and writes the row in fp8 with its scale; rows past the
real ones (the padding) come out as zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.launch import pdl_launch, wait_for_previous_kernel


# A step's row count changes from step to step; specializing on it would compile a new
# variant mid-run (as in kernels/triton_rope_store.py).
@triton.jit(do_not_specialize=["num_rows"])
def _quantize_rows_kernel(
    x_ptr,
    out_ptr,
    scale_ptr,
    num_rows,
    x_stride,
    COLS: tl.constexpr,
    BLOCK: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = (cols < COLS) & (row < num_rows)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX, MIN_SCALE)
    quantized = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
    tl.store(out_ptr + row * COLS + cols, quantized.to(out_ptr.dtype.element_ty), mask=cols < COLS)
    tl.store(scale_ptr + row, scale)


def quantize_rows_fp8_triton(
    x: torch.Tensor, padded_rows: int, fp8_max: float, min_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] -> (e4m3 values [padded_rows, cols], fp32 scales [padded_rows, 1]),
    as quantize_rows gives them, with zero rows (scale min_scale) past x's."""
    num_rows, cols = x.shape
    assert x.stride(1) == 1 and padded_rows >= num_rows
    out = torch.empty(padded_rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(padded_rows, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(cols)
    _quantize_rows_kernel[(padded_rows,)](
        x,
        out,
        scale,
        num_rows,
        x.stride(0),
        COLS=cols,
        BLOCK=block,
        FP8_MAX=fp8_max,
        MIN_SCALE=min_scale,
        num_warps=min(16, max(4, block // 1024)),
        **pdl_launch(x.device),
    )
    return out, scale
