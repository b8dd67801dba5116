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

Its tiles are 2-D, [words, columns], and everything the loop reads is loaded straight
into the weight tile's layout: each activation plane j as its own load of every eighth
input, the group's scales and zeros once per word (all L1 hits: every program reads the
same activations and each tile's row of scales). Loaded whole and then split, or
broadcast from one row, they were exchanged between threads through shared memory, with
barriers in every loop step; a third tile dimension for rows moved the weights the same
way. Each loop step loads two weight tiles before it opens either (Triton does not
pipeline loads that feed no tl.dot, so this is how more bytes are in flight), and column
tiles are narrow, 64 columns, so that a slice of the input makes programs enough. A
second row would add an fma per weight, which measured no faster than the split-K form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.launch import pdl_launch, wait_for_previous_kernel
from gpu_worker.kernels.triton_int4_linear import fewest_splits, grouped_split_k_block
from gpu_worker.kernels.triton_linear import total_of

# The bits of float32 2^23. Passed in as an argument rather than written as a constant:
# the compiler then keeps it in a register, and the and with the nibble's mask and the or
# with these bits become one instruction (with both as constants it emits two).
_FLOAT_2_POW_23_BITS = 0x4B000000
# Columns a program takes, and programs a launch aims at (about four per multiprocessor).
_BLOCK_N = 64
_TARGET_PROGRAMS = 512


@triton.jit
def _nibble_times(words, shift: tl.constexpr, float_bits, x):
    """[WORDS, N]: the nibble at `shift` of each word [WORDS, N], times 16^(shift/4),
    times x [WORDS]."""
    q = ((words & (0xF << shift)) | float_bits).to(tl.float32, bitcast=True) - 8388608.0
    return q * x[:, None]


@triton.jit
def _tile_offsets(first_word, words, cols, qweight_stride):
    """[WORDS, N]: where the weight tile of the words from first_word on lies."""
    return (first_word + words)[:, None].to(tl.int64) * qweight_stride + cols[None, :]


@triton.jit
def _tile_sums(
    packed, x_ptr, scales_ptr, zeros_ptr, k_start, words, cols, float_bits, group_stride, GROUP_SIZE
):
    """[WORDS, N]: each word's share of the product for one weight tile, packed
    [WORDS, N], whose inputs start at k_start."""
    # Each plane j loaded straight into the layout of the tile's words: no exchange
    # between threads (the loads hit in L1, every program reads the same x).
    x_word = x_ptr + k_start + words * 8
    x0 = tl.load(x_word).to(tl.float32)
    x1 = tl.load(x_word + 1).to(tl.float32)
    x2 = tl.load(x_word + 2).to(tl.float32)
    x3 = tl.load(x_word + 3).to(tl.float32)
    x4 = tl.load(x_word + 4).to(tl.float32)
    x5 = tl.load(x_word + 5).to(tl.float32)
    x6 = tl.load(x_word + 6).to(tl.float32)
    x7 = tl.load(x_word + 7).to(tl.float32)
    high = packed >> 20
    products = _nibble_times(packed, 0, float_bits, x0)
    products += _nibble_times(packed, 4, float_bits, x1 * 0.0625)
    products += _nibble_times(packed, 8, float_bits, x2 * 0.00390625)
    products += _nibble_times(packed, 12, float_bits, x3 * 0.000244140625)
    products += _nibble_times(packed, 16, float_bits, x4 * 0.0000152587890625)
    products += _nibble_times(high, 0, float_bits, x5)
    products += _nibble_times(high, 4, float_bits, x6 * 0.0625)
    products += _nibble_times(high, 8, float_bits, x7 * 0.00390625)
    # The tile lies within one group: one scale and one zero per column, loaded for each
    # word (the same row: L1 hits) so that they too come in the tile's layout.
    group_offsets = (k_start // GROUP_SIZE) * group_stride + cols[None, :] + 0 * words[:, None]
    scales = tl.load(scales_ptr + group_offsets).to(tl.float32)
    zeros = tl.load(zeros_ptr + group_offsets).to(tl.float32)
    word_x = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    return scales * (products - zeros * word_x[:, None])


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
    STEPS: tl.constexpr = K_PER_SPLIT // BLOCK_K
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    words = tl.arange(0, WORDS)
    first_word = split * (K_PER_SPLIT // 8)
    # Per word, not per column: the sum over words is taken once, after the loop.
    acc = tl.zeros([WORDS, BLOCK_N], tl.float32)
    # Two weight tiles a loop step, both loaded before either is opened: twice the bytes
    # in flight (the compiler does not pipeline loads that feed no tl.dot).
    for step in range(0, STEPS - 1, 2):
        offsets = _tile_offsets(first_word + step * WORDS, words, cols, qweight_stride)
        packed = tl.load(qweight_ptr + offsets).to(tl.uint32, bitcast=True)
        packed_next = tl.load(qweight_ptr + offsets + WORDS * qweight_stride).to(tl.uint32, bitcast=True)
        k_start = split * K_PER_SPLIT + step * BLOCK_K
        acc += _tile_sums(
            packed, x_ptr, scales_ptr, zeros_ptr, k_start, words, cols, float_bits, group_stride, GROUP_SIZE
        )
        acc += _tile_sums(
            packed_next,
            x_ptr,
            scales_ptr,
            zeros_ptr,
            k_start + BLOCK_K,
            words,
            cols,
            float_bits,
            group_stride,
            GROUP_SIZE,
        )
    if STEPS % 2 == 1:
        offsets = _tile_offsets(first_word + (STEPS - 1) * WORDS, words, cols, qweight_stride)
        packed = tl.load(qweight_ptr + offsets).to(tl.uint32, bitcast=True)
        k_start = split * K_PER_SPLIT + (STEPS - 1) * BLOCK_K
        acc += _tile_sums(
            packed, x_ptr, scales_ptr, zeros_ptr, k_start, words, cols, float_bits, group_stride, GROUP_SIZE
        )
    tl.store(out_ptr + split * out_features + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


def int4_gemv_plan(out_features: int, in_features: int, group_size: int) -> dict[str, int] | None:
    """Launch parameters of int4_gemv_triton for this shape, or None where it cannot tile
    it (columns not a multiple of the tile: the kernel reads whole tiles). Narrow column
    tiles, and the input split into the fewest slices that make programs enough: from a
    sweep on an H100 with Llama-3.1-8B's projections, within 5% of each shape's best."""
    block_k = grouped_split_k_block(in_features, group_size)
    if block_k is None or out_features % _BLOCK_N:
        return None
    num_splits = fewest_splits(out_features // _BLOCK_N, in_features // block_k, _TARGET_PROGRAMS)
    return {
        "block_k": block_k,
        "block_n": _BLOCK_N,
        "num_splits": num_splits,
        "num_warps": 4,
        "num_stages": 1,
    }


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
