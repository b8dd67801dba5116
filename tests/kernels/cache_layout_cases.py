"""The attention kernels over the cache layouts of speculative verification graphs and of
an fp8 cache, against the PyTorch reference (run with kernel_cases.py by
tests/kernels/test_kernels.py, whose import sets up the interpreter)."""

from __future__ import annotations

import torch

# First: importing the cases sets TRITON_INTERPRET before triton is imported.
from tests.kernels.kernel_cases import ON_GPU, TOLERANCE, PagedBatch, _triton_interpreter_on_cpu

__all__ = ["_triton_interpreter_on_cpu"]  # the autouse fixture, used here by pytest


def test_prefill_attention_on_a_verification_graphs_layout() -> None:
    # Five query rows per sequence, as a verification graph lays them out: a sequence with
    # less context than rows has padding rows at negative positions, which must get zeros
    # (not NaN, not keys); a sequence of the graph past the batch has no context at all.
    batch = PagedBatch([3, 9, 1, 0], [5, 5, 5, 5], num_heads=4, num_kv_heads=2, seed=7)
    output = batch.prefill(block_n=16 if not ON_GPU else 64)
    expected = batch.reference()
    assert not output.isnan().any()
    torch.testing.assert_close(output.float(), expected.float(), **TOLERANCE)
    assert not output[:2].any() and not output[10:14].any() and not output[15:].any()


def test_attention_kernels_read_an_fp8_cache() -> None:
    # --kv-cache-dtype fp8: the kernels read float8 e4m3 keys and values in the query's
    # dtype; the reference reads the same rounded values.
    batch = PagedBatch([37, 9, 20], [1, 1, 1], num_heads=4, num_kv_heads=2, seed=3)
    batch.key_cache = batch.key_cache.to(torch.float8_e4m3fn)
    batch.value_cache = batch.value_cache.to(torch.float8_e4m3fn)
    expected = batch.reference()
    torch.testing.assert_close(batch.decode().float(), expected.float(), **TOLERANCE)
    torch.testing.assert_close(
        batch.prefill(block_n=16 if not ON_GPU else 64).float(), expected.float(), **TOLERANCE
    )
