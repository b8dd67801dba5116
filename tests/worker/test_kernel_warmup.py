"""The start-up warm-up launches every decode-attention variant a mixed step can choose
(gpu_worker/kernel_warmup.py), so that none compiles mid-run. The launches themselves
need CUDA; which batch sizes they use is plain Python."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.kernel_warmup import mixed_decode_batch_sizes
from gpu_worker.kernels.triton_decode_attention import choose_block_n, choose_num_splits


@pytest.mark.parametrize("max_num_seqs", [1, 7, 100, 256, 1024])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 8])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_warm_up_sizes_cover_every_variant_a_batch_can_choose(
    max_num_seqs: int, num_kv_heads: int, cache_dtype: torch.dtype
) -> None:
    sizes = mixed_decode_batch_sizes(max_num_seqs, num_kv_heads, cache_dtype)

    def variant(num_seqs: int) -> tuple[int, int]:
        return choose_num_splits(num_seqs, num_kv_heads), choose_block_n(num_seqs, cache_dtype)

    every_variant = {variant(n) for n in range(1, max_num_seqs + 1)}
    assert {variant(n) for n in sizes} == every_variant
    assert all(1 <= n <= max_num_seqs for n in sizes)
    # One launch per variant, no more.
    assert len(sizes) == len(every_variant)
