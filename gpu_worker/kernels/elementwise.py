"""Per-token ops of the decoder, as plain PyTorch references and device dispatch.

The references define the arithmetic (fp32 statistics, rounding to the activation dtype
where Hugging Face's modeling code rounds) and are the CPU path. On CUDA each call goes to
its Triton kernel in kernels/triton_elementwise.py, imported only there so that the CPU
path needs no Triton; the q/k norm and rotary embedding run fused with the KV-cache store
(kernels/attention_backend.py: rotate_and_store).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpu_worker.kernels.w8a8 import Fp8Rows


def _use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (rms_norm(x + residual) * weight, x + residual); without a residual, the
    plain norm of x and None. With a residual, x may be a projection's fp32 split-K partial
    sums, [splits, T, hidden]: their total in the activation dtype is the projection."""
    if residual is not None and x.dim() == residual.dim() + 1:
        x = x.sum(dim=0).to(residual.dtype)
    if residual is not None:
        x = x + residual
        residual = x
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), residual


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if _use_triton(x) and (x.dim() == 2 or (residual is not None and x.dim() == 3)):
        from gpu_worker.kernels.triton_elementwise import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[Fp8Rows, torch.Tensor | None]:
    """add_rms_norm with the normed rows quantized per token for an fp8 projection, in the
    same kernel (CUDA only: where w8a8.takes_fp8_rows says so)."""
    from gpu_worker.kernels.triton_elementwise import add_rms_norm_fp8_triton

    return add_rms_norm_fp8_triton(x, residual, weight, eps)


def qk_norm_rope_reference(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional per-head RMSNorm (Qwen3), then rotary embedding in the rotate-half layout.

    query: [T, H, D]; key: [T, H_kv, D]; cos_sin_cache: [max_position, D] fp32 holding
    cos(position * inv_freq) then sin(position * inv_freq).
    """
    if q_weight is not None and k_weight is not None:
        query, _ = add_rms_norm_reference(query, None, q_weight, eps)
        key, _ = add_rms_norm_reference(key, None, k_weight, eps)
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Gemma's gated MLP activation; PyTorch's own kernel on every device."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _use_triton(x):
        from gpu_worker.kernels.triton_elementwise import silu_and_mul_triton

        return silu_and_mul_triton(x)
    return silu_and_mul_reference(x)


def silu_and_mul_fp8(x: torch.Tensor) -> Fp8Rows:
    """silu_and_mul quantized per token for an fp8 projection, in the same kernel (CUDA
    only: where w8a8.takes_fp8_rows says so)."""
    from gpu_worker.kernels.triton_elementwise import silu_and_mul_fp8_triton

    return silu_and_mul_fp8_triton(x)


# A config's hidden_act: its gated MLP's activation, act(gate) * up of [..., 2 * I].
GATED_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu_and_mul,
    "gelu_pytorch_tanh": gelu_tanh_and_mul,
}
