"""MoE routing (kernels.moe.route) in one Triton kernel: softmax over the experts, the
top k, and their renormalization, a program per token.

In PyTorch that is a cast, a softmax, a top-k and for renormalizing models a sum and a
division, each a launch; at decode, with one or a few tokens, those launches cost about
as much as the expert GEMMs after them. Each program holds its token's router logits
(at most MAX_ROUTE_EXPERTS) and picks the k largest one by one, each time the leftmost
of equal values, as torch.topk returns them in descending order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.launch import pdl_launch, wait_for_previous_kernel

# The experts a program holds in registers; more route in PyTorch.
MAX_ROUTE_EXPERTS = 512


@triton.jit
def _route_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    num_experts,
    logits_stride,
    TOP_K: tl.constexpr,
    TOP_K_PAD: tl.constexpr,
    EXPERTS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, EXPERTS)
    logits = tl.load(
        logits_ptr + token * logits_stride + experts, mask=experts < num_experts, other=float("-inf")
    ).to(tl.float32)
    probs = tl.exp(logits - tl.max(logits, axis=0))
    # Below every probability, so that no padding column is ever chosen.
    probs = tl.where(experts < num_experts, probs / tl.sum(probs, axis=0), -2.0)
    slots = tl.arange(0, TOP_K_PAD)
    chosen_probs = tl.zeros([TOP_K_PAD], tl.float32)
    chosen_ids = tl.zeros([TOP_K_PAD], tl.int64)
    remaining = probs
    for slot in tl.static_range(TOP_K):
        # A row of NaN logits (a graph's padding row, whose values are whatever its
        # buffers held) compares with nothing: the clamp keeps the id an expert's.
        expert = tl.minimum(tl.argmax(remaining, axis=0, tie_break_left=True), num_experts - 1)
        prob = tl.max(remaining, axis=0)
        chosen_probs = tl.where(slots == slot, prob, chosen_probs)
        chosen_ids = tl.where(slots == slot, expert.to(tl.int64), chosen_ids)
        remaining = tl.where(experts == expert, -1.0, remaining)
    if RENORMALIZE:
        chosen_probs = chosen_probs / tl.sum(chosen_probs, axis=0)
    valid = slots < TOP_K
    tl.store(weights_ptr + token * TOP_K + slots, chosen_probs, mask=valid)
    tl.store(ids_ptr + token * TOP_K + slots, chosen_ids, mask=valid)


def route_triton(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.moe.route's (weights [T, k] fp32, ids [T, k] int64) in one launch, for at
    most MAX_ROUTE_EXPERTS experts."""
    num_tokens, num_experts = router_logits.shape
    if num_experts > MAX_ROUTE_EXPERTS or router_logits.stride(1) != 1:
        raise ValueError(
            f"route_triton: {num_experts} experts (at most {MAX_ROUTE_EXPERTS}) or strided logits"
        )
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    _route_kernel[(num_tokens,)](
        router_logits,
        weights,
        ids,
        num_experts,
        router_logits.stride(0),
        TOP_K=top_k,
        TOP_K_PAD=triton.next_power_of_2(top_k),
        EXPERTS=triton.next_power_of_2(num_experts),
        RENORMALIZE=renormalize,
        num_warps=4 if num_experts > 128 else 1,
        **pdl_launch(router_logits.device),
    )
    return weights, ids
