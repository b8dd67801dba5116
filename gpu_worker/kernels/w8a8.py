"""W8A8 linear layers: int8 or fp8 (e4m3) weights with one scale per output channel, and
activations quantized per token on the fly.

y[t, n] = (sum_k xq[t, k] * wq[n, k]) * x_scale[t] * w_scale[n]: the products of 8-bit
values are exact in the GEMM's accumulator, so the two scales apply once per output.
On CUDA fp8 runs through torch._scaled_mm (Hopper and Ada), int8 through torch._int_mm
where its shape rules allow; elsewhere the plain PyTorch references below run, which the
tests also take as the truth for the device paths. At a few rows a step only streams
weights in, and quantizing the activations costs more kernels than the GEMM: there fp8
weights are widened as they load, beside activations left as they are, by the split-K
kernel of gpu_worker/kernels/triton_linear.py (W8A16: the same weights, fewer roundings).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

INT8_MAX = 127.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
# A zero row would divide by zero; any scale quantizes it to zeros.
_MIN_SCALE = 1e-12


class Fp8Rows(NamedTuple):
    """Activations quantized per token by the kernel that made them (add + RMSNorm,
    SiLU-and-mul), for an fp8 projection: e4m3 values [padded_rows, cols] (the rows past
    num_rows zero, padded as cuBLASLt wants), fp32 scales [padded_rows, 1], and the
    activation dtype the projection returns."""

    values: torch.Tensor
    scales: torch.Tensor
    num_rows: int
    dtype: torch.dtype

    @classmethod
    def empty(cls, num_rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Fp8Rows:
        padded_rows = -(-num_rows // 16) * 16
        values = torch.empty(padded_rows, cols, dtype=FP8_DTYPE, device=device)
        scales = torch.empty(padded_rows, 1, dtype=torch.float32, device=device)
        return cls(values, scales, num_rows, dtype)


def quant_dtype(kind: str) -> torch.dtype:
    if kind == "int8":
        return torch.int8
    if kind == "fp8":
        return FP8_DTYPE
    raise ValueError(f"unknown W8A8 kind {kind!r}; expected 'int8' or 'fp8'")


def quantize_rows(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of each row of a 2-D tensor: (values, fp32 scale [rows, 1]).
    Per token for activations, per output channel for weights [out, in]."""
    x32 = x.float()
    qmax = INT8_MAX if kind == "int8" else FP8_MAX
    scale = (x32.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=_MIN_SCALE)
    scaled = x32 / scale
    if kind == "int8":
        return scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(quant_dtype(kind)), scale


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values.float() * scale.float().view(-1, 1)


def w8a8_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, kind: str
) -> torch.Tensor:
    """The dequantize-then-GEMM reference, in fp32 (float64 for int8 products, whose exact
    sums can pass fp32's 24-bit mantissa), rounded to x's dtype once."""
    xq, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]), kind)
    compute = torch.float64 if kind == "int8" else torch.float32
    out = (xq.to(compute) @ weight.to(compute).t()).float() * x_scale * weight_scale.view(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def w8a8_linear(
    x: torch.Tensor | Fp8Rows,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    kind: str,
) -> torch.Tensor:
    """x [..., in] (or rows already in fp8, on CUDA) by weight [out, in] (int8 or fp8) with
    weight_scale [out] (fp32)."""
    if isinstance(x, Fp8Rows):
        return _fp8_scaled_mm(x, weight, weight_scale, bias)
    if not x.is_cuda:
        return w8a8_linear_reference(x, weight, weight_scale, bias, kind)
    x2 = x.reshape(-1, x.shape[-1])
    if kind == "fp8" and (plan := _fp8_weight_only_plan(x2, weight)) is not None:
        from gpu_worker.kernels.triton_linear import scaled_linear_partial_sums, total_of

        out = total_of(scaled_linear_partial_sums(x2, weight, weight_scale, plan), x.dtype)
        if bias is not None:
            out = out + bias
    elif kind == "fp8":
        from gpu_worker.kernels.triton_quantize import quantize_rows_fp8_triton

        out = _fp8_scaled_mm(quantize_rows_fp8_triton(x2.contiguous()), weight, weight_scale, bias)
    elif _int_mm_fits(x2.shape[0], weight.shape[0], weight.shape[1]):
        xq, x_scale = quantize_rows(x2, kind)
        out = (torch._int_mm(xq, weight.t()).float() * x_scale * weight_scale.view(1, -1)).to(x.dtype)
        if bias is not None:
            out = out + bias
    else:
        return w8a8_linear_reference(x, weight, weight_scale, bias, kind)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def takes_fp8_rows(kind: str, num_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether w8a8_linear would quantize these activations per token for an fp8 GEMM: the
    kernel that makes them can then hand them over as Fp8Rows instead."""
    return (
        kind == "fp8"
        and device.type == "cuda"
        and num_rows > FP8_WEIGHT_ONLY_MAX_ROWS
        and dtype in (torch.bfloat16, torch.float16)
    )


# Rows up to which fp8 weights meet unquantized activations (see the module's docstring):
# measured on an H200 with Llama-3.1-8B's projections, this path beat bf16 cuBLAS up to 16
# rows (1.5x on qkv, gate_up and down at one row) and lost to it at 32.
FP8_WEIGHT_ONLY_MAX_ROWS = 16
_BLOCK_K = 128


def _fp8_weight_only_plan(x: torch.Tensor, weight: torch.Tensor) -> dict[str, int] | None:
    """Split-K launch parameters for fp8 weights, or None where _scaled_mm does better.
    Eight slices of the reduction where it divides so: at a row or a few, each program
    keeps more loads in flight over a shorter loop (the same sweep's best)."""
    num_rows, in_features = x.shape
    if num_rows > FP8_WEIGHT_ONLY_MAX_ROWS or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    if x.stride(1) != 1 or in_features % _BLOCK_K:
        return None
    k_tiles = in_features // _BLOCK_K
    num_splits = max(s for s in (1, 2, 4, 8) if k_tiles % s == 0)
    return {"num_splits": num_splits, "block_m": 16, "block_n": 64}


def _int_mm_fits(rows: int, out_features: int, in_features: int) -> bool:
    # torch._int_mm's CUDA shape rules: more than 16 rows, the other sides multiples of 8.
    return rows > 16 and out_features % 8 == 0 and in_features % 8 == 0


def _fp8_scaled_mm(
    rows: Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Row-wise scaled fp8 GEMM: weight [out, in] row-major is the column-major [in, out]
    operand cuBLASLt wants; its output in bf16 unless the activations are fp16."""
    out_dtype = rows.dtype if rows.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    out = torch._scaled_mm(
        rows.values,
        weight.t(),
        scale_a=rows.scales,
        scale_b=weight_scale.view(1, -1).float(),
        bias=bias.to(out_dtype) if bias is not None else None,
        out_dtype=out_dtype,
    )
    return out[: rows.num_rows].to(rows.dtype)
