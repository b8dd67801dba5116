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
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
from pagedserve.v1 import worker_pb2

from gpu_worker.model.attention import AttentionMetadata


class DeviceToken(NamedTuple):
    """A sampled token the host has not read yet: tokens[index] on the device."""

    tokens: torch.Tensor
    index: int


class _SequenceLike(Protocol):
    # Tokens the host knows.
    token_ids: list[int]
    num_computed_tokens: int
    # Tokens sampled after token_ids whose values the host has not read yet, and the
    # newest of them.
    num_pending_tokens: int
    newest_pending_token: DeviceToken | None


class BlockTables:
    """Block tables of the live sequences, one row each, in one growable int32 array."""

    def __init__(self, max_blocks_per_seq: int, capacity: int = 64) -> None:
        self.array = np.zeros((capacity, max(max_blocks_per_seq, 1)), dtype=np.int32)
        self.num_blocks = np.zeros(capacity, dtype=np.int64)
        self.row_of: dict[int, int] = {}
        self._free_rows = list(range(capacity - 1, -1, -1))

    def extend(self, seq_id: int, block_ids: Sequence[int]) -> int:
        """Appends blocks to the sequence's table (creating it); returns its row."""
        row = self.row_of.get(seq_id)
        if row is None:
            if not self._free_rows:
                self._grow_rows()
            row = self._free_rows.pop()
            self.row_of[seq_id] = row
        if block_ids:
            start = int(self.num_blocks[row])
            end = start + len(block_ids)
            if end > self.array.shape[1]:
                self._grow_columns(end)
            self.array[row, start:end] = block_ids
            self.num_blocks[row] = end
        return row

    def remove(self, seq_id: int) -> None:
        row = self.row_of.pop(seq_id, None)
        if row is not None:
            self.num_blocks[row] = 0
            self._free_rows.append(row)

    def clear(self) -> None:
        for seq_id in list(self.row_of):
            self.remove(seq_id)

    def _grow_rows(self) -> None:
        capacity = self.array.shape[0]
        self.array = np.concatenate([self.array, np.zeros_like(self.array)])
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
        self._free_rows.extend(range(2 * capacity - 1, capacity - 1, -1))

    def _grow_columns(self, width: int) -> None:
        grown = np.zeros((self.array.shape[0], max(width, 2 * self.array.shape[1])), dtype=np.int32)
        grown[:, : self.array.shape[1]] = self.array
        self.array = grown


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    # Rows of the flattened batch whose logits are sampled, and their sequences.
    sample_rows: torch.Tensor
    sample_seq_ids: list[int]


class _Staging:
    """A pinned host buffer, rewritten only once the copy out of it last time is done.

    Sized up front for the largest step: growing it mid-run allocates page-locked memory,
    which CUDA counts among its implicitly synchronizing operations."""

    def __init__(self, dtype: torch.dtype, capacity: int = 0) -> None:
        self.dtype = dtype
        self.buffer = torch.empty(capacity, dtype=dtype, pin_memory=capacity > 0)
        self.copied: torch.cuda.Event | None = None

    def view(self, size: int) -> np.ndarray:
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        if self.buffer.numel() < size:
            self.buffer = torch.empty(max(size, 2 * self.buffer.numel()), dtype=self.dtype, pin_memory=True)
        return self.buffer[:size].numpy()


# Staging sets in turn: a step's inputs are written while earlier steps' copies may still
# be queued behind the work before them (one set per step launched and not finished).
_NUM_STAGING_SETS = 3


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
        capacity64 = capacity32 = 0
        if device.type == "cuda" and max_num_tokens and max_num_seqs:
            num_seqs = min(max_num_seqs, max_num_tokens)
            sizes64, sizes32 = _staging_sizes(
                max_num_tokens, num_seqs, num_seqs, num_seqs, max_blocks_per_seq
            )
            capacity64 = _aligned_offsets(sizes64, itemsize=8)[-1]
            capacity32 = _aligned_offsets(sizes32, itemsize=4)[-1]
        self._staging_sets = [
            (_Staging(torch.int64, capacity64), _Staging(torch.int32, capacity32))
            for _ in range(_NUM_STAGING_SETS)
        ]
        self._num_builds = 0

    def remove(self, seq_id: int) -> None:
        self.block_tables.remove(seq_id)

    def clear(self) -> None:
        self.block_tables.clear()

    def build(
        self, scheduled: Sequence[worker_pb2.ScheduledSequence], sequences: Mapping[int, _SequenceLike]
    ) -> StepInputs:
        """Advances each scheduled sequence's num_computed_tokens and returns the inputs."""
        staging64, staging32 = self._staging_sets[self._num_builds % _NUM_STAGING_SETS]
        self._num_builds += 1
        num_seqs = len(scheduled)
        block_size = self.block_size
        tables = self.block_tables
        row_of = tables.row_of
        rows_list: list[int] = []
        starts_list: list[int] = []
        query_lens_list: list[int] = []
        input_ids: list[int] = []
        # Each input still on the device: its position in input_ids, and the token.
        fed_at: list[int] = []
        fed_tokens: list[DeviceToken] = []
        sample_index: list[int] = []
        sample_seq_ids: list[int] = []
        # A loop over every sequence of the step: the per-sequence work is kept to plain
        # list operations; the per-token work below is NumPy.
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
                # new or num_known == end - 1.
                assert end == num_seq_tokens and (num_new == 1 or num_known == end - 1), (
                    f"seq {seq_id}: unknown inputs"
                )
                if num_new > 1:
                    input_ids.extend(token_ids[start : end - 1])
                fed_at.append(len(input_ids))
                fed_tokens.append(state.newest_pending_token)
                input_ids.append(0)
            rows_list.append(row)
            starts_list.append(start)
            query_lens_list.append(num_new)
            state.num_computed_tokens = end
            # A sequence samples once its tokens are all computed; a partial prefill chunk
            # only fills the cache.
            if end == num_seq_tokens:
                sample_index.append(index)
                sample_seq_ids.append(seq_id)
        num_tokens = len(input_ids)
        rows = np.array(rows_list, dtype=np.int64)
        starts = np.array(starts_list, dtype=np.int64)
        num_blocks = tables.num_blocks[rows]
        # A decode-only step (one token per sequence, the common case) needs no expansion
        # from sequences to tokens: each sequence's row is its token's row.
        decode_only = num_tokens == num_seqs
        if decode_only:
            query_lens = np.ones(num_seqs, dtype=np.int64)
            query_start_loc = np.arange(num_seqs + 1, dtype=np.int64)
            positions = starts
            token_rows = rows
            max_query_len = 1
        else:
            query_lens = np.array(query_lens_list, dtype=np.int64)
            query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
            np.cumsum(query_lens, out=query_start_loc[1:])
            token_seq = np.repeat(np.arange(num_seqs), query_lens)
            positions = starts[token_seq] + np.arange(num_tokens) - query_start_loc[token_seq]
            token_rows = rows[token_seq]
            max_query_len = int(query_lens.max())
        seq_lens = starts + query_lens
        too_few = seq_lens > num_blocks * block_size
        assert not too_few.any(), (
            f"seqs {[scheduled[i].seq_id for i in np.flatnonzero(too_few)]}: too few blocks"
        )
        block_index, block_offset = np.divmod(positions, block_size)
        slot_mapping = tables.array[token_rows, block_index].astype(np.int64) * block_size + block_offset
        max_blocks = int(num_blocks.max())
        num_samples = len(sample_index)
        # Every sequence samples unless a prefill chunk is partial: then the rows are a
        # plain range, no gather.
        if num_samples == num_seqs:
            sample_rows = query_start_loc[1:] - 1
        else:
            sample_rows = query_start_loc[1:][sample_index] - 1

        fed_sources, fed_indices = _fed_token_sources(fed_tokens)
        num_fed = len(fed_at)
        sizes64, sizes32 = _staging_sizes(num_tokens, num_seqs, num_samples, num_fed, max_blocks)
        offsets64 = _aligned_offsets(sizes64, itemsize=8)
        host64 = self._host(staging64, offsets64[-1], np.int64)
        ids_h, positions_h, slots_h, samples_h, fed_at_h, fed_from_h = _segments(host64, offsets64, sizes64)
        ids_h[:] = input_ids
        positions_h[:] = positions
        slots_h[:] = slot_mapping
        samples_h[:] = sample_rows
        fed_at_h[:] = fed_at
        fed_from_h[:] = fed_indices
        offsets32 = _aligned_offsets(sizes32, itemsize=4)
        host32 = self._host(staging32, offsets32[-1], np.int32)
        starts_h, lens_h, tables_h = _segments(host32, offsets32, sizes32)
        starts_h[:] = query_start_loc
        lens_h[:] = seq_lens
        tables_h.reshape(num_seqs, max_blocks)[:] = tables.array[rows, :max_blocks]

        device64, device32 = self._to_device(host64, staging64), self._to_device(host32, staging32)
        ids_d, positions_d, slots_d, samples_d, fed_at_d, fed_from_d = _tensor_segments(
            device64, offsets64, sizes64
        )
        starts_d, lens_d, tables_d = _tensor_segments(device32, offsets32, sizes32)
        if fed_at:
            ids_d.index_copy_(0, fed_at_d, fed_sources.index_select(0, fed_from_d))
        metadata = AttentionMetadata(
            slot_mapping=slots_d,
            query_start_loc=starts_d,
            seq_lens=lens_d,
            block_tables=tables_d.view(num_seqs, max_blocks),
            max_query_len=max_query_len,
            max_seq_len=int(seq_lens.max()),
            no_cached_context=not starts.any(),
        )
        return StepInputs(
            input_ids=ids_d,
            positions=positions_d,
            metadata=metadata,
            sample_rows=samples_d,
            sample_seq_ids=sample_seq_ids,
        )

    def _host(self, staging: _Staging, size: int, dtype: type) -> np.ndarray:
        if self.device.type == "cuda":
            return staging.view(size)
        # On CPU the tensors alias these arrays, so each step gets its own.
        return np.empty(size, dtype=dtype)

    def _to_device(self, host: np.ndarray, staging: _Staging) -> torch.Tensor:
        if self.device.type == "cuda":
            tensor = staging.buffer[: host.shape[0]].to(self.device, non_blocking=True)
            staging.copied = torch.cuda.Event()
            staging.copied.record()
            return tensor
        return torch.from_numpy(host)


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
        return first, [token.index for token in fed]
    sources: dict[int, torch.Tensor] = {}
    for token in fed:
        sources.setdefault(id(token.tokens), token.tokens)
    offsets, start = {}, 0
    for key, tensor in sources.items():
        offsets[key] = start
        start += tensor.shape[0]
    combined = next(iter(sources.values())) if len(sources) == 1 else torch.cat(list(sources.values()))
    return combined, [offsets[id(token.tokens)] + token.index for token in fed]


# Triton compiles a kernel variant per pointer alignment (16 bytes or not): every tensor cut
# from a staging buffer starts on a 16-byte boundary, so that steps of different sizes
# reuse one variant instead of compiling new ones mid-run.
_ALIGNMENT_BYTES = 16


def _aligned_offsets(sizes: Sequence[int], itemsize: int) -> list[int]:
    """Start of each segment, and the total as the last entry."""
    step = _ALIGNMENT_BYTES // itemsize
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + -(-size // step) * step)
    return offsets


def _segments(buffer: np.ndarray, offsets: list[int], sizes: Sequence[int]) -> list[np.ndarray]:
    return [buffer[start : start + size] for start, size in zip(offsets, sizes)]


def _tensor_segments(tensor: torch.Tensor, offsets: list[int], sizes: Sequence[int]) -> list[torch.Tensor]:
    """As _segments, for a tensor: one split into segments and their padding (every other
    piece), which costs less than one slice per segment."""
    pieces: list[int] = []
    for start, size, next_start in zip(offsets, sizes, offsets[1:]):
        pieces += [size, next_start - start - size]
    return list(tensor.split_with_sizes(pieces)[::2])
