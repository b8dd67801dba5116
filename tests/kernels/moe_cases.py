"""The fused mixture-of-experts kernel against its PyTorch reference (run with
kernel_cases.py by tests/kernels/test_kernels.py, whose import sets up the interpreter)."""

from __future__ import annotations

import pytest
import torch

# First: importing the cases sets TRITON_INTERPRET before triton is imported.
from tests.kernels.kernel_cases import DEVICE, DTYPE, ON_GPU, _relative_error, _triton_interpreter_on_cpu

# isort: split
from gpu_worker.kernels.block_fp8 import dequantize_blocks
from gpu_worker.kernels.moe import ExpertScales, fused_moe_reference, route
from gpu_worker.kernels.triton_moe import align_by_expert, fused_moe_triton, moe_plan
from gpu_worker.kernels.triton_moe_align import align_by_expert_triton

__all__ = ["_triton_interpreter_on_cpu"]  # the autouse fixture, used here by pytest


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 2), (5, 8, 2), (37, 8, 3), (64, 4, 1)])
@pytest.mark.parametrize("tiles", ["planned", "large"])
@pytest.mark.parametrize("hidden_act", ["silu", "gelu_pytorch_tanh"])
def test_fused_moe_matches_reference(
    num_tokens: int, num_experts: int, top_k: int, tiles: str, hidden_act: str
) -> None:
    # Intermediate and hidden sizes that do not fill the kernel's tiles on CPU; the tiles
    # moe_plan picks for these batches, and the large ones it picks for big batches. SiLU
    # is applied inside the gate/up GEMM, other activations by their own kernel.
    hidden, intermediate = (1024, 768) if ON_GPU else (48, 40)
    generator = torch.Generator().manual_seed(num_tokens)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, DTYPE)

    x = randn(num_tokens, hidden)
    w13 = randn(num_experts, 2 * intermediate, hidden, scale=hidden**-0.5)
    w2 = randn(num_experts, hidden, intermediate, scale=intermediate**-0.5)
    weights, ids = route(randn(num_tokens, num_experts), top_k, renormalize=top_k > 1)
    plans = None
    if tiles == "large":
        plans = (moe_plan(1 << 20, num_experts),) * 2
        assert plans[0]["block_m"] == 128
    output = fused_moe_triton(x, w13, w2, weights, ids, hidden_act, plans)
    expected = fused_moe_reference(x, w13, w2, weights, ids, hidden_act)
    assert _relative_error(output, expected) < (2e-2 if ON_GPU else 1e-5)


@pytest.mark.parametrize("num_tokens,tiles", [(3, "planned"), (37, "large")])
@pytest.mark.parametrize("hidden_act", ["silu", "gelu_pytorch_tanh"])
def test_fused_moe_over_fp8_experts_matches_the_dequantized_reference(
    num_tokens: int, tiles: str, hidden_act: str
) -> None:
    # A fine-grained fp8 checkpoint's experts: fp8 weights, a scale per block, blocks of
    # inputs narrower than the plan's tiles on CPU (the tile shrinks to one block).
    num_experts, top_k = 4, 2
    hidden, intermediate, block = (1024, 768, (128, 128)) if ON_GPU else (64, 32, (16, 32))
    generator = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=generator).to(DEVICE, DTYPE)

    def fp8_experts(rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        values = (torch.randn(num_experts, rows, columns, generator=generator) * 64).to(torch.float8_e4m3fn)
        grid = (num_experts, -(-rows // block[0]), columns // block[1])
        return values.to(DEVICE), (torch.rand(grid, generator=generator) * columns**-0.5 / 32).to(DEVICE)

    (w13, w13_scale), (w2, w2_scale) = (
        fp8_experts(2 * intermediate, hidden),
        fp8_experts(hidden, intermediate),
    )
    scales = ExpertScales(w13_scale, w2_scale, block)
    weights, ids = route(torch.randn(num_tokens, num_experts, generator=generator).to(DEVICE), top_k, True)
    plans = (moe_plan(1 << 20, num_experts),) * 2 if tiles == "large" else None
    output = fused_moe_triton(x, w13, w2, weights, ids, hidden_act, plans, scales)
    dequantized = [
        dequantize_blocks(w, scale, block).to(DTYPE) for w, scale in ((w13, w13_scale), (w2, w2_scale))
    ]
    expected = fused_moe_reference(x, *dequantized, weights, ids, hidden_act)
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


def _routing(num_tokens: int, top_k: int, num_experts: int, same: bool, seed: int) -> torch.Tensor:
    """Distinct experts per token. Expert 0 and the middle one are never picked where top_k
    leaves room (empty runs first and between); with `same` every token picks one set."""
    generator = torch.Generator().manual_seed(seed)
    unpicked = (0, num_experts // 2) if num_experts - top_k >= 2 else ()
    allowed = torch.tensor([e for e in range(num_experts) if e not in unpicked])
    rows = [allowed[torch.randperm(len(allowed), generator=generator)[:top_k]] for _ in range(num_tokens)]
    return torch.stack(rows[:1] * num_tokens if same else rows)


@pytest.mark.parametrize("same", [False, True], ids=["random", "same-experts"])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("num_experts", [8, 128])
@pytest.mark.parametrize("top_k", [2, 8])
@pytest.mark.parametrize("num_tokens", [1, 3, 64])
def test_align_in_one_kernel_matches_pytorch(
    num_tokens: int, top_k: int, num_experts: int, block_m: int, same: bool
) -> None:
    ids = _routing(num_tokens, top_k, num_experts, same, seed=num_tokens * num_experts + top_k)
    # On CPU tensors align_by_expert never takes the kernel: it is the PyTorch path.
    expected = align_by_expert(ids, num_experts, block_m)
    output = align_by_expert_triton(ids.to(DEVICE), num_experts, block_m)
    for name, actual, want in zip(("sorted_ids", "expert_of_block", "num_padded"), output, expected):
        assert actual.dtype == want.dtype and actual.shape == want.shape, name
        assert torch.equal(actual.cpu(), want), name


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 2), (5, 60, 4), (33, 128, 8), (3, 6, 6)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_in_one_kernel_matches_pytorch(
    num_tokens: int, num_experts: int, top_k: int, renormalize: bool
) -> None:
    # Expert counts that are not powers of two (padding columns must never be chosen), k
    # equal to the experts, and the router's logits in the activation dtype: distinct
    # within a token (multiples of 1/16, exact in bf16), as ties have no defined order.
    from gpu_worker.kernels.moe import route_reference
    from gpu_worker.kernels.triton_moe_route import route_triton

    generator = torch.Generator().manual_seed(num_experts + top_k)
    ranks = torch.stack([torch.randperm(num_experts, generator=generator) for _ in range(num_tokens)])
    logits = ((ranks - num_experts / 2) / 16).to(DEVICE, DTYPE)
    weights, ids = route_triton(logits, top_k, renormalize)
    expected_weights, expected_ids = route_reference(logits, top_k, renormalize)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_experts,top_k", [(60, 4), (6, 2), (128, 8)])
def test_route_of_a_nan_row_chooses_experts_that_exist(num_experts: int, top_k: int) -> None:
    # A CUDA graph's padding rows hold whatever their buffers held, NaN included; their
    # ids index the experts' weights all the same.
    from gpu_worker.kernels.triton_moe_route import route_triton

    logits = torch.randn(4, num_experts, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)
    logits[1] = float("nan")
    logits[2, 3] = float("nan")
    _, ids = route_triton(logits, top_k, renormalize=True)
    assert int(ids.min()) >= 0 and int(ids.max()) < num_experts, ids
