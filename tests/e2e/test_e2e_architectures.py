"""Every architecture served by the three services on CPU, token for token as HF
transformers generates: tiny random checkpoints (tests/support/tiny_architectures.py) with
sliding windows shorter than the prompts, requests batched, prefilled in chunks, sharing
a cached prefix and preempted from a pool too small for all of them (models whose every
layer is windowed free the blocks before the window, so their pool is smaller still)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2

from gpu_worker.model.config import ModelConfig
from tests.support.service_stack import Stack, service_stack
from tests.support.small_tokenizer import build_tokenizer, write_model_dir
from tests.support.tiny_architectures import BUILDERS, build_tiny_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.hf]

MAX_TOKENS = 24
BLOCK_SIZE = 16


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(3, 256) for _ in range(2 * BLOCK_SIZE)]
    alone = [[rng.randrange(3, 256) for _ in range(n)] for n in (21, 45, 9, 38)]
    return [shared + [7, 8, 9], shared + [10, 11], *alone]


def _generate(stack: Stack, prompt: list[int]) -> list[int]:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    request = generation_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling)
    return [t for response in stack.generation.Generate(request, timeout=300) for t in response.token_ids]


def _hf_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return output[0, len(prompt) :].tolist()


@pytest.mark.parametrize("model_type", sorted(BUILDERS))
def test_served_architecture_matches_hf(model_type: str, tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "model")
    torch.manual_seed(0)
    hf_model = build_tiny_model(model_type)
    # The small tokenizer's vocabulary, so that the tokenizer service accepts every id.
    hf_model.resize_token_embeddings(build_tokenizer().get_vocab_size())
    hf_model.save_pretrained(model_dir)
    prompts = _prompts()
    expected = [_hf_greedy(hf_model, prompt) for prompt in prompts]

    # A model whose every layer is windowed gives its blocks before the window back
    # (services/scheduler/sliding_window.py): a smaller pool still preempts.
    windowed_only = ModelConfig.from_model_dir(model_dir).window_of_every_layer is not None
    num_blocks = "6" if windowed_only else "9"
    scheduler_args = ["--num-kv-blocks", num_blocks, "--max-num-batched-tokens", "24"]
    with service_stack(model_dir, tmp_path / "logs", scheduler_args=scheduler_args) as stack:
        # The shared prefix is computed first, then found in the cache by the second.
        first = _generate(stack, prompts[0])
        # Every other prompt twice at once: more requests than the pool holds keep it full
        # while they run, so that one needing a block preempts however they arrive.
        together = prompts[1:] * 2
        with ThreadPoolExecutor(len(together)) as pool:
            rest = list(pool.map(lambda prompt: _generate(stack, prompt), together))
        stats = stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest())
    assert [first, *rest] == expected[:1] + expected[1:] * 2
    # With every layer windowed the 6-block pool gives blocks back and preempts while the
    # concurrent prompts run, which may evict part of the shared prefix before a later
    # prompt looks: then at least one block of it is still found.
    assert stats.prefix_cache_hits >= (1 if windowed_only else 2) * BLOCK_SIZE
    assert stats.num_preemptions_recompute + stats.num_preemptions_swap > 0
