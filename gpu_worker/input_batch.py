"""Builds a step's input tensors with little Python per step.

Per-token and per-block work is done with NumPy over arrays that persist between steps:
every live sequence's block table is a row of one int32 array, extended in place by the
step deltas, so a batch's tables are one fancy index and its slot mapping one gather.
On CUDA the results are written into pinned staging buffers and reach the device in two
copies (one int64, one int32) instead of one small copy per tensor.

A step may be built before the previous one's sampled tokens are read back: a sequence
whose next token to compute is still on the device (DeviceToken) gets it gathered into the
input ids there, after the copy, so no step waits for another's result on the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch
from pagedserve.v1 import worker_pb2

from gpu_worker.block_tables import BlockTables
from gpu_worker.config import MAX_STEPS_LAUNCHED
from gpu_worker.input_staging import StagingBuffer
from gpu_worker.model.attention import AttentionMetadata
from gpu_worker.speculative.gather import Verification, gather_speculative


class DeviceToken(NamedTuple):
    """A sampled token the host has not read yet: tokens[row] on the device."""

    tokens: torch.Tensor
    row: int


class _SequenceLike(Protocol):
    # Tokens the host knows.
    token_ids: list[int]
    num_computed_tokens: int
    # Tokens sampled after token_ids whose values the host has not read yet, and the
    # newest of them.
    num_pending_tokens: int
    newest_pending_token: DeviceToken | None


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    # Rows of the flattened batch whose logits are sampled, and their sequences.
    sample_rows: torch.Tensor
    sample_seq_ids: list[int]
    # Batch indices of the sampling sequences, aligned with sample_seq_ids.
    sample_index: list[int] = field(default_factory=list)
    # The speculating sequences, verified rather than sampled.
    verification: Verification | None = None


@dataclass(slots=True)
class _Gathered:
    """What the walk over a step's sequences collects: per sequence its block-table row,
    first position, number of new tokens; the input ids (0 where a token still on the
    device goes, at fed_at, fed_tokens holding them); the sequences that sample, by batch
    index and by id."""

    rows: list[int]
    starts: list[int]
    query_lens: list[int]
    input_ids: list[int]
    fed_at: list[int]
    fed_tokens: list[DeviceToken]
    sample_index: list[int]
    sample_seq_ids: list[int]
    verification: Verification | None = None


@dataclass(slots=True)
class _HostInputs:
    """A step's inputs in host memory, before staging."""

    positions: np.ndarray
    slot_mapping: np.ndarray
    sample_rows: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    # The step's rows of the block tables, cut to the widest of them.
    block_tables: np.ndarray
    starts: np.ndarray
    max_blocks: int
    max_query_len: int


# Staging sets in turn: a step's inputs are written while earlier steps' copies may still
# be queued behind the work before them (one set per step launched and not finished).
_NUM_STAGING_SETS = MAX_STEPS_LAUNCHED


class StepInputBuilder:
    def __init__(
        self,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
        max_num_tokens: int = 0,
        max_num_seqs: int = 0,
    ) -> None:
        """max_num_tokens, max_num_seqs: the largest step the scheduler sends, for which
        the CUDA staging buffers are allocated at once (a larger one still fits: they grow)."""
        self.block_tables = BlockTables(max_blocks_per_seq)
        self.block_size = block_size
        self.device = device
        capacity64: Sequence[int] = ()
        capacity32: Sequence[int] = ()
        if device.type == "cuda" and max_num_tokens and max_num_seqs:
            num_seqs = min(max_num_seqs, max_num_tokens)
            capacity64, capacity32 = _staging_sizes(
                max_num_tokens, num_seqs, num_seqs, num_seqs, max_blocks_per_seq
            )
        self._staging_sets = [
            (StagingBuffer(torch.int64, device, capacity64), StagingBuffer(torch.int32, device, capacity32))
            for _ in range(_NUM_STAGING_SETS)
        ]
        self._num_builds = 0

    def remove(self, seq_id: int) -> None:
        self.block_tables.remove(seq_id)

    def clear(self) -> None:
        self.block_tables.clear()

    def build(
        self,
        scheduled: Sequence[worker_pb2.ScheduledSequence],
        sequences: Mapping[int, _SequenceLike],
        proposals: Mapping[int, Sequence[int]] | None = None,
        tables_extended: bool = False,
    ) -> StepInputs:
        """Advances each scheduled sequence's num_computed_tokens and returns the inputs.
        proposals: per speculating sequence, the tokens it proposed (gpu_worker/speculative/
        gather.py)."""
        if proposals is None:
            gathered = self._gather(scheduled, sequences)
        else:
            empty = _Gathered([], [], [], [], [], [], [], [])
            gathered = gather_speculative(self, scheduled, sequences, proposals, tables_extended, empty)
        host = self._lay_out(gathered, scheduled)
        ids_d, positions_d, slots_d, samples_d, starts_d, lens_d, tables_d = self._stage(gathered, host)
        metadata = AttentionMetadata(
            slot_mapping=slots_d,
            query_start_loc=starts_d,
            seq_lens=lens_d,
            block_tables=tables_d.view(len(scheduled), host.max_blocks),
            max_query_len=host.max_query_len,
            max_seq_len=int(host.seq_lens.max()),
            no_cached_context=not host.starts.any(),
        )
        inputs = StepInputs(
            input_ids=ids_d,
            positions=positions_d,
            metadata=metadata,
            sample_rows=samples_d,
            sample_seq_ids=gathered.sample_seq_ids,
            sample_index=gathered.sample_index,
        )
        if gathered.verification is not None:
            inputs.verification = gathered.verification.with_rows(host.query_start_loc, self.device)
        return inputs

    def _gather(
        self, scheduled: Sequence[worker_pb2.ScheduledSequence], sequences: Mapping[int, _SequenceLike]
    ) -> _Gathered:
        """The loop over every sequence of the step, extending block tables and advancing
        num_computed_tokens. The per-sequence work is kept to plain list operations; the
        per-token work is NumPy, in _lay_out."""
        tables = self.block_tables
        row_of = tables.row_of
        rows: list[int] = []
        starts: list[int] = []
        query_lens: list[int] = []
        input_ids: list[int] = []
        fed_at: list[int] = []
        fed_tokens: list[DeviceToken] = []
        sample_index: list[int] = []
        sample_seq_ids: list[int] = []
        for index, entry in enumerate(scheduled):
            seq_id = entry.seq_id
            state = sequences[seq_id]
            new_block_ids = entry.new_block_ids
            row = row_of.get(seq_id)
            if row is None or new_block_ids:
                row = tables.extend(seq_id, new_block_ids)
            start = state.num_computed_tokens
            num_new = entry.num_new_tokens
            end = start + num_new
            token_ids = state.token_ids
            num_known = len(token_ids)
            num_seq_tokens = num_known + state.num_pending_tokens
            assert num_new > 0 and end <= num_seq_tokens, (
                f"seq {seq_id}: computing {start}:{end} of {num_seq_tokens}"
            )
            if end <= num_known:
                if num_new == 1:
                    input_ids.append(token_ids[start])
                else:
                    input_ids.extend(token_ids[start:end])
            else:
                # Only the newest sample can be fed: every earlier one was computed by the
                # step that followed it. That is max(start, num_known) == end - 1 ==
                # num_seq_tokens - 1, written without a call: with end > num_known and
                # start == end - num_new, the max is end - 1 exactly when one token is
                # new or num_known == end - 1. A sequence with samples not read holds the
                # newest of them.
                fed = state.newest_pending_token
                assert fed is not None and end == num_seq_tokens and (num_new == 1 or num_known == end - 1), (
                    f"seq {seq_id}: unknown inputs"
                )
                if num_new > 1:
                    input_ids.extend(token_ids[start : end - 1])
                fed_at.append(len(input_ids))
                fed_tokens.append(fed)
                input_ids.append(0)
            rows.append(row)
            starts.append(start)
            query_lens.append(num_new)
            state.num_computed_tokens = end
            # A sequence samples once its tokens are all computed; a partial prefill chunk
            # only fills the cache.
            if end == num_seq_tokens:
                sample_index.append(index)
                sample_seq_ids.append(seq_id)
        return _Gathered(
            rows, starts, query_lens, input_ids, fed_at, fed_tokens, sample_index, sample_seq_ids
        )

    def _lay_out(self, gathered: _Gathered, scheduled: Sequence[worker_pb2.ScheduledSequence]) -> _HostInputs:
        """The per-token arrays, from the per-sequence lists, in NumPy."""
        num_seqs = len(gathered.rows)
        num_tokens = len(gathered.input_ids)
        tables = self.block_tables
        block_size = self.block_size
        rows = np.array(gathered.rows, dtype=np.int64)
        starts = np.array(gathered.starts, dtype=np.int64)
        num_blocks = tables.num_blocks[rows]
        # A decode-only step (one token per sequence, the common case) needs no expansion
        # from sequences to tokens: each sequence's row is its token's row.
        if num_tokens == num_seqs:
            query_lens = np.ones(num_seqs, dtype=np.int64)
            query_start_loc = np.arange(num_seqs + 1, dtype=np.int64)
            positions = starts
            token_rows = rows
            max_query_len = 1
        else:
            query_lens = np.array(gathered.query_lens, dtype=np.int64)
            query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
            np.cumsum(query_lens, out=query_start_loc[1:])
            token_seq = np.repeat(np.arange(num_seqs), query_lens)
            positions = starts[token_seq] + np.arange(num_tokens) - query_start_loc[token_seq]
            token_rows = rows[token_seq]
            max_query_len = int(query_lens.max())
        seq_lens = starts + query_lens
        too_few = seq_lens > num_blocks * block_size
        assert not too_few.any(), (
            f"seqs {[scheduled[i].seq_id for i in np.flatnonzero(too_few).tolist()]}: too few blocks"
        )
        block_index, block_offset = np.divmod(positions, block_size)
        slot_mapping = tables.array[token_rows, block_index].astype(np.int64) * block_size + block_offset
        max_blocks = int(num_blocks.max())
        # Every sequence samples unless a prefill chunk is partial: then the rows are a
        # plain range, no gather.
        if len(gathered.sample_index) == num_seqs:
            sample_rows = query_start_loc[1:] - 1
        else:
            sample_rows = query_start_loc[1:][gathered.sample_index] - 1
        return _HostInputs(
            positions=positions,
            slot_mapping=slot_mapping,
            sample_rows=sample_rows,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=tables.array[rows, :max_blocks],
            starts=starts,
            max_blocks=max_blocks,
            max_query_len=max_query_len,
        )

    def _stage(self, gathered: _Gathered, host: _HostInputs) -> list[torch.Tensor]:
        """Writes the inputs into this step's staging buffers, copies them to the device
        and gathers the fed tokens into the input ids there. Returns the device views:
        input ids, positions, slots, sample rows (int64), query start offsets, sequence
        lengths, block tables (int32)."""
        staging64, staging32 = self._staging_sets[self._num_builds % _NUM_STAGING_SETS]
        self._num_builds += 1
        fed_at = gathered.fed_at
        fed_sources, fed_indices = _fed_token_sources(gathered.fed_tokens)
        sizes64, sizes32 = _staging_sizes(
            len(gathered.input_ids), len(gathered.rows), len(host.sample_rows), len(fed_at), host.max_blocks
        )
        ids_h, positions_h, slots_h, samples_h, fed_at_h, fed_from_h = staging64.host_segments(sizes64)
        ids_h[:] = gathered.input_ids
        positions_h[:] = host.positions
        slots_h[:] = host.slot_mapping
        samples_h[:] = host.sample_rows
        fed_at_h[:] = fed_at
        fed_from_h[:] = fed_indices
        starts_h, lens_h, tables_h = staging32.host_segments(sizes32)
        starts_h[:] = host.query_start_loc
        lens_h[:] = host.seq_lens
        tables_h.reshape(host.block_tables.shape)[:] = host.block_tables

        device64, device32 = staging64.to_device(), staging32.to_device()
        ids_d, positions_d, slots_d, samples_d, fed_at_d, fed_from_d = device64
        if fed_sources is not None:
            ids_d.index_copy_(0, fed_at_d, fed_sources.index_select(0, fed_from_d))
        return [ids_d, positions_d, slots_d, samples_d, *device32]


def _staging_sizes(
    num_tokens: int, num_seqs: int, num_samples: int, num_fed: int, max_blocks: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Segment lengths of a step's staging buffers: int64 (input ids, positions, slots,
    sample rows, where fed tokens go, where they come from) and int32 (query start
    offsets, sequence lengths, block tables)."""
    return (
        (num_tokens, num_tokens, num_tokens, num_samples, num_fed, num_fed),
        (num_seqs + 1, num_seqs, num_seqs * max_blocks),
    )


def _fed_token_sources(fed: list[DeviceToken]) -> tuple[torch.Tensor | None, list[int]]:
    """One tensor holding every fed token (normally the previous step's draws, as they
    are) and each token's index in it."""
    if not fed:
        return None, []
    first = fed[0].tokens
    if all(token.tokens is first for token in fed):
        return first, [token.row for token in fed]
    sources: dict[int, torch.Tensor] = {}
    for token in fed:
        sources.setdefault(id(token.tokens), token.tokens)
    offsets, start = {}, 0
    for key, tensor in sources.items():
        offsets[key] = start
        start += tensor.shape[0]
    combined = next(iter(sources.values())) if len(sources) == 1 else torch.cat(list(sources.values()))
    return combined, [offsets[id(token.tokens)] + token.row for token in fed]
