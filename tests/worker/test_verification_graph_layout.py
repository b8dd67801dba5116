"""The layout that lets verification steps run in CUDA graphs (gpu_worker/cuda_graphs.py):
each sequence's query tokens at the end of query_len rows, the rows before them padding
with slot -1. Attention over that layout must give every real token what the packed batch
gives it, and store exactly the packed batch's keys and values. CUDA graphs cannot run
here, so the buffers are laid out on the CPU and attention is the PyTorch reference that
the Triton kernels are tested against (tests/kernels)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gpu_worker.cuda_graphs import _StaticInputs
from gpu_worker.kernels.paged_attention import PADDING_SLOT, paged_attention, store_kv
from gpu_worker.model.attention import AttentionMetadata

BLOCK_SIZE = 4
NUM_BLOCKS = 40
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8
QUERY_LEN = 5
SCALE = HEAD_DIM**-0.5


def _packed_batch(cached: list[int], query_lens: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
    """Block tables of distinct blocks per sequence, slots of the new tokens; returns the
    metadata and the new tokens' positions."""
    seq_lens = [c + q for c, q in zip(cached, query_lens)]
    max_blocks = max(-(-n // BLOCK_SIZE) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    next_block = 1
    for i, n in enumerate(seq_lens):
        count = -(-n // BLOCK_SIZE)
        tables[i, :count] = torch.arange(next_block, next_block + count)
        next_block += count
    positions = torch.cat([torch.arange(c, c + q) for c, q in zip(cached, query_lens)])
    seq_of_token = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(query_lens))
    slots = tables[seq_of_token, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    start_loc = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    start_loc[1:] = torch.tensor(query_lens).cumsum(0)
    metadata = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=start_loc,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    return metadata, positions


@dataclass
class PackedStep:
    """A step's random queries, keys and values over a random cache, and what the packed
    batch stores and attends to."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    packed_keys: torch.Tensor
    packed_values: torch.Tensor
    expected: torch.Tensor

    @classmethod
    def random(cls, metadata: AttentionMetadata) -> PackedStep:
        num_tokens = metadata.slot_mapping.shape[0]
        cache_shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        key_cache, value_cache = torch.randn(cache_shape), torch.randn(cache_shape)
        query = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM)
        key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM)
        value = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM)
        packed_keys, packed_values = key_cache.clone(), value_cache.clone()
        store_kv(key, value, packed_keys, packed_values, metadata.slot_mapping)
        expected = paged_attention(
            query,
            packed_keys,
            packed_values,
            metadata.block_tables,
            metadata.query_start_loc,
            metadata.seq_lens,
            SCALE,
        )
        return cls(key_cache, value_cache, query, key, value, packed_keys, packed_values, expected)


@pytest.mark.parametrize(
    ("cached", "query_lens"),
    [([7, 2, 0, 11], [5, 1, 3, 2]), ([3], [5]), ([9, 1], [1, 1])],
)
def test_padded_queries_attend_as_the_packed_batch(cached: list[int], query_lens: list[int]) -> None:
    torch.manual_seed(0)
    metadata, positions = _packed_batch(cached, query_lens)
    num_tokens, num_seqs = len(positions), len(cached)
    step = PackedStep.random(metadata)
    key_cache, value_cache, query, key, value = (
        step.key_cache,
        step.value_cache,
        step.query,
        step.key,
        step.value,
    )
    packed_keys, packed_values, expected = step.packed_keys, step.packed_values, step.expected
    input_ids = torch.randint(0, 1000, (num_tokens,))

    graph_size = 8
    inputs = _StaticInputs.allocate(
        graph_size, QUERY_LEN, metadata.block_tables.shape[1], torch.device("cpu")
    )
    rows = inputs.pad_queries(input_ids, positions, metadata)
    num_rows = num_seqs * QUERY_LEN
    assert torch.equal(inputs.input_ids[rows], input_ids)
    assert torch.equal(inputs.positions[rows], positions)
    padding = torch.ones(num_rows, dtype=torch.bool)
    padding[rows] = False
    assert (inputs.slot_mapping[:num_rows][padding] == PADDING_SLOT).all()
    # Each sequence's last token is on its last row, where the sampler reads it.
    last_tokens = metadata.query_start_loc[1:].long() - 1
    assert torch.equal(rows[last_tokens], torch.arange(1, num_seqs + 1) * QUERY_LEN - 1)

    # Padding rows carry garbage queries, keys and values: none of it may reach a real row.
    padded_query = torch.randn(num_rows, NUM_HEADS, HEAD_DIM)
    padded_key = torch.randn(num_rows, NUM_KV_HEADS, HEAD_DIM)
    padded_value = torch.randn(num_rows, NUM_KV_HEADS, HEAD_DIM)
    padded_query[rows], padded_key[rows], padded_value[rows] = query, key, value
    padded_keys, padded_values = key_cache.clone(), value_cache.clone()
    store_kv(padded_key, padded_value, padded_keys, padded_values, inputs.slot_mapping[:num_rows])
    output = paged_attention(
        padded_query,
        padded_keys,
        padded_values,
        metadata.block_tables,
        inputs.query_start_loc[: num_seqs + 1],
        metadata.seq_lens,
        SCALE,
    )
    assert torch.equal(padded_keys, packed_keys) and torch.equal(padded_values, packed_values)
    torch.testing.assert_close(output[rows], expected)
