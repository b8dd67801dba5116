"""The reference paged attention against dense causal attention computed directly."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from gpu_worker.kernels.paged_attention import PADDING_SLOT, paged_attention, store_kv

BLOCK_SIZE = 4
NUM_BLOCKS = 32
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8


def _dense_causal(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """query: [q_len, H, D] for the last q_len positions of keys/values [seq_len, H_kv, D]."""
    q_len, seq_len = query.shape[0], keys.shape[0]
    group = NUM_HEADS // NUM_KV_HEADS
    # Query i sits at position seq_len - q_len + i and sees keys up to it (and, with a
    # window, not `window` or more positions back).
    allowed = torch.ones(q_len, seq_len, dtype=torch.bool).tril(diagonal=seq_len - q_len)
    if window is not None:
        allowed &= torch.ones(q_len, seq_len, dtype=torch.bool).triu(diagonal=seq_len - q_len - window + 1)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1),
        keys.repeat_interleave(group, dim=1).transpose(0, 1),
        values.repeat_interleave(group, dim=1).transpose(0, 1),
        attn_mask=allowed,
        scale=HEAD_DIM**-0.5,
    )
    return out.transpose(0, 1)


def _dense_softcapped(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cap: float
) -> torch.Tensor:
    q_len, seq_len = query.shape[0], keys.shape[0]
    group = NUM_HEADS // NUM_KV_HEADS
    scores = torch.einsum("qhd,khd->hqk", query, keys.repeat_interleave(group, dim=1)) * HEAD_DIM**-0.5
    scores = cap * torch.tanh(scores / cap)
    allowed = torch.ones(q_len, seq_len, dtype=torch.bool).tril(diagonal=seq_len - q_len)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values.repeat_interleave(group, dim=1))


@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (6, None), (None, 1.5)])
def test_mixed_batch_matches_dense_causal_attention(window: int | None, softcap: float | None) -> None:
    torch.manual_seed(0)
    # (context length after the step, query tokens this step): full prefill, prefill chunk
    # over a cached prefix, decodes at and across block boundaries.
    shapes = [(7, 7), (13, 5), (9, 1), (16, 1), (1, 1)]
    key_cache = torch.full((NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), float("nan"))
    value_cache = torch.full_like(key_cache, float("nan"))
    free_blocks = list(range(NUM_BLOCKS))
    random.Random(0).shuffle(free_blocks)

    block_tables, queries, expected = [], [], []
    for seq_len, q_len in shapes:
        blocks = [free_blocks.pop() for _ in range(-(-seq_len // BLOCK_SIZE))]
        block_tables.append(blocks)
        keys = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM)
        values = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM)
        slots = torch.tensor([blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(seq_len)])
        store_kv(keys, values, key_cache, value_cache, slots)
        query = torch.randn(q_len, NUM_HEADS, HEAD_DIM)
        queries.append(query)
        if softcap is None:
            expected.append(_dense_causal(query, keys, values, window))
        else:
            expected.append(_dense_softcapped(query, keys, values, softcap))

    max_blocks = max(len(b) for b in block_tables)
    padded = torch.tensor([b + [0] * (max_blocks - len(b)) for b in block_tables], dtype=torch.int32)
    query_start_loc = torch.tensor([0] + [q for _, q in shapes], dtype=torch.int32).cumsum(0)
    seq_lens = torch.tensor([s for s, _ in shapes], dtype=torch.int32)
    output = paged_attention(
        torch.cat(queries),
        key_cache,
        value_cache,
        padded,
        query_start_loc,
        seq_lens,
        HEAD_DIM**-0.5,
        window,
        softcap,
    )
    # Unwritten slots hold NaN: any read of them would poison the output.
    assert not output.isnan().any()
    torch.testing.assert_close(output, torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_store_kv_skips_padding_slots() -> None:
    key_cache = torch.zeros(2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    value_cache = torch.zeros_like(key_cache)
    key = torch.randn(3, NUM_KV_HEADS, HEAD_DIM)
    value = torch.randn(3, NUM_KV_HEADS, HEAD_DIM)
    store_kv(key, value, key_cache, value_cache, torch.tensor([5, PADDING_SLOT, 0]))
    torch.testing.assert_close(key_cache[1, 1], key[0])
    torch.testing.assert_close(value_cache[0, 0], value[2])
    written = torch.zeros(2, BLOCK_SIZE, dtype=torch.bool)
    written[1, 1] = written[0, 0] = True
    assert (key_cache[~written] == 0).all() and (value_cache[~written] == 0).all()
