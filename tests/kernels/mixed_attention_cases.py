"""Attention over a mixed batch as the backend computes it on CUDA: the decode kernel for
the sequences with one query token, the paged prefill kernel for the others, into one
output (run with kernel_cases.py by tests/kernels/test_kernels.py, whose import sets up
the interpreter)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

# First: importing the cases sets TRITON_INTERPRET before triton is imported.
from tests.kernels.kernel_cases import (
    ON_GPU,
    TOLERANCE,
    WINDOW_SOFTCAP_CASES,
    PagedBatch,
    _triton_interpreter_on_cpu,
    decode_attention_triton,
)

# The kernels' own modules import triton: they are imported in the tests, after the above.
if TYPE_CHECKING:
    from gpu_worker.model.attention import AttentionMetadata

__all__ = ["_triton_interpreter_on_cpu"]  # the autouse fixture, used here by pytest

# (context, query tokens): decodes around a prompt, a chunk over a cached prefix and a
# one-token chunk, then two empty sequences as a prefill graph leaves past its batch.
if ON_GPU:
    SHAPES = [(900, 1), (700, 700), (17, 1), (1500, 333), (2000, 1), (5, 2), (0, 0), (0, 0)]
else:
    SHAPES = [(9, 1), (7, 7), (1, 1), (13, 5), (40, 1), (5, 2), (0, 0), (0, 0)]
SINGLE_TOKEN_ROWS = [sum(q for _, q in SHAPES[:i]) for i, (_, q) in enumerate(SHAPES) if q == 1]


def _batch(seed: int) -> PagedBatch:
    return PagedBatch([s for s, _ in SHAPES], [q for _, q in SHAPES], 4, 2, seed=seed)


def _metadata(
    batch: PagedBatch, may_have_decodes: bool = True, fewest_seqs: int | None = None
) -> AttentionMetadata:
    from gpu_worker.model.attention import AttentionMetadata

    return AttentionMetadata(
        may_have_decodes=may_have_decodes,
        fewest_seqs=fewest_seqs,
        slot_mapping=batch.slots,
        query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens,
        block_tables=batch.block_tables,
        max_query_len=max(q for _, q in SHAPES),
        max_seq_len=max(s for s, _ in SHAPES),
    )


# fewest_seqs 200: a graph for many sequences, whose decodes go unsplit (the batch's own
# eight sequences would have them split).
@pytest.mark.parametrize(
    "sliding_window,logit_softcap,fewest_seqs",
    [(None, None, None), (None, None, 200), *((w, c, None) for w, c in WINDOW_SOFTCAP_CASES)],
)
def test_mixed_batch_attention_matches_reference(
    sliding_window: int | None, logit_softcap: float | None, fewest_seqs: int | None
) -> None:
    from gpu_worker.kernels.attention_backend import _paged_prefill

    batch = _batch(seed=11)
    output = _paged_prefill(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        _metadata(batch, fewest_seqs=fewest_seqs),
        batch.scale,
        sliding_window,
        logit_softcap,
    )
    assert not output.isnan().any()
    expected = batch.reference(sliding_window, logit_softcap)
    torch.testing.assert_close(output.float(), expected.float(), **TOLERANCE)


def test_without_decodes_apart_the_prefill_kernel_computes_every_row() -> None:
    # A verification graph's metadata says no sequence has one query token: then the
    # prefill kernel alone must compute whatever the batch holds.
    from gpu_worker.kernels.attention_backend import _paged_prefill

    batch = _batch(seed=13)
    metadata = _metadata(batch, may_have_decodes=False)
    output = _paged_prefill(
        batch.query, batch.key_cache, batch.value_cache, metadata, batch.scale, None, None
    )
    torch.testing.assert_close(output.float(), batch.reference().float(), **TOLERANCE)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_kernel_writes_only_the_single_token_rows_of_a_mixed_batch(num_splits: int) -> None:
    batch = _batch(seed=12)
    sentinel = torch.full_like(batch.query, 7.0)
    output = decode_attention_triton(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.scale,
        num_splits=num_splits,
        block_n=16 if not ON_GPU else 64,
        query_start_loc=batch.query_start_loc,
        output=sentinel.clone(),
    )
    rows = torch.tensor(SINGLE_TOKEN_ROWS, device=output.device)
    others = torch.ones(output.shape[0], dtype=torch.bool, device=output.device)
    others[rows] = False
    torch.testing.assert_close(output[rows].float(), batch.reference()[rows].float(), **TOLERANCE)
    assert torch.equal(output[others], sentinel[others])


def test_single_token_sequences_get_no_prefill_tile() -> None:
    from gpu_worker.kernels.triton_prefill_attention import prefill_tile_map

    # Query lengths 1, 40, 1, 3, 0 in tiles of 32: none, two, none, one, none.
    start_loc = torch.tensor([0, 1, 41, 42, 45, 45], dtype=torch.int32)
    tile_seq, tile_first = prefill_tile_map(start_loc, 32, 8, single_token_queries=False)
    assert tile_seq.tolist()[:3] == [1, 1, 3] and all(seq == 5 for seq in tile_seq.tolist()[3:])
    assert tile_first.tolist()[:3] == [0, 32, 0]
