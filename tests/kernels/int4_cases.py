"""The 4-bit dequantize-GEMM kernel against its PyTorch reference (run with kernel_cases.py
by tests/kernels/test_kernels.py, whose import sets up the interpreter)."""

from __future__ import annotations

import pytest
import torch

# First: importing the cases sets TRITON_INTERPRET before triton is imported.
from tests.kernels.kernel_cases import DEVICE, DTYPE, ON_GPU, _relative_error, _triton_interpreter_on_cpu

# isort: split
from gpu_worker.kernels.int4_linear import int4_linear_reference, pack_int4, unpack_int4
from gpu_worker.kernels.triton_int4_linear import int4_linear_triton

__all__ = ["_triton_interpreter_on_cpu"]  # the autouse fixture, used here by pytest


@pytest.mark.parametrize("num_rows", [1, 5, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_gemm_matches_reference(num_rows: int, act_order: bool) -> None:
    # Output and input sizes that do not fill the kernel's tiles on CPU.
    in_features, out_features, group_size = (4096, 1536, 128) if ON_GPU else (96, 40, 32)
    generator = torch.Generator().manual_seed(num_rows)
    values = torch.randint(0, 16, (in_features, out_features), generator=generator)
    groups = in_features // group_size
    g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    scales = (torch.rand(groups, out_features, generator=generator) * 0.02 + 0.001).to(DEVICE, DTYPE)
    zeros = torch.randint(0, 16, (groups, out_features), generator=generator).to(DEVICE, DTYPE)
    qweight = pack_int4(values, dim=0).to(DEVICE)
    g_idx = g_idx.to(DEVICE)
    x = torch.randn(num_rows, in_features, generator=generator).to(DEVICE, DTYPE)
    actual = int4_linear_triton(x, qweight, scales, zeros, g_idx)
    expected = int4_linear_reference(x.float(), qweight, scales.float(), zeros.float(), g_idx, None)
    assert actual.shape == (num_rows, out_features) and actual.dtype == DTYPE
    assert _relative_error(actual, expected) < (2e-2 if ON_GPU else 1e-5)
    # The packing round-trips: the reference reads back the values packed.
    assert torch.equal(unpack_int4(qweight, dim=0).cpu(), values.to(torch.int32))


@pytest.mark.parametrize("act_order", [False, True])
def test_int4_dequantization_equals_the_reference(act_order: bool) -> None:
    # The many-rows path widens the weight for cuBLAS: exactly the reference's weight,
    # rounded as it rounds; sizes that fill no tile, and act_order's scattered groups.
    from gpu_worker.kernels.int4_linear import dequantize_int4
    from gpu_worker.kernels.triton_int4_dequantize import dequantize_int4_triton

    in_features, out_features, group_size = (4160, 1000, 64) if ON_GPU else (96, 200, 32)
    generator = torch.Generator().manual_seed(300)
    values = torch.randint(0, 16, (in_features, out_features), generator=generator)
    g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    groups = in_features // group_size
    scales = (torch.rand(groups, out_features, generator=generator) * 0.02 + 0.001).to(DEVICE, DTYPE)
    zeros = torch.randint(0, 16, (groups, out_features), generator=generator).to(DEVICE, DTYPE)
    qweight, g_idx = pack_int4(values, dim=0).to(DEVICE), g_idx.to(DEVICE)
    actual = dequantize_int4_triton(qweight, scales, zeros, g_idx, DTYPE)
    assert actual.shape == (in_features, out_features) and actual.dtype == DTYPE
    assert torch.equal(actual.t(), dequantize_int4(qweight, scales, zeros, g_idx).to(DTYPE))


# 40 rows: one 64-row tile, most of it padding.
@pytest.mark.parametrize("num_rows", [1, 5, 16, 40])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("one_slice", [False, True])
def test_grouped_split_k_int4_gemm_matches_reference(num_rows: int, group_size: int, one_slice: bool) -> None:
    # Groups in input order (AWQ, GPTQ without act_order): the split-K form, split as
    # planned, or in one slice that writes the result directly.
    from gpu_worker.kernels.triton_int4_linear import int4_linear_grouped_triton, int4_split_k_plan

    in_features, out_features = (4096, 1536) if ON_GPU else (1024, 96)
    generator = torch.Generator().manual_seed(100 + num_rows)
    values = torch.randint(0, 16, (in_features, out_features), generator=generator)
    groups = in_features // group_size
    g_idx = (torch.arange(in_features, dtype=torch.int32) // group_size).to(DEVICE)
    scales = (torch.rand(groups, out_features, generator=generator) * 0.02 + 0.001).to(DEVICE, DTYPE)
    zeros = torch.randint(0, 16, (groups, out_features), generator=generator).to(DEVICE, DTYPE)
    qweight = pack_int4(values, dim=0).to(DEVICE)
    x = torch.randn(num_rows, in_features, generator=generator).to(DEVICE, DTYPE)
    plan = int4_split_k_plan(out_features, in_features, group_size, num_rows)
    assert plan is not None and plan["num_splits"] > 1
    assert plan["block_m"] >= num_rows, "one tile of rows opens each weight once"
    if one_slice:
        plan = dict(plan, num_splits=1, block_n=64)
    actual = int4_linear_grouped_triton(x, qweight, scales, zeros, group_size, plan)
    expected = int4_linear_reference(x.float(), qweight, scales.float(), zeros.float(), g_idx, None)
    assert actual.shape == (num_rows, out_features) and actual.dtype == DTYPE
    assert _relative_error(actual, expected) < (2e-2 if ON_GPU else 1e-5)


@pytest.mark.parametrize("group_size", [64, 128])
# Slices of the planned count, one slice (many tiles, an even count), and four (with
# groups of 128: three tiles, a pair and one more); loads pipelined in three stages or not.
@pytest.mark.parametrize(("num_splits", "load_stages"), [(None, 1), (1, 1), (1, 3), (4, 3)])
def test_int4_gemv_matches_reference(group_size: int, num_splits: int | None, load_stages: int) -> None:
    # The CUDA-core form for one row. Values span every nibble, and zeros far from the
    # middle, so that a nibble opened in the wrong place or a zero applied to the wrong
    # sum shows.
    from gpu_worker.kernels.triton_int4_gemv import int4_gemv_plan, int4_gemv_triton

    in_features, out_features = (1536, 1536) if ON_GPU else (1536, 256)
    generator = torch.Generator().manual_seed(201)
    values = torch.randint(0, 16, (in_features, out_features), generator=generator)
    groups = in_features // group_size
    g_idx = (torch.arange(in_features, dtype=torch.int32) // group_size).to(DEVICE)
    scales = (torch.rand(groups, out_features, generator=generator) * 0.02 + 0.001).to(DEVICE, DTYPE)
    zeros = torch.randint(0, 16, (groups, out_features), generator=generator).to(DEVICE, DTYPE)
    qweight = pack_int4(values, dim=0).to(DEVICE)
    x = torch.randn(1, in_features, generator=generator).to(DEVICE, DTYPE)
    plan = int4_gemv_plan(out_features, in_features, group_size)
    assert plan is not None and plan["num_splits"] > 1
    plan = dict(plan, num_stages=load_stages)
    if num_splits is not None:
        plan["num_splits"] = num_splits
    actual = int4_gemv_triton(x, qweight, scales, zeros, group_size, plan)
    expected = int4_linear_reference(x.float(), qweight, scales.float(), zeros.float(), g_idx, None)
    assert actual.shape == (1, out_features) and actual.dtype == DTYPE
    # It multiplies and sums each word in fp16, whatever x's dtype (0.4% here).
    assert _relative_error(actual, expected) < 2e-2


def test_int4_gemv_refuses_what_it_cannot_tile() -> None:
    from gpu_worker.kernels.triton_int4_gemv import int4_gemv_plan, int4_gemv_triton

    # Columns that do not fill whole tiles, and groups the split-K tiling refuses.
    assert int4_gemv_plan(out_features=200, in_features=1024, group_size=128) is None
    assert int4_gemv_plan(out_features=256, in_features=1000, group_size=8) is None
    qweight = torch.zeros(1024 // 8, 256, dtype=torch.int32, device=DEVICE)
    scales = torch.ones(8, 256, dtype=DTYPE, device=DEVICE)
    x = torch.zeros(2, 1024, dtype=DTYPE, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        int4_gemv_triton(x, qweight, scales, scales, 128)
