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
from gpu_worker.kernels.w8a8 import _MIN_SCALE, FP8_MAX, Fp8Rows

# kernels/w8a8.py's fp8 range and the scale of an all-zero row, as constants of the kernels.
_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN = tl.constexpr(_MIN_SCALE)


@triton.jit
def store_fp8_row(out_ptr, scale_ptr, row, cols, mask, x):
    """Row `row` of out_ptr, at `cols` (mask), as x (fp32, zero past the mask) quantized
    to e4m3 with one scale, which goes to scale_ptr[row]; as kernels/w8a8.py's
    quantize_rows gives it."""
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / _FP8_MAX, _MIN)
    quantized = tl.clamp(x / scale, -_FP8_MAX, _FP8_MAX)
    tl.store(out_ptr + cols, quantized.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


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
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = (cols < COLS) & (row < num_rows)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    store_fp8_row(out_ptr + row * COLS, scale_ptr, row, cols, cols < COLS, x)


def quantize_rows_fp8_triton(x: torch.Tensor) -> Fp8Rows:
    """x [rows, cols] quantized as quantize_rows does it, the padding rows zero."""
    num_rows, cols = x.shape
    assert x.stride(1) == 1
    rows = Fp8Rows.empty(num_rows, cols, x.dtype, x.device)
    block = triton.next_power_of_2(cols)
    _quantize_rows_kernel[(rows.values.shape[0],)](
        x,
        rows.values,
        rows.scales,
        num_rows,
        x.stride(0),
        COLS=cols,
        BLOCK=block,
        num_warps=min(16, max(4, block // 1024)),
        **pdl_launch(x.device),
    )
    return rows
