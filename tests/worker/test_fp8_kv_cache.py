"""An fp8 KV cache (--kv-cache-dtype fp8): keys and values stored as float8 e4m3 (divided
by a checkpoint's k_scale and v_scale, where it has them) and read back in the model's
dtype. Attention over it is exactly the reference over the rounded values, and close to
attention over the unrounded ones; a worker with it holds four times the blocks of an
fp32 cache in the same memory, swaps and copies its blocks, and the embedded model
generates with it as with a full-precision cache."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from pagedserve.v1 import common_pb2
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from gpu_worker.config import WorkerConfig
from gpu_worker.kernels.paged_attention import KVScales, paged_attention, store_kv, value_cache_shape
from gpu_worker.model_runner import ModelRunner
from services.common.speculative import SpeculativeConfig
from services.scheduler.config import SchedulerConfig
from tests.support.greedy_runs import runner_greedy
from tests.support.speculative_runs import generate, make_runner
from tests.support.tiny_llama import TINY_DIMS, VOCAB_SIZE

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


def _scaled_copy(model_dir: Path, scaled_dir: Path, factor: float) -> None:
    """The same model with keys and values `factor` times larger, and the query and output
    projections `factor` times smaller (a power of two: every product scales exactly),
    its k_scale and v_scale `factor` as llm-compressor writes them."""
    shutil.copytree(model_dir, scaled_dir)
    tensors = load_file(str(scaled_dir / "model.safetensors"))
    factors = {"q_proj": 1 / factor, "k_proj": factor, "v_proj": factor, "o_proj": 1 / factor}
    for name in list(tensors):
        projection = name.rsplit(".", 2)[-2]
        if projection in factors:
            tensors[name] = tensors[name] * factors[projection]
    for layer in range(TINY_DIMS["num_hidden_layers"]):
        for scale in ("k_scale", "v_scale"):
            tensors[f"model.layers.{layer}.self_attn.{scale}"] = torch.tensor(factor)
    save_file(tensors, str(scaled_dir / "model.safetensors"), metadata={"format": "pt"})


def test_a_checkpoints_kv_scales_keep_large_keys_and_values_in_range(tmp_path: Path) -> None:
    # Keys and values of 1,024 times the size pass e4m3's largest (448). Divided by the
    # checkpoint's scales, the fp8 cache holds exactly what it holds for the original
    # model, and the tokens are the original's; a cache in the model's dtype takes no scale.
    torch.manual_seed(0)
    config = transformers.LlamaConfig(tie_word_embeddings=False, **TINY_DIMS)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "original")
    _scaled_copy(tmp_path / "original", tmp_path / "scaled", 1024.0)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in (5, 13, 2)]

    def run(model: str, **worker: str) -> tuple[ModelRunner, list[list[int]]]:
        runner = ModelRunner(
            WorkerConfig(model_path=tmp_path / model, device="cpu", block_size=4, num_kv_blocks=32, **worker)
        )
        return runner, runner_greedy(runner, prompts, 8)

    original, original_tokens = run("original", kv_cache_dtype="fp8")
    scaled, scaled_tokens = run("scaled", kv_cache_dtype="fp8")
    assert scaled.model.model.layers[1].self_attn.attn.kv_scales == KVScales(1024.0, 1024.0)
    assert original.model.model.layers[1].self_attn.attn.kv_scales == KVScales(1.0, 1.0)
    cache_bytes = [runner.kv_cache.storage.view(torch.uint8) for runner in (original, scaled)]
    assert cache_bytes[0].any() and torch.equal(*cache_bytes)
    assert scaled_tokens == original_tokens
    unscaled, unscaled_tokens = run("scaled")
    assert unscaled.model.model.layers[1].self_attn.attn.kv_scales == KVScales(1.0, 1.0)
    assert unscaled_tokens == run("original")[1]


def test_kv_scales_per_head_are_refused_naming_their_shape(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(tie_word_embeddings=False, **TINY_DIMS)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "original")
    _scaled_copy(tmp_path / "original", tmp_path / "scaled", 4.0)
    tensors = load_file(str(tmp_path / "scaled" / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_scale"] = torch.full((TINY_DIMS["num_key_value_heads"],), 4.0)
    save_file(tensors, str(tmp_path / "scaled" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"KV cache scales of shape \(2,\): only one scale per layer"):
        ModelRunner(WorkerConfig(model_path=tmp_path / "scaled", device="cpu", kv_cache_dtype="fp8"))
