"""The fp8 linear kernels against their PyTorch references: fp8 weights widened inside the
split-K kernel (a scale per output channel, or per block), and the per-token activation
quantization (run with kernel_cases.py by
tests/kernels/test_kernels.py, whose import sets up the interpreter)."""

from __future__ import annotations

import pytest
import torch

# First: importing the cases sets TRITON_INTERPRET before triton is imported.
from tests.kernels.kernel_cases import (
    DEVICE,
    DTYPE,
    ON_GPU,
    _relative_error,
    _triton_interpreter_on_cpu,
)

# isort: split
from gpu_worker.kernels.block_fp8 import block_fp8_linear_reference
from gpu_worker.kernels.triton_elementwise import (
    add_rms_norm_fp8_triton,
    add_rms_norm_triton,
    silu_and_mul_fp8_triton,
    silu_and_mul_triton,
)
from gpu_worker.kernels.triton_linear import (
    block_scaled_linear_partial_sums,
    block_scaled_plan,
    scaled_linear_partial_sums,
)
from gpu_worker.kernels.triton_quantize import quantize_rows_fp8_triton
from gpu_worker.kernels.w8a8 import Fp8Rows, quantize_rows

__all__ = ["_triton_interpreter_on_cpu"]  # the autouse fixture, used here by pytest


@pytest.mark.parametrize("num_rows, num_splits", [(1, 4), (20, 1)])
def test_fp8_weights_with_channel_scales_widen_as_they_load(num_rows: int, num_splits: int) -> None:
    # A W8A16 decode: fp8 (e4m3) weights with one scale per output channel, bf16 rows.
    out_features, in_features = (1024, 3072) if ON_GPU else (80, 512)
    x = torch.randn(num_rows, in_features, device=DEVICE).to(DTYPE)
    weight, scale = quantize_rows(0.05 * torch.randn(out_features, in_features, device=DEVICE), "fp8")
    plan = {"num_splits": num_splits, "block_m": 16, "block_n": 32}
    partials = scaled_linear_partial_sums(x, weight, scale.view(-1), plan)
    assert partials.shape == (num_splits, num_rows, out_features)
    expected = x.double() @ (weight.double() * scale.double()).T
    assert _relative_error(partials.sum(dim=0), expected) < (1e-2 if ON_GPU else 1e-5)


def _block_fp8_weight(
    out_features: int, in_features: int, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 weights and their [out / bn, in / bk] scales, blocks of very different sizes."""
    grid = (-(-out_features // block[0]), in_features // block[1])
    scale = torch.rand(grid, device=DEVICE) * 1e-3 + 1e-5
    values = torch.randn(out_features, in_features, device=DEVICE).clamp(-4, 4) * 100
    return values.to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize(
    "num_rows, out_features, in_features, block",
    # One row split over the inputs; rows past the split-K sizes; blocks narrower than a
    # tile; outputs that end within a block (a scale grid that rounds up).
    [(1, 256, 1024, (128, 128)), (5, 96, 256, (16, 16)), (130, 80, 256, (32, 64)), (7, 200, 512, (128, 128))],
)
def test_fp8_weights_with_block_scales_match_the_dequantized_linear(
    num_rows: int, out_features: int, in_features: int, block: tuple[int, int]
) -> None:
    x = torch.randn(num_rows, in_features, device=DEVICE).to(DTYPE)
    weight, scale = _block_fp8_weight(out_features, in_features, block)
    partials = block_scaled_linear_partial_sums(x, weight, scale, block)
    plan = block_scaled_plan(num_rows, out_features, in_features, block[1])
    assert partials.shape == (plan["num_splits"], num_rows, out_features)
    expected = block_fp8_linear_reference(x.double(), weight, scale, block, None)
    assert _relative_error(partials.sum(dim=0), expected) < (1e-2 if ON_GPU else 1e-5)
    # Each block's own scale counts: the same weights under one scale give another product.
    uniform = block_scaled_linear_partial_sums(x, weight, torch.full_like(scale, scale.mean().item()), block)
    assert _relative_error(uniform.sum(dim=0), expected) > 0.1


def _assert_fp8_rows_equal(rows: Fp8Rows, expected: torch.Tensor) -> None:
    """rows hold `expected` (the reference's output in the activation dtype) quantized as
    quantize_rows does it, and zero padding rows up to a multiple of 16."""
    num_rows, cols = expected.shape
    assert rows.num_rows == num_rows and rows.dtype == expected.dtype
    padded_rows = -(-num_rows // 16) * 16
    assert rows.values.shape == (padded_rows, cols) and rows.scales.shape == (padded_rows, 1)
    expected_values, expected_scale = quantize_rows(expected, "fp8")
    torch.testing.assert_close(rows.scales[:num_rows], expected_scale, rtol=0, atol=0)
    actual, wanted = rows.values[:num_rows].float(), expected_values.float()
    assert torch.equal(actual, wanted)
    assert not rows.values[num_rows:].float().any()


def _scaled_rows(num_rows: int, cols: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, cols, generator=generator) * torch.rand(num_rows, 1, generator=generator) * 10
    return x.to(DEVICE, DTYPE)


@pytest.mark.parametrize("num_rows", [1, 16, 37])
def test_fp8_row_quantization_matches_the_reference_and_zeroes_the_padding(num_rows: int) -> None:
    x = _scaled_rows(num_rows, 4096 if ON_GPU else 200)
    _assert_fp8_rows_equal(quantize_rows_fp8_triton(x), x)


@pytest.mark.parametrize(
    "num_rows, with_residual, num_partials", [(1, False, 0), (37, True, 0), (17, True, 3)]
)
def test_add_rms_norm_quantizes_its_rows_as_the_projection_would(
    num_rows: int, with_residual: bool, num_partials: int
) -> None:
    # An fp8 projection's input made by the norm before it, in the same kernel.
    hidden = 4096 if ON_GPU else 200
    residual = _scaled_rows(num_rows, hidden) if with_residual else None
    x = _scaled_rows(num_rows + 1, hidden)[1:]
    generator = torch.Generator().manual_seed(hidden + num_rows)
    if num_partials:
        x = torch.randn(num_partials, num_rows, hidden, generator=generator).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(DEVICE, DTYPE)
    rows, summed = add_rms_norm_fp8_triton(x, residual, weight, 1e-6)
    # The fused quantization is the projection's of the unfused kernel's rows.
    expected, expected_sum = add_rms_norm_triton(x, residual, weight, 1e-6)
    _assert_fp8_rows_equal(rows, expected)
    if with_residual:
        assert summed is not None and expected_sum is not None
        assert torch.equal(summed, expected_sum)
    else:
        assert summed is None


@pytest.mark.parametrize("num_rows", [1, 37])
def test_silu_and_mul_quantizes_its_rows_as_the_projection_would(num_rows: int) -> None:
    x = _scaled_rows(num_rows, 2 * (3072 if ON_GPU else 200)) / 3
    _assert_fp8_rows_equal(silu_and_mul_fp8_triton(x), silu_and_mul_triton(x))
