"""fp8 weights with one scale per block of [block_out, block_in] weights (HF's fine-grained
fp8, the format of the FP8 releases of DeepSeek-V3 and Qwen3), multiplied with activations
left as they are.

y = x (W * S)^T, S each block's scale repeated over its block. On CUDA the weights stay in
fp8, half of bf16's bytes, so a step that mostly streams weights in (decode) reads half
as much; the split-K kernel of gpu_worker/kernels/triton_linear.py widens each weight tile
as it loads it and scales the tile's fp32 product by its block's scale. The activations
are not quantized: the products are the checkpoint's own weights times the model's
activations, the dequantized model's arithmetic up to the order of fp32 sums, which the
reference below defines. Elsewhere the weights are dequantized once, at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dequantize_blocks(
    weight: torch.Tensor, block_scale: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """fp32 weights [..., out, in] from fp8 `weight` and block_scale [..., out / bn, in / bk]
    (stacked experts too; the last row or column of blocks may be cut short)."""
    (rows, columns), (block_out, block_in) = weight.shape[-2:], block
    scales = block_scale.float().repeat_interleave(block_out, -2)[..., :rows, :]
    return weight.float() * scales.repeat_interleave(block_in, -1)[..., :columns]


def block_fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    block_scale: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The dequantized weights' linear layer in fp32, rounded to x's dtype once."""
    out = F.linear(
        x.float(), dequantize_blocks(weight, block_scale, block), bias.float() if bias is not None else None
    )
    return out.to(x.dtype)


def block_fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    block_scale: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [..., in] by fp8 weight [out, in] with block_scale [out / bn, in / bk] (fp32)."""
    if not x.is_cuda:
        return block_fp8_linear_reference(x, weight, block_scale, block, bias)
    from gpu_worker.kernels.triton_linear import block_scaled_linear_partial_sums, total_of

    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = total_of(block_scaled_linear_partial_sums(x2, weight, block_scale, block), x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])
