"""The fp8 linear kernels against their PyTorch references: fp8 weights widened inside the
split-K kernel, and the per-token activation quantization (run with kernel_cases.py by
tests/kernels/test_kernels.py, whose import sets up the interpreter)."""

from __future__ import annotations

import pytest
import torch

# First: importing the cases sets TRITON_INTERPRET before triton is imported.
from tests.kernels.kernel_cases import DEVICE, DTYPE, ON_GPU, _relative_error, _triton_interpreter_on_cpu

# isort: split
from gpu_worker.kernels.triton_linear import scaled_linear_partial_sums
from gpu_worker.kernels.triton_quantize import quantize_rows_fp8_triton
from gpu_worker.kernels.w8a8 import _MIN_SCALE, FP8_MAX, quantize_rows

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


@pytest.mark.parametrize("num_rows, padded_rows", [(1, 16), (16, 16), (37, 48)])
def test_fp8_row_quantization_matches_the_reference_and_zeroes_the_padding(
    num_rows: int, padded_rows: int
) -> None:
    cols = 4096 if ON_GPU else 200
    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, cols, generator=generator) * torch.rand(num_rows, 1, generator=generator) * 10
    x = x.to(DEVICE, DTYPE)
    values, scale = quantize_rows_fp8_triton(x, padded_rows, FP8_MAX, _MIN_SCALE)
    expected_values, expected_scale = quantize_rows(x, "fp8")
    assert values.shape == (padded_rows, cols) and scale.shape == (padded_rows, 1)
    torch.testing.assert_close(scale[:num_rows], expected_scale, rtol=0, atol=0)
    actual, expected = values[:num_rows].float(), expected_values.float()
    if ON_GPU:
        assert torch.equal(actual, expected)
    else:
        # Triton 3.6's interpreter rounds to float8 in its own way in two places (see the
        # fp8 KV-store case): a value that should round up to 2^k can come out as 2^(k-1)
        # (a lost carry), and subnormals can land one step (2^-9) off. Every other value
        # must be exact.
        lost_carry = (actual == expected / 2) & (expected.abs().log2() == expected.abs().log2().round())
        subnormal_step = (expected.abs() < 2**-6) & ((actual - expected).abs() <= 2**-9)
        assert ((actual == expected) | lost_carry | subnormal_step).all()
        assert (lost_carry | subnormal_step).float().mean() < 0.05
    assert not values[num_rows:].float().any()
