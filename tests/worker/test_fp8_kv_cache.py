"""An fp8 KV cache (--kv-cache-dtype fp8): keys and values stored as float8 e4m3 (scale
1.0) and read back in the model's dtype. Attention over it is exactly the reference over
the rounded values, and close to attention over the unrounded ones; a worker with it
holds four times the blocks of an fp32 cache in the same memory, swaps and copies its
blocks, and the embedded model generates with it as with a full-precision cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pagedserve.v1 import common_pb2
from tokenizers import Tokenizer

from gpu_worker.config import WorkerConfig
from gpu_worker.kernels.paged_attention import paged_attention, store_kv, value_cache_shape
from services.common.speculative import SpeculativeConfig
from services.scheduler.config import SchedulerConfig
from tests.support.speculative_runs import generate, make_runner

FP8 = torch.float8_e4m3fn
BLOCK_SIZE, NUM_BLOCKS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 12, 4, 2, 16


def test_attention_over_an_fp8_cache_is_attention_over_its_rounded_values() -> None:
    torch.manual_seed(0)
    seq_lens = [9, 6]
    num_tokens = sum(seq_lens)
    key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    value = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    query = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM)
    tables = torch.tensor([[3, 7, 1], [5, 0, 0]], dtype=torch.int32)
    slots = torch.cat(
        [
            tables[i, torch.arange(n) // BLOCK_SIZE].long() * BLOCK_SIZE + torch.arange(n) % BLOCK_SIZE
            for i, n in enumerate(seq_lens)
        ]
    )
    start_loc = torch.tensor([0, 9, 15], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)

    def attend(cache_dtype: torch.dtype, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        key_cache = torch.zeros(shape, dtype=cache_dtype)
        value_cache = torch.zeros(value_cache_shape(*shape, cache_dtype), dtype=cache_dtype)
        store_kv(keys, values, key_cache, value_cache, slots)
        return paged_attention(query, key_cache, value_cache, tables, start_loc, lens, HEAD_DIM**-0.5)

    in_fp8 = attend(FP8, key, value)
    rounded = attend(torch.float32, key.to(FP8).float(), value.to(FP8).float())
    exact = attend(torch.float32, key, value)
    assert torch.equal(in_fp8, rounded)
    assert not torch.equal(in_fp8, exact)  # the rounding is real
    torch.testing.assert_close(in_fp8, exact, atol=0.08, rtol=0.08)


def test_kv_cache_dtype_is_checked() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4'"):
        WorkerConfig(model_path=Path("."), kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="with a draft model"):
        WorkerConfig(
            model_path=Path("."),
            kv_cache_dtype="fp8",
            speculative=SpeculativeConfig(method="draft", draft_model_path=Path(".")),
        )


@pytest.mark.slow
def test_the_embedded_model_generates_with_an_fp8_cache(embedded_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(embedded_model_dir / "tokenizer.json"))
    texts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5,"]
    prompts = [tokenizer.encode(text).ids for text in texts]
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    memory = dict(kv_cache_memory_bytes=64 << 20, swap_space_bytes=16 << 20)
    full = make_runner(embedded_model_dir, SpeculativeConfig(), **memory)
    fp8 = make_runner(embedded_model_dir, SpeculativeConfig(), kv_cache_dtype="fp8", **memory)
    assert fp8.kv_cache.storage.dtype == FP8
    assert fp8.info().num_kv_blocks == 4 * full.info().num_kv_blocks
    # A pool of 4 blocks for 3 sequences of 2 blocks each: swaps move fp8 blocks out and in.
    config = SchedulerConfig(num_kv_blocks=4, preemption_mode="swap")
    expected = generate(full, prompts, [sampling] * 3, config)
    run = generate(fp8, prompts, [sampling] * 3, config)
    assert run.scheduler.preemption.num_swap > 0
    # Rounding could flip a near-tie; on these prompts the greedy tokens all agree.
    assert run.tokens == expected.tokens
