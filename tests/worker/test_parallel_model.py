"""Whole models split over gloo ranks give the single rank's logits.

Each rank loads its shard of its stage from the checkpoint, allocates a KV cache for its
own layers and heads, and runs two steps through the paged attention: a prefill of three
sequences over scattered blocks, then one decode token each over the cached context. A
stage that is not the last sends its output to the next; the last computes the logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from parallel_harness import run_ranks
from transformers import LlamaConfig, LlamaForCausalLM

from devtools.fp8_checkpoints import write_fp8_block_checkpoint
from devtools.int4_checkpoints import write_int4_checkpoint
from gpu_worker.kv_cache import KVCacheLayout, allocate_kv_cache, bind_kv_cache
from gpu_worker.model.attention import AttentionMetadata, attention_context
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.loader import load_model
from gpu_worker.parallel.groups import SINGLE_RANK_CONTEXT, ParallelContext
from tests.support.tiny_architectures import build_tiny_model
from tests.support.tiny_llama import PARALLEL_DIMS

# Each case starts two to four ranks over gloo: tens of seconds on two cores.
pytestmark = pytest.mark.slow

BLOCK_SIZE = 4
NUM_BLOCKS = 16
MAX_POSITION = 64
# Per sequence: its prompt and its blocks (scattered, not in order).
SEQUENCES = [
    ([5, 17, 200, 3, 9], [7, 2]),
    ([1, 2, 3, 4, 5, 6, 7, 8, 250], [0, 11, 4]),
    ([42, 43, 44], [9]),
]
DECODE_TOKENS = [10, 20, 30]


def _metadata(context_lens: list[int], num_new: list[int]) -> AttentionMetadata:
    """The attention context of a step that computes the last num_new[i] tokens of
    context_lens[i] tokens of each sequence."""
    slots, starts = [], [0]
    for (_, blocks), length, new in zip(SEQUENCES, context_lens, num_new):
        slots += [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(length - new, length)]
        starts.append(starts[-1] + new)
    width = max(len(blocks) for _, blocks in SEQUENCES)
    tables = [blocks + [0] * (width - len(blocks)) for _, blocks in SEQUENCES]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(num_new),
        max_seq_len=max(context_lens),
        no_cached_context=context_lens == num_new,
    )


def _steps() -> list[tuple[AttentionMetadata, torch.Tensor, torch.Tensor]]:
    prompt_lens = [len(prompt) for prompt, _ in SEQUENCES]
    prefill = (
        _metadata(prompt_lens, prompt_lens),
        torch.tensor([t for prompt, _ in SEQUENCES for t in prompt]),
        torch.cat([torch.arange(n) for n in prompt_lens]),
    )
    decode = (
        _metadata([n + 1 for n in prompt_lens], [1] * len(SEQUENCES)),
        torch.tensor(DECODE_TOKENS),
        torch.tensor(prompt_lens),
    )
    return [prefill, decode]


@torch.inference_mode()
def _run_rank(context: ParallelContext, model_dir: Path, num_blocks: int = NUM_BLOCKS) -> dict[str, Any]:
    """This rank's stage of both steps; logits on the last stage."""
    config = ModelConfig.from_model_dir(model_dir)
    model = load_model(model_dir, config, torch.device("cpu"), torch.float32, MAX_POSITION, context)
    layout = KVCacheLayout.of_model(model)
    bind_kv_cache(
        model.attention_layers(),
        allocate_kv_cache(layout, num_blocks, BLOCK_SIZE, torch.device("cpu"), torch.float32),
    )
    logits = []
    for metadata, input_ids, positions in _steps():
        intermediate = None
        if not context.is_first_stage:
            intermediate = torch.empty(len(positions), config.hidden_size)
            context.recv_from_previous_stage(intermediate)
        with attention_context(metadata):
            output = model(input_ids if context.is_first_stage else None, positions, intermediate)
        if context.is_last_stage:
            logits.append(model.compute_logits(output))
        else:
            context.send_to_next_stage(output)
    return {
        "logits": logits,
        "layout": layout,
        "params": sorted(name for name, _ in model.named_parameters()),
    }


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """8 query heads, 4 KV heads, 4 layers; a vocabulary that two ranks split unevenly, and
    tied embeddings, so that a last stage of several loads the embedding as its LM head."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **PARALLEL_DIMS,
        max_position_embeddings=MAX_POSITION,
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    model_dir = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def single_rank(tiny_llama_dir: Path) -> dict[str, Any]:
    return _run_rank(SINGLE_RANK_CONTEXT, tiny_llama_dir)


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2)])
def test_tiny_llama_logits_match_single_rank(tiny_llama_dir, single_rank, tp: int, pp: int) -> None:
    ranks = run_ranks(_run_rank, tp, pp, args=(tiny_llama_dir,))
    last_stage = ranks[(pp - 1) * tp :]
    for rank in last_stage:
        for logits, expected in zip(rank["logits"], single_rank["logits"], strict=True):
            assert logits.shape == expected.shape == (expected.shape[0], 251)
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
            assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    # Every rank of the last stage holds the same logits, to the bit.
    for rank in last_stage[1:]:
        assert all(torch.equal(a, b) for a, b in zip(rank["logits"], last_stage[0]["logits"]))
    for rank in ranks[: (pp - 1) * tp]:
        assert rank["logits"] == []
    # Each rank's weights and cache: its stage's layers, its share of the 4 KV heads.
    for index, rank in enumerate(ranks):
        stage = index // tp
        assert rank["layout"] == KVCacheLayout(num_layers=4 // pp, num_kv_heads=4 // tp, head_dim=8)
        layers = {int(name.split(".")[2]) for name in rank["params"] if ".layers." in name}
        assert layers == set(range(stage * 4 // pp, (stage + 1) * 4 // pp))
        assert ("model.embed_tokens.weight" in rank["params"]) == (stage == 0)
        assert ("lm_head.weight" in rank["params"]) == (stage == pp - 1 and pp > 1)
        assert ("model.norm.weight" in rank["params"]) == (stage == pp - 1)


def _assert_same_logits(rank: dict[str, Any], expected: dict[str, Any], atol: float = 1e-4) -> None:
    """A last stage's logits are the single rank's, within fp32 rounding, argmax exactly."""
    for logits, reference in zip(rank["logits"], expected["logits"], strict=True):
        torch.testing.assert_close(logits, reference, atol=atol, rtol=1e-4)
        assert torch.equal(logits.argmax(-1), reference.argmax(-1))


@pytest.fixture(scope="module")
def embedded_single_rank(embedded_model_dir: Path) -> dict[str, Any]:
    return _run_rank(SINGLE_RANK_CONTEXT, embedded_model_dir)


@pytest.mark.parametrize(("tp", "pp"), [(3, 1), (1, 2)])
def test_embedded_model_splits(embedded_model_dir, embedded_single_rank, tp: int, pp: int) -> None:
    """SmolLM2-135M: at TP 3 three of its 9 query heads and one of its 3 KV heads per rank;
    at PP 2, 15 of its 30 layers per stage and its tied embedding on both ends."""
    expected = embedded_single_rank
    ranks = run_ranks(_run_rank, tp, pp, args=(embedded_model_dir,), timeout_s=120)
    for rank in ranks:
        assert rank["layout"] == KVCacheLayout(num_layers=30 // pp, num_kv_heads=3 // tp, head_dim=64)
    for rank in ranks[(pp - 1) * tp :]:
        # Thirty layers summed in another order: fp32 rounding, far below the logits' spread.
        _assert_same_logits(rank, expected, atol=1e-3)


@pytest.mark.parametrize(
    "model_type", ["qwen2", "mistral", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe"]
)
def test_every_architecture_splits(tmp_path, model_type: str) -> None:
    """Two ranks by two stages: each architecture's own layers (biases, fused checkpoint
    tensors cut per rank, Gemma's extra norms, windowed layers, experts sliced per rank)
    shard like Llama's."""
    torch.manual_seed(0)
    build_tiny_model(model_type).save_pretrained(tmp_path)
    expected = _run_rank(SINGLE_RANK_CONTEXT, tmp_path)
    ranks = run_ranks(_run_rank, 2, 2, args=(tmp_path,))
    for rank in ranks[2:]:
        _assert_same_logits(rank, expected)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_int4_checkpoints_split_over_tensor_parallel_ranks(
    tmp_path: Path, tiny_llama_dir: Path, method: str
) -> None:
    """Each rank takes its shard of the packed weights, scales and zeros, in each format's
    own packing, and gives the single rank's logits of the same checkpoint (act_order is
    refused at start-up under tensor parallelism)."""
    model_dir = tmp_path / method
    shutil.copytree(tiny_llama_dir, model_dir)
    write_int4_checkpoint(model_dir, method, group_size=16)
    expected = _run_rank(SINGLE_RANK_CONTEXT, model_dir)
    ranks = run_ranks(_run_rank, 2, 1, args=(model_dir,))
    for rank in ranks:
        _assert_same_logits(rank, expected)


def test_fp8_block_checkpoint_of_experts_splits_over_tensor_parallel_ranks(tmp_path: Path) -> None:
    """Each rank takes its blocks of every fp8 projection and expert, and their scales, and
    gives the single rank's logits of the same checkpoint."""
    torch.manual_seed(0)
    build_tiny_model("qwen3_moe").save_pretrained(tmp_path)
    write_fp8_block_checkpoint(tmp_path, block=16)
    expected = _run_rank(SINGLE_RANK_CONTEXT, tmp_path)
    ranks = run_ranks(_run_rank, 2, 1, args=(tmp_path,))
    for rank in ranks:
        _assert_same_logits(rank, expected)
