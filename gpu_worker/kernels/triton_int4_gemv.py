"""Triton 4-bit matrix-vector product for one row (decode at batch 1), for groups in input
order (AWQ, GPTQ without act_order), in kernels/int4_linear.py's layout.

The tensor-core kernels of triton_int4_linear.py spend their time opening the weights:
an int-to-float conversion per weight (a quarter-rate instruction), a reshape through
shared memory, a float-to-bf16 conversion per weight for the MMA. With one row there is
nothing for tensor cores to do, so this kernel multiplies on the CUDA cores, two weights
at a time in fp16 pairs, with one instruction per two weights to open them and two to
dequantize and multiply them:

- A word's two 16-bit halves hold nibbles 0-3 and 4-7, so nibbles j and j + 4 lie at the
  same place in each half. Shifted down by 4j and or-ed under the exponent of 1024 (one
  and-or instruction on the word), they are the fp16 pair 1024 + q, exactly.
- One fp16-pair fma takes that to (q - z) / 16, exactly: times 1/16, plus
  -(1024 + z) / 16 (z, the group's zero point, is an integer: every term is exact in
  fp16). A second multiplies by the pair of inputs (x_j, x_j+4) and adds, so each word's
  eight products are summed in one pair, whose two halves go to fp32 once per word with
  the group's scale (times the 16 taken out, once, at the end). The sixteenth keeps each
  half's sum of four products (at most 15/16 of their inputs each) within fp16's range
  for inputs up to about 17,000 in magnitude.

Its tiles are 2-D, [words, columns], and everything the loop reads is loaded straight
into the weight tile's layout: each input plane j as its own load of every eighth input,
the group's scales and zeros once per word (all L1 hits: every program reads the same
activations and each tile's row of scales). Loaded whole and then split, or broadcast
from one row, they were exchanged between threads through shared memory, with barriers in
every loop step. Each loop step loads two weight tiles before it opens either, so that
more bytes are in flight; the plan's num_stages > 1 also has Triton pipeline the loop's
loads through shared memory (asynchronous copies of later steps' tiles while this one is
opened: its launch option of that name pipelines only loads that feed a tl.dot, so the
kernel takes it as LOAD_STAGES on its loop). Column tiles are narrow, 64 columns, so that
a slice of the input makes programs enough.

The fp16-pair instructions are inline PTX on the device (Triton has no type for an fp16
pair); the interpreter runs the same arithmetic on each half.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.launch import pdl_launch, wait_for_previous_kernel
from gpu_worker.kernels.triton_int4_linear import fewest_splits, grouped_split_k_block
from gpu_worker.kernels.triton_linear import total_of

# The fp16 pair (1024, 1024). Passed in as an argument rather than written as a constant:
# the compiler then keeps it in a register, and the and with the nibbles' mask and the or
# with these bits become one instruction (with both as constants it emits two).
_FP16_PAIR_1024_BITS = 0x64006400
# The fp16 pair (1/16, 1/16), as its difference from the above: derived from that
# register, it stays in one too.
_FP16_PAIR_SIXTEENTH_OFFSET = tl.constexpr(0x64006400 - 0x2C002C00)
# Columns a program takes, and programs a launch aims at (about four per multiprocessor).
_BLOCK_N = 64
_TARGET_PROGRAMS = 512


@triton.jit
def _half_pair(low, high, PTX: tl.constexpr):
    """uint32 holding fp32 `low` and `high` rounded to fp16, `low` in the low half."""
    if PTX:
        return tl.inline_asm_elementwise(
            "cvt.rn.f16x2.f32 $0, $1, $2;", "=r,r,r", [high, low], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:
        low_bits = low.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        high_bits = high.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        return low_bits | (high_bits << 16)


@triton.jit
def _halves(pair):
    """The two fp16 of a pair, as fp32."""
    low = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    high = (pair >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return low, high


@triton.jit
def _dequantize_multiply_add(weights, sixteenth, zero, x, acc, PTX: tl.constexpr):
    """acc + (weights * sixteenth + zero) * x, on fp16 pairs."""
    if PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; fma.rn.f16x2 t, $1, $2, $3; fma.rn.f16x2 $0, t, $4, $5; }",
            "=r,r,r,r,r,r",
            [weights, sixteenth, zero, x, acc],
            dtype=tl.uint32,
            is_pure=True,
            pack=1,
        )
    else:
        w_low, w_high = _halves(weights)
        s_low, s_high = _halves(sixteenth)
        z_low, z_high = _halves(zero)
        x_low, x_high = _halves(x)
        a_low, a_high = _halves(acc)
        d_low = (w_low * s_low + z_low).to(tl.float16).to(tl.float32)
        d_high = (w_high * s_high + z_high).to(tl.float16).to(tl.float32)
        return _half_pair(a_low + d_low * x_low, a_high + d_high * x_high, False)


@triton.jit
def _pair_sum(pair, PTX: tl.constexpr):
    """The sum of an fp16 pair's halves, as fp32."""
    if PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .f16 l, h, s; mov.b32 {l, h}, $1; add.rn.f16 s, l, h; cvt.f32.f16 $0, s; }",
            "=r,r",
            [pair],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    else:
        low, high = _halves(pair)
        return (low + high).to(tl.float16).to(tl.float32)


@triton.jit
def _tile_offsets(first_word, words, cols, qweight_stride):
    """[WORDS, N]: where the weight tile of the words from first_word on lies."""
    return (first_word + words)[:, None].to(tl.int64) * qweight_stride + cols[None, :]


@triton.jit
def _input_pair(x_word, j, PTX: tl.constexpr):
    """[WORDS, 1]: the inputs of nibbles j and j + 4 of each word, as an fp16 pair."""
    low = tl.load(x_word + j).to(tl.float32)
    high = tl.load(x_word + j + 4).to(tl.float32)
    return _half_pair(low, high, PTX)[:, None]


@triton.jit
def _tile_sums(
    packed, x_ptr, scales_ptr, zeros_ptr, k_start, words, cols, magic, group_stride, GROUP_SIZE, PTX
):
    """[WORDS, N]: each word's share of the product for one weight tile, packed
    [WORDS, N], whose inputs start at k_start, over 16."""
    # Each plane loaded straight into the layout of the tile's words: no exchange between
    # threads (the loads hit in L1, every program reads the same x).
    x_word = x_ptr + k_start + words * 8
    # The tile lies within one group: one scale and one zero per column, loaded for each
    # word (the same row: L1 hits) so that they too come in the tile's layout.
    group_offsets = (k_start // GROUP_SIZE) * group_stride + cols[None, :] + 0 * words[:, None]
    scales = tl.load(scales_ptr + group_offsets).to(tl.float32)
    zero = tl.load(zeros_ptr + group_offsets).to(tl.float32) * -0.0625 - 64.0
    zero = _half_pair(zero, zero, PTX)
    sixteenth = magic - _FP16_PAIR_SIXTEENTH_OFFSET
    sums = tl.zeros_like(packed)
    for j in tl.static_range(4):
        nibbles = ((packed >> (4 * j)) & 0x000F000F) | magic
        sums = _dequantize_multiply_add(nibbles, sixteenth, zero, _input_pair(x_word, j, PTX), sums, PTX)
    return scales * _pair_sum(sums, PTX)


@triton.jit
def _int4_gemv_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    magic,
    out_features,
    qweight_stride,
    group_stride,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    LOAD_STAGES: tl.constexpr,
    PTX: tl.constexpr,
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
    # in flight (more with LOAD_STAGES > 1, which has later steps' loads issued early).
    for step in tl.range(0, STEPS - 1, 2, num_stages=LOAD_STAGES):
        offsets = _tile_offsets(first_word + step * WORDS, words, cols, qweight_stride)
        packed = tl.load(qweight_ptr + offsets).to(tl.uint32, bitcast=True)
        packed_next = tl.load(qweight_ptr + offsets + WORDS * qweight_stride).to(tl.uint32, bitcast=True)
        k_start = split * K_PER_SPLIT + step * BLOCK_K
        acc += _tile_sums(
            packed, x_ptr, scales_ptr, zeros_ptr, k_start, words, cols, magic, group_stride, GROUP_SIZE, PTX
        )
        acc += _tile_sums(
            packed_next,
            x_ptr,
            scales_ptr,
            zeros_ptr,
            k_start + BLOCK_K,
            words,
            cols,
            magic,
            group_stride,
            GROUP_SIZE,
            PTX,
        )
    if STEPS % 2 == 1:
        offsets = _tile_offsets(first_word + (STEPS - 1) * WORDS, words, cols, qweight_stride)
        packed = tl.load(qweight_ptr + offsets).to(tl.uint32, bitcast=True)
        k_start = split * K_PER_SPLIT + (STEPS - 1) * BLOCK_K
        acc += _tile_sums(
            packed, x_ptr, scales_ptr, zeros_ptr, k_start, words, cols, magic, group_stride, GROUP_SIZE, PTX
        )
    # _tile_sums gives sums over 16.
    tl.store(out_ptr + split * out_features + cols, (16.0 * tl.sum(acc, axis=0)).to(out_ptr.dtype.element_ty))


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
        _FP16_PAIR_1024_BITS,
        out_features,
        qweight.stride(0),
        scales.stride(0),
        BLOCK_N=plan["block_n"],
        BLOCK_K=plan["block_k"],
        K_PER_SPLIT=in_features // num_splits,
        GROUP_SIZE=group_size,
        LOAD_STAGES=plan["num_stages"],
        PTX=x.device.type == "cuda",
        num_warps=plan["num_warps"],
        **pdl_launch(x.device),
    )
    return total_of(partials, x.dtype)
