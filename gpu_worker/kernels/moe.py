"""Mixture-of-experts routing and expert computation: PyTorch references and dispatch.

Expert weights are stacked per layer: w13 [E, 2 * I, H] holds each expert's gate rows then
its up rows, w2 [E, H, I] its down projection. A token's output is the sum over its top-k
experts of weight * down(act(gate(x)) * up(x)). The references are the CPU path and what
the fused Triton kernel (kernels/triton_moe.py) must compute. Experts from a fine-grained
fp8 checkpoint are fp8 with one scale per block of weights (ExpertScales): the reference
dequantizes them, the kernel scales each tile's product by its block's scale.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gpu_worker.kernels.block_fp8 import dequantize_blocks
from gpu_worker.kernels.elementwise import GATED_ACTIVATIONS


class ExpertScales(NamedTuple):
    """Block scales of fp8 experts: w13 [E, 2 * I / bn, H / bk], w2 [E, H / bn, I / bk],
    block = (bn, bk)."""

    w13: torch.Tensor
    w2: torch.Tensor
    block: tuple[int, int]


def route_reference(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, then the top_k, optionally renormalized to sum to
    one (Mixtral always, Qwen3-MoE per norm_topk_prob). Returns (weights [T, k] fp32,
    expert ids [T, k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """route_reference's result: on CUDA in one Triton launch (kernels/triton_moe_route.py)."""
    if router_logits.is_cuda:
        from gpu_worker.kernels.triton_moe_route import MAX_ROUTE_EXPERTS, route_triton

        if router_logits.shape[-1] <= MAX_ROUTE_EXPERTS:
            return route_triton(router_logits.contiguous(), top_k, renormalize)
    return route_reference(router_logits, top_k, renormalize)


def fused_moe_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    hidden_act: str,
) -> torch.Tensor:
    """x: [T, H]. Each expert computes over the tokens routed to it, and its weighted
    output is added into theirs; the arithmetic follows Hugging Face's expert loop
    (weights rounded to the activation dtype). hidden_act: a key of GATED_ACTIVATIONS."""
    act_and_mul = GATED_ACTIVATIONS[hidden_act]
    output = torch.zeros_like(x)
    weights = topk_weights.to(x.dtype)
    for expert in torch.unique(topk_ids).tolist():
        tokens, slots = torch.nonzero(topk_ids == expert, as_tuple=True)
        hidden = act_and_mul(x[tokens] @ w13[expert].t()) @ w2[expert].t()
        output.index_add_(0, tokens, hidden * weights[tokens, slots, None])
    return output


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    hidden_act: str,
    scales: ExpertScales | None = None,
) -> torch.Tensor:
    """scales: w13 and w2 are fp8 with these block scales."""
    if x.is_cuda:
        from gpu_worker.kernels.triton_moe import fused_moe_triton

        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, hidden_act, scales=scales)
    if scales is not None:
        w13 = dequantize_blocks(w13, scales.w13, scales.block).to(x.dtype)
        w2 = dequantize_blocks(w2, scales.w2, scales.block).to(x.dtype)
    return fused_moe_reference(x, w13, w2, topk_weights, topk_ids, hidden_act)
