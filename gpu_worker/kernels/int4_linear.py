"""4-bit weight-only linear layers (AWQ and GPTQ checkpoints, in one common layout).

The layout, to which gpu_worker/model/quantization/int4_formats.py converts both formats:
qweight int32 [in / 8, out], eight 4-bit values along the input dimension per int32
(input k in bits 4 * (k % 8) of row k // 8); scales and zeros [groups, out] in the
activation dtype; g_idx int32 [in], the group of each input feature (k // group_size,
or GPTQ act_order's own order). The weight is W[n, k] = (q[k, n] - zeros[g, n]) *
scales[g, n] with g = g_idx[k].

Few rows (decode) run Triton kernels that dequantize tiles as they multiply, reading a
quarter of bf16's bytes: for one row, one on the CUDA cores that opens and multiplies
weights two at a time in fp16 pairs (kernels/triton_int4_gemv.py); up to 64 rows, where
groups follow the input order, a form split along the input dimension whose one tile of
rows opens each weight once; up to 16 rows of GPTQ act_order, a form that gathers each
weight's group. More rows dequantize the whole weight once
(kernels/triton_int4_dequantize.py) and use cuBLAS, where the GEMM, not the bytes, is the
cost. The PyTorch reference runs on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_FACTOR = 8
# Most rows the act_order kernel takes; more run dequantize-then-GEMM. On an H100 with
# Llama-3.1-8B's shapes a decode step of 32 rows took 24.0 ms in it against 8.5 ms in bf16:
# each tile of 16 rows opens every weight again.
MAX_GATHERED_ROWS = 16


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 holding eight 4-bit values each, value i in bits 4i, unpacked along `dim`
    (which grows 8-fold) in that order, as int32 in [0, 16)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    moved = packed.movedim(dim, -1)
    values = (moved.unsqueeze(-1) >> shifts) & 0xF
    return values.flatten(-2).movedim(-1, dim)


def pack_int4(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of unpack_int4: eight values in [0, 16) along `dim` per int32."""
    moved = values.to(torch.int32).movedim(dim, -1)
    grouped = moved.reshape(*moved.shape[:-1], -1, PACK_FACTOR)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=values.device)
    packed = (grouped << shifts).sum(dim=-1, dtype=torch.int64)
    # Bit 31 set wraps to a negative int32, as the checkpoints store it.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32).movedim(-1, dim).contiguous()


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """The weight [out, in] in the scales' dtype, from the common layout."""
    values = unpack_int4(qweight, dim=0)  # [in, out]
    groups = g_idx.long()
    weight = (values.to(scales.dtype) - zeros[groups]) * scales[groups]
    return weight.t()


def int4_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    weight = dequantize_int4(qweight, scales, zeros, g_idx).to(x.dtype)
    return F.linear(x, weight, bias)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int = 0,
) -> torch.Tensor:
    """x [..., in] times the 4-bit weight, chosen by row count (see the module doc).
    group_size: when g_idx is k // group_size (AWQ, GPTQ without act_order), its size,
    which lets the fewest rows take the split-K kernel; 0: g_idx says."""
    if x.is_cuda and (out := _fused_int4_linear(x, qweight, scales, zeros, g_idx, group_size)) is not None:
        return out + bias if bias is not None else out
    if x.is_cuda:
        from gpu_worker.kernels.triton_int4_dequantize import dequantize_int4_triton

        weight = dequantize_int4_triton(qweight, scales, zeros, g_idx, x.dtype)
        return F.linear(x, weight.t(), bias)
    return int4_linear_reference(x, qweight, scales, zeros, g_idx, bias)


def fused_int4_kernel(rows: int, in_features: int, out_features: int, group_size: int) -> str | None:
    """Which dequantize-as-it-multiplies kernel takes `rows` rows (see the module doc):
    "gemv", "split-k" or "gathered"; None where dequantize-then-GEMM is faster."""
    from gpu_worker.kernels import triton_int4_gemv as gemv
    from gpu_worker.kernels import triton_int4_linear as kernels

    if rows == 1 and group_size and gemv.int4_gemv_plan(out_features, in_features, group_size):
        return "gemv"
    if (
        rows <= kernels.MAX_SPLIT_K_ROWS
        and group_size
        and kernels.grouped_split_k_block(in_features, group_size)
    ):
        return "split-k"
    if rows <= MAX_GATHERED_ROWS:
        return "gathered"
    return None


def _fused_int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    group_size: int,
) -> torch.Tensor | None:
    """x times the weight by fused_int4_kernel's choice, or None where it has none."""
    from gpu_worker.kernels import triton_int4_gemv as gemv
    from gpu_worker.kernels import triton_int4_linear as kernels

    rows, in_features = x.numel() // x.shape[-1], x.shape[-1]
    x2 = x.reshape(rows, in_features)
    kernel = fused_int4_kernel(rows, in_features, qweight.shape[1], group_size)
    if kernel == "gemv":
        out = gemv.int4_gemv_triton(x2, qweight, scales, zeros, group_size)
    elif kernel == "split-k":
        out = kernels.int4_linear_grouped_triton(x2, qweight, scales, zeros, group_size)
    elif kernel == "gathered":
        out = kernels.int4_linear_triton(x2, qweight, scales, zeros, g_idx)
    else:
        return None
    return out.reshape(*x.shape[:-1], qweight.shape[1])
