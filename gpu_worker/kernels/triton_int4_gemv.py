"""Triton 4-bit matrix-vector product for one row (decode at batch 1), for groups in input
order (AWQ, GPTQ without act_order), in kernels/int4_linear.py's layout.

The tensor-core kernels of triton_int4_linear.py spend their time opening the weights:
an int-to-float conversion per weight (a quarter-rate instruction), a reshape through
shared memory, a float-to-bf16 conversion per weight for the MMA. With one row there is
nothing for tensor cores to do, so this kernel multiplies on the CUDA cores and opens
each weight with two full-rate instructions:

- Nibble j of a word is kept where it lies and or-ed under the exponent of 2^23: the
  float32 whose bits are 0x4B000000 | (q << 4j) is exactly 2^23 + q * 16^j (for 4j + 4 <=
  23; nibbles 5-7 are shifted down by 20 first, once per word). One and-or instruction,
  one exact subtraction of 2^23, and the 16^j goes into the activation instead (scaled
  once per tile, exactly: a power of two).
- The zero point and scale come out of the sum: within a group, sum_k (q_k - z) s x_k =
  s (sum_k q_k x_k - z sum_k x_k), so per weight only q x is accumulated, and the
  group's scale and zero are applied once per word.

Its tiles are 2-D, [words, columns]: with a third dimension for rows (of size one) the
compiler moved every weight tile into the 3-D layout through shared memory, 21 barriers
a loop step on sm_90 against 8, and 128 registers a thread against 96. A second row
would add an fma per weight, which measured no faster than the split-K form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.launch import pdl_launch, wait_for_previous_kernel
from gpu_worker.kernels.triton_int4_linear import int4_split_k_plan
from gpu_worker.kernels.triton_linear import total_of

# The bits of float32 2^23. Passed in as an argument rather than written as a constant:
# the compiler then keeps it in a register, and the and with the nibble's mask and the or
# with these bits become one instruction (with both as constants it emits two).
_FLOAT_2_POW_23_BITS = 0x4B000000


@triton.jit
def _nibble_times(words, shift: tl.constexpr, float_bits, x):
    """[WORDS, N]: the nibble at `shift` of each word [WORDS, N], times 16^(shift/4),
    times x [WORDS]."""
    q = ((words & (0xF << shift)) | float_bits).to(tl.float32, bitcast=True) - 8388608.0
    return q * x[:, None]


@triton.jit
def _int4_gemv_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    float_bits,
    out_features,
    qweight_stride,
    group_stride,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    col_tile = tl.program_id(0)
    split = tl.program_id(1)
    WORDS: tl.constexpr = BLOCK_K // 8
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    words = tl.arange(0, WORDS)
    # Per word, not per column: the sum over words is taken once, after the loop.
    acc = tl.zeros([WORDS, BLOCK_N], tl.float32)
    for step in range(0, K_PER_SPLIT // BLOCK_K):
        k_start = split * K_PER_SPLIT + step * BLOCK_K
        packed = tl.load(
            qweight_ptr + (k_start // 8 + words)[:, None].to(tl.int64) * qweight_stride + cols[None, :]
        ).to(tl.uint32, bitcast=True)
        x = tl.load(x_ptr + k_start + words[:, None] * 8 + tl.arange(0, 8)[None, :]).to(tl.float32)
        # x [WORDS, 8] split into its eight [WORDS] planes, plane j beside nibble j.
        x_even, x_odd = tl.split(tl.reshape(x, [WORDS, 4, 2]))
        x0_4, x2_6 = tl.split(tl.reshape(x_even, [WORDS, 2, 2]))
        x1_5, x3_7 = tl.split(tl.reshape(x_odd, [WORDS, 2, 2]))
        x0, x4 = tl.split(x0_4)
        x2, x6 = tl.split(x2_6)
        x1, x5 = tl.split(x1_5)
        x3, x7 = tl.split(x3_7)
        high = packed >> 20
        products = _nibble_times(packed, 0, float_bits, x0)
        products += _nibble_times(packed, 4, float_bits, x1 * 0.0625)
        products += _nibble_times(packed, 8, float_bits, x2 * 0.00390625)
        products += _nibble_times(packed, 12, float_bits, x3 * 0.000244140625)
        products += _nibble_times(packed, 16, float_bits, x4 * 0.0000152587890625)
        products += _nibble_times(high, 0, float_bits, x5)
        products += _nibble_times(high, 4, float_bits, x6 * 0.0625)
        products += _nibble_times(high, 8, float_bits, x7 * 0.00390625)
        # The tile lies within one group: one scale and one zero per column.
        group_offsets = (k_start // GROUP_SIZE) * group_stride + cols
        scales = tl.load(scales_ptr + group_offsets).to(tl.float32)
        zeros = tl.load(zeros_ptr + group_offsets).to(tl.float32)
        word_x = tl.sum(x, axis=1)
        acc += scales[None, :] * (products - zeros[None, :] * word_x[:, None])
    tl.store(out_ptr + split * out_features + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


def int4_gemv_plan(out_features: int, in_features: int, group_size: int) -> dict[str, int] | None:
    """Launch parameters of int4_gemv_triton for this shape, or None where it cannot tile
    it (columns not a multiple of the tile: the kernel reads whole tiles). The split of
    the input is the split-K kernel's (int4_split_k_plan)."""
    plan = int4_split_k_plan(out_features, in_features, group_size)
    if plan is None or out_features % plan["block_n"]:
        return None
    return plan


def int4_gemv_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    plan: dict[str, int] | None = None,
) -> torch.Tensor:
    """x [1, in] times the 4-bit weight; returns [1, out] in x's dtype. plan:
    int4_gemv_plan's parameters, or others (benchmarks sweep them)."""
    x = x.contiguous()
    num_rows, in_features = x.shape
    out_features = qweight.shape[1]
    plan = plan or int4_gemv_plan(out_features, in_features, group_size)
    if (
        plan is None
        or num_rows != 1
        or qweight.stride(1) != 1
        or scales.stride(1) != 1
        or zeros.stride(0) != scales.stride(0)
    ):
        raise ValueError("int4_gemv_triton: rows, groups or layout it cannot tile")
    num_splits = plan["num_splits"]
    # One slice writes the result itself; several write fp32 partials, summed after.
    out_dtype = x.dtype if num_splits == 1 else torch.float32
    partials = torch.empty(num_splits, 1, out_features, dtype=out_dtype, device=x.device)
    grid = (out_features // plan["block_n"], num_splits)
    _int4_gemv_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        partials,
        _FLOAT_2_POW_23_BITS,
        out_features,
        qweight.stride(0),
        scales.stride(0),
        BLOCK_N=plan["block_n"],
        BLOCK_K=plan["block_k"],
        K_PER_SPLIT=in_features // num_splits,
        GROUP_SIZE=group_size,
        num_warps=plan["num_warps"],
        num_stages=plan["num_stages"],
        **pdl_launch(x.device),
    )
    return total_of(partials, x.dtype)
