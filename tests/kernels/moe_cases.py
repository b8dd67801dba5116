"""The fused mixture-of-experts kernel against its PyTorch reference (run with
kernel_cases.py by tests/kernels/test_kernels.py, whose import sets up the interpreter)."""

from __future__ import annotations

import pytest
import torch

# First: importing the cases sets TRITON_INTERPRET before triton is imported.
from tests.kernels.kernel_cases import DEVICE, DTYPE, ON_GPU, _relative_error, _triton_interpreter_on_cpu

# isort: split
from gpu_worker.kernels.elementwise import silu_and_mul_reference
from gpu_worker.kernels.moe import fused_moe_reference, route
from gpu_worker.kernels.triton_moe import align_by_expert, fused_moe_triton

__all__ = ["_triton_interpreter_on_cpu"]  # the autouse fixture, used here by pytest


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 2), (5, 8, 2), (37, 8, 3), (64, 4, 1)])
def test_fused_moe_matches_reference(num_tokens: int, num_experts: int, top_k: int) -> None:
    # Intermediate and hidden sizes that do not fill the kernel's tiles on CPU.
    hidden, intermediate = (1024, 768) if ON_GPU else (48, 40)
    generator = torch.Generator().manual_seed(num_tokens)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, DTYPE)

    x = randn(num_tokens, hidden)
    w13 = randn(num_experts, 2 * intermediate, hidden, scale=hidden**-0.5)
    w2 = randn(num_experts, hidden, intermediate, scale=intermediate**-0.5)
    weights, ids = route(randn(num_tokens, num_experts), top_k, renormalize=top_k > 1)
    output = fused_moe_triton(x, w13, w2, weights, ids, silu_and_mul_reference)
    expected = fused_moe_reference(x, w13, w2, weights, ids, silu_and_mul_reference)
    assert _relative_error(output, expected) < (2e-2 if ON_GPU else 1e-5)


def test_align_by_expert_groups_pairs_in_padded_tiles() -> None:
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]], device=DEVICE)
    sorted_ids, expert_of_block, num_padded = align_by_expert(ids, 4, block_m=4)
    # Pairs (token * k + choice): expert 0 has 1 and 4, expert 1 has 3, expert 2 has 0, 2, 5.
    pad = 6
    assert sorted_ids[:12].tolist() == [1, 4, pad, pad, 3, pad, pad, pad, 0, 2, 5, pad]
    assert expert_of_block[:3].tolist() == [0, 1, 2]
    assert num_padded.tolist() == [12]
    assert (sorted_ids[12:] == pad).all()
