"""The Triton kernels as the worker launches them for Qwen3-0.6B (and the quantized and
mixture-of-experts shapes beside it): argument types and constexprs, for
tests/kernels/test_kernels_compile.py to compile for Hopper on a machine without a GPU."""

from __future__ import annotations

from gpu_worker.kernels.triton_decode_attention import _decode_kernel, _merge_splits_kernel
from gpu_worker.kernels.triton_elementwise import _add_rms_norm_kernel, _silu_and_mul_kernel
from gpu_worker.kernels.triton_int4_dequantize import _dequantize_int4_kernel
from gpu_worker.kernels.triton_int4_gemv import _int4_gemv_kernel
from gpu_worker.kernels.triton_int4_linear import _int4_split_k_kernel
from gpu_worker.kernels.triton_linear import _partial_sums_kernel, _sum_splits_kernel
from gpu_worker.kernels.triton_moe import _expert_gemm_kernel
from gpu_worker.kernels.triton_moe_align import _align_kernel
from gpu_worker.kernels.triton_moe_route import _route_kernel
from gpu_worker.kernels.triton_prefill_attention import _prefill_kernel
from gpu_worker.kernels.triton_quantize import _quantize_rows_kernel
from gpu_worker.kernels.triton_rope_store import _rope_store_kernel

ATTENTION = dict(
    GROUP=2, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=16, SLOT_RUN=16, USE_WINDOW=False, USE_SOFTCAP=False
)
# The prefill kernel pads the group of query heads to a power of two only (two here);
# the decode kernel pads it to the 16 rows of an MMA.
PREFILL_ATTENTION = dict(ATTENTION, GROUP_PAD=2)
# Gemma 2's options: a sliding window and soft-capped scores.
WINDOWED_SOFTCAPPED = dict(ATTENTION, USE_WINDOW=True, USE_SOFTCAP=True)
DECODE_ATTENTION = dict(ATTENTION, FP8_PRODUCTS=False)
DECODE_TYPES = dict(
    query_ptr="*bf16",
    key_cache_ptr="*bf16",
    value_cache_ptr="*bf16",
    block_tables_ptr="*i32",
    seq_lens_ptr="*i32",
    query_start_loc_ptr="*i32",
    output_ptr="*bf16",
    partial_output_ptr="*fp32",
    partial_lse_ptr="*fp32",
    scale_log2="fp32",
    softcap_log2="fp32",
    value_scale="fp32",
)
PREFILL_TYPES = dict(
    query_ptr="*bf16",
    key_cache_ptr="*bf16",
    value_cache_ptr="*bf16",
    block_tables_ptr="*i32",
    query_start_loc_ptr="*i32",
    seq_lens_ptr="*i32",
    tile_seq_ptr="*i32",
    tile_first_ptr="*i32",
    output_ptr="*bf16",
    scale_log2="fp32",
    softcap_log2="fp32",
    value_scale="fp32",
)
ADD_RMS_NORM_TYPES = dict(
    x_ptr="*fp32",
    residual_ptr="*bf16",
    weight_ptr="*bf16",
    out_ptr="*bf16",
    scale_ptr="*bf16",
    residual_out_ptr="*bf16",
    eps="fp32",
)
EXPERT_GEMM_TYPES = dict(
    a_ptr="*bf16",
    b_ptr="*bf16",
    c_ptr="*bf16",
    weights_ptr="*fp32",
    sorted_ids_ptr="*i64",
    expert_of_block_ptr="*i64",
    num_padded_ptr="*i64",
)
PARTIAL_SUMS = dict(BLOCK_K=128, HAS_SCALE=False, SCALE_BLOCK_N=0, SCALE_BLOCK_K=0)
FP8_PARTIAL_SUMS_TYPES = dict(x_ptr="*bf16", weight_ptr="*fp8e4nv", partials_ptr="*fp32", scale_ptr="*fp32")
EXPERT_GEMM = dict(MUL_WEIGHT=False, SILU_AND_MUL=True, stride_bk=1, SCALE_BLOCK_N=0, SCALE_BLOCK_K=0)
ROPE_STORE = dict(NUM_HEADS=16, NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_SIZE=16, HAS_NORM=True)
ROPE_STORE_TYPES = dict(
    query_ptr="*bf16",
    key_ptr="*bf16",
    value_ptr="*bf16",
    positions_ptr="*i64",
    slot_mapping_ptr="*i64",
    cos_sin_ptr="*fp32",
    q_weight_ptr="*bf16",
    k_weight_ptr="*bf16",
    query_out_ptr="*bf16",
    key_out_ptr="*bf16",
    key_cache_ptr="*bf16",
    value_cache_ptr="*bf16",
    eps="fp32",
    key_scale_inv="fp32",
    value_scale_inv="fp32",
)

# (kernel, argument types other than i32, constexprs, launch options): what the wrappers
# launch for Qwen3-0.6B (16 query heads, 8 KV heads, head_dim 128, hidden 1024).
CASES = {
    "decode attention": (
        _decode_kernel,
        DECODE_TYPES,
        dict(DECODE_ATTENTION, BLOCK_N=64, NUM_SPLITS=4, MIXED=False),
        dict(num_warps=4, num_stages=3),
    ),
    "decode attention, 128-key tiles": (
        _decode_kernel,
        DECODE_TYPES,
        dict(DECODE_ATTENTION, BLOCK_N=128, NUM_SPLITS=1, MIXED=False),
        dict(num_warps=4, num_stages=3),
    ),
    # The single-token sequences of a step with prompt tokens (rows from query_start_loc).
    "decode attention, mixed batch": (
        _decode_kernel,
        DECODE_TYPES,
        dict(DECODE_ATTENTION, BLOCK_N=128, NUM_SPLITS=1, MIXED=True),
        dict(num_warps=4, num_stages=3),
    ),
    # --kv-cache-dtype fp8: float8 e4m3 keys and values, multiplied in fp16, 128 keys a
    # tile at every batch size.
    "decode attention, fp8 cache": (
        _decode_kernel,
        dict(DECODE_TYPES, key_cache_ptr="*fp8e4nv", value_cache_ptr="*fp8e4nv"),
        dict(DECODE_ATTENTION, BLOCK_N=128, NUM_SPLITS=4, MIXED=False),
        dict(num_warps=4, num_stages=3),
    ),
    # The same multiplied in e4m3 (decode_attention_triton's fp8_products).
    "decode attention, fp8 cache, e4m3 products": (
        _decode_kernel,
        dict(DECODE_TYPES, key_cache_ptr="*fp8e4nv", value_cache_ptr="*fp8e4nv"),
        dict(ATTENTION, BLOCK_N=128, NUM_SPLITS=4, MIXED=False, FP8_PRODUCTS=True),
        dict(num_warps=4, num_stages=3),
    ),
    "prefill attention, fp8 cache": (
        _prefill_kernel,
        dict(PREFILL_TYPES, key_cache_ptr="*fp8e4nv", value_cache_ptr="*fp8e4nv"),
        dict(PREFILL_ATTENTION, BLOCK_M=32, BLOCK_N=32),
        dict(num_warps=4, num_stages=2),
    ),
    "split merge": (
        _merge_splits_kernel,
        dict(
            partial_output_ptr="*fp32",
            partial_lse_ptr="*fp32",
            query_start_loc_ptr="*i32",
            output_ptr="*bf16",
        ),
        dict(HEAD_DIM=128, NUM_SPLITS=4, MIXED=True),
        dict(num_warps=4),
    ),
    "decode attention, windowed and soft-capped": (
        _decode_kernel,
        DECODE_TYPES,
        dict(WINDOWED_SOFTCAPPED, BLOCK_N=64, NUM_SPLITS=4, MIXED=False, FP8_PRODUCTS=False),
        dict(num_warps=4, num_stages=3),
    ),
    "prefill attention": (
        _prefill_kernel,
        PREFILL_TYPES,
        dict(PREFILL_ATTENTION, BLOCK_M=32, BLOCK_N=32),
        dict(num_warps=4, num_stages=2),
    ),
    "prefill attention, windowed and soft-capped": (
        _prefill_kernel,
        PREFILL_TYPES,
        dict(WINDOWED_SOFTCAPPED, GROUP_PAD=2, BLOCK_M=32, BLOCK_N=32),
        dict(num_warps=4, num_stages=2),
    ),
    "fused MoE gate/up": (
        _expert_gemm_kernel,
        EXPERT_GEMM_TYPES,
        dict(EXPERT_GEMM, A_ROW_DIV=8, SILU_AND_MUL=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64),
        dict(num_warps=4, num_stages=3),
    ),
    # A fine-grained fp8 checkpoint's experts, 128 x 128 blocks.
    "fused MoE gate/up with SiLU, fp8 experts": (
        _expert_gemm_kernel,
        dict(EXPERT_GEMM_TYPES, b_ptr="*fp8e4nv", b_scale_ptr="*fp32"),
        dict(
            EXPERT_GEMM, A_ROW_DIV=8, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SCALE_BLOCK_N=128, SCALE_BLOCK_K=128
        ),
        dict(num_warps=4, num_stages=3),
    ),
    # moe_plan's tiles up to 64 rows, the output columns halved: gate and up share a
    # weight tile of the plan's width. (Its 128-row tiles keep 24 bytes on the stack with
    # SiLU, 72 without; not checked here.)
    **{
        f"fused MoE gate/up with SiLU, {tiles['BLOCK_M']}-row tiles": (
            _expert_gemm_kernel,
            EXPERT_GEMM_TYPES,
            dict(EXPERT_GEMM, A_ROW_DIV=8, **tiles),
            dict(num_warps=4, num_stages=stages),
        )
        for tiles, stages in (
            (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128), 4),
            (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), 3),
        )
    },
    "fused MoE down, weighted": (
        _expert_gemm_kernel,
        EXPERT_GEMM_TYPES,
        dict(
            EXPERT_GEMM, A_ROW_DIV=1, MUL_WEIGHT=True, SILU_AND_MUL=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64
        ),
        dict(num_warps=4, num_stages=3),
    ),
    # Qwen3-30B-A3B's router: top 8 of 128 experts, renormalized.
    "MoE routing": (
        _route_kernel,
        dict(logits_ptr="*bf16", weights_ptr="*fp32", ids_ptr="*i64"),
        dict(TOP_K=8, TOP_K_PAD=8, EXPERTS=128, RENORMALIZE=True),
        dict(num_warps=1),
    ),
    # Qwen3-30B-A3B's routing at decode: 8 pairs over 128 experts, 16-row tiles.
    "MoE align by expert, decode": (
        _align_kernel,
        dict(topk_ids_ptr="*i64", sorted_ids_ptr="*i64", expert_of_block_ptr="*i64", num_padded_ptr="*i64"),
        dict(BLOCK_M=16, BLOCK_M_PAD=16, EXPERTS=128, PAIR_CHUNK=8, TILE_CHUNK=32),
        dict(num_warps=4),
    ),
    "rope + KV store, decode": (
        _rope_store_kernel,
        ROPE_STORE_TYPES,
        dict(ROPE_STORE, BLOCK_T=1, KEEP_KEY=False),
        dict(num_warps=1),
    ),
    "rope + KV store, prefill": (
        _rope_store_kernel,
        ROPE_STORE_TYPES,
        dict(ROPE_STORE, BLOCK_T=16, KEEP_KEY=True),
        dict(num_warps=4),
    ),
    "rope + KV store into an fp8 cache, prefill": (
        _rope_store_kernel,
        dict(ROPE_STORE_TYPES, key_cache_ptr="*fp8e4nv", value_cache_ptr="*fp8e4nv"),
        dict(ROPE_STORE, BLOCK_T=16, KEEP_KEY=True),
        dict(num_warps=4),
    ),
    "split-K partial sums": (
        _partial_sums_kernel,
        dict(x_ptr="*bf16", weight_ptr="*bf16", partials_ptr="*fp32"),
        dict(PARTIAL_SUMS, BLOCK_M=16, BLOCK_N=32, K_PER_SPLIT=768),
        dict(num_warps=4, num_stages=4),
    ),
    "split-K partial sums, fp8 weights with channel scales": (
        _partial_sums_kernel,
        FP8_PARTIAL_SUMS_TYPES,
        dict(PARTIAL_SUMS, BLOCK_M=16, BLOCK_N=32, K_PER_SPLIT=1024, HAS_SCALE=True),
        dict(num_warps=4, num_stages=4),
    ),
    # Fine-grained fp8 checkpoints (128 x 128 blocks): a decode's few rows, and a prompt
    # step's many (block_scaled_plan).
    "split-K partial sums, fp8 weights with block scales": (
        _partial_sums_kernel,
        FP8_PARTIAL_SUMS_TYPES,
        dict(PARTIAL_SUMS, BLOCK_M=16, BLOCK_N=32, K_PER_SPLIT=1024, SCALE_BLOCK_N=128, SCALE_BLOCK_K=128),
        dict(num_warps=4, num_stages=4),
    ),
    "fp8 weights with block scales, wide tiles": (
        _partial_sums_kernel,
        FP8_PARTIAL_SUMS_TYPES,
        dict(PARTIAL_SUMS, BLOCK_M=64, BLOCK_N=128, K_PER_SPLIT=1024, SCALE_BLOCK_N=128, SCALE_BLOCK_K=128),
        dict(num_warps=8, num_stages=3),
    ),
    "sum of split-K partials into bf16": (
        _sum_splits_kernel,
        dict(partials_ptr="*fp32", out_ptr="*bf16"),
        dict(NUM_SPLITS=16, BLOCK=1024),
        dict(num_warps=4),
    ),
    "add + RMSNorm over partial sums": (
        _add_rms_norm_kernel,
        ADD_RMS_NORM_TYPES,
        dict(HIDDEN=1024, BLOCK=1024, HAS_RESIDUAL=True, NUM_PARTIALS=4, FP8_OUT=False),
        dict(num_warps=4),
    ),
    # An fp8 projection's input, quantized per token by the norm before it (Llama-3.1-8B).
    "add + RMSNorm into fp8 rows": (
        _add_rms_norm_kernel,
        dict(ADD_RMS_NORM_TYPES, x_ptr="*bf16", out_ptr="*fp8e4nv", scale_ptr="*fp32"),
        dict(HIDDEN=4096, BLOCK=4096, HAS_RESIDUAL=True, NUM_PARTIALS=0, FP8_OUT=True),
        dict(num_warps=8),
    ),
    "4-bit dequantize-GEMM, split-K, groups in input order": (
        _int4_split_k_kernel,
        dict(x_ptr="*bf16", qweight_ptr="*i32", scales_ptr="*bf16", zeros_ptr="*bf16", partials_ptr="*fp32"),
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, K_PER_SPLIT=512, GROUP_SIZE=128),
        dict(num_warps=4, num_stages=4),
    ),
    "4-bit dequantize-GEMM, split-K, 64-row tiles": (
        _int4_split_k_kernel,
        dict(x_ptr="*bf16", qweight_ptr="*i32", scales_ptr="*bf16", zeros_ptr="*bf16", partials_ptr="*fp32"),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, K_PER_SPLIT=512, GROUP_SIZE=128),
        dict(num_warps=4, num_stages=4),
    ),
    "4-bit matrix-vector product": (
        _int4_gemv_kernel,
        dict(x_ptr="*bf16", qweight_ptr="*i32", scales_ptr="*bf16", zeros_ptr="*bf16", out_ptr="*fp32"),
        # Three tiles a slice: a pair and one more.
        dict(BLOCK_N=64, BLOCK_K=128, K_PER_SPLIT=384, GROUP_SIZE=128, LOAD_STAGES=1, PTX=True),
        dict(num_warps=4),
    ),
    "4-bit matrix-vector product, loads pipelined": (
        _int4_gemv_kernel,
        dict(x_ptr="*bf16", qweight_ptr="*i32", scales_ptr="*bf16", zeros_ptr="*bf16", out_ptr="*fp32"),
        # Eight tiles a slice: four loop steps to pipeline.
        dict(BLOCK_N=64, BLOCK_K=128, K_PER_SPLIT=1024, GROUP_SIZE=128, LOAD_STAGES=3, PTX=True),
        dict(num_warps=4),
    ),
    "4-bit dequantization": (
        _dequantize_int4_kernel,
        dict(qweight_ptr="*i32", scales_ptr="*bf16", zeros_ptr="*bf16", g_idx_ptr="*i32", out_ptr="*bf16"),
        dict(BLOCK_K=64, BLOCK_N=128),
        dict(num_warps=4),
    ),
    "per-token fp8 quantization": (
        _quantize_rows_kernel,
        dict(x_ptr="*bf16", out_ptr="*fp8e4nv", scale_ptr="*fp32"),
        dict(COLS=4096, BLOCK=4096),
        dict(num_warps=4),
    ),
    "SiLU and mul": (
        _silu_and_mul_kernel,
        dict(x_ptr="*bf16", out_ptr="*bf16"),
        dict(INTERMEDIATE=3072, BLOCK=1024, FP8_OUT=False),
        dict(num_warps=4),
    ),
    "SiLU and mul into fp8 rows": (
        _silu_and_mul_kernel,
        dict(x_ptr="*bf16", out_ptr="*fp8e4nv", scale_ptr="*fp32"),
        dict(INTERMEDIATE=14336, BLOCK=16384, FP8_OUT=True),
        dict(num_warps=16),
    ),
}
