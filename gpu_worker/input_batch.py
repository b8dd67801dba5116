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

from gpu_worker.model.attention import AttentionMetadata
from pagedserve.v1 import worker_pb2


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
    """A pinned host buffer, rewritten only once the copy out of it last time is done."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.buffer = torch.empty(0, dtype=dtype)
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
    def __init__(self, max_blocks_per_seq: int, block_size: int, device: torch.device) -> None:
        self.block_tables = BlockTables(max_blocks_per_seq)
        self.block_size = block_size
        self.device = device
        self._staging_sets = [(_Staging(torch.int64), _Staging(torch.int32)) for _ in range(_NUM_STAGING_SETS)]
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
        rows: list[int] = []
        starts_list: list[int] = []
        query_lens_list: list[int] = []
        input_ids: list[int] = []
        # (position in input_ids, token) of each input still on the device.
        fed: list[tuple[int, DeviceToken]] = []
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
            num_known = len(state.token_ids)
            num_seq_tokens = num_known + state.num_pending_tokens
            assert 0 < num_new and end <= num_seq_tokens, f"seq {seq_id}: computing {start}:{end} of {num_seq_tokens}"
            if end <= num_known:
                if num_new == 1:
                    input_ids.append(state.token_ids[start])
                else:
                    input_ids.extend(state.token_ids[start:end])
            else:
                # Only the newest sample can be fed: every earlier one was computed by the
                # step that followed it.
                assert max(start, num_known) == end - 1 == num_seq_tokens - 1, f"seq {seq_id}: unknown inputs"
                if num_new > 1:
                    input_ids.extend(state.token_ids[start:end - 1])
                fed.append((len(input_ids), state.newest_pending_token))
                input_ids.append(0)
            rows.append(row)
            starts_list.append(start)
            query_lens_list.append(num_new)
            state.num_computed_tokens = end
            # A sequence samples once its tokens are all computed; a partial prefill chunk
            # only fills the cache.
            if end == num_seq_tokens:
                sample_index.append(index)
                sample_seq_ids.append(seq_id)
        rows = np.array(rows, dtype=np.int64)
        starts = np.array(starts_list, dtype=np.int64)
        query_lens = np.array(query_lens_list, dtype=np.int64)

        seq_lens = starts + query_lens
        too_few = seq_lens > tables.num_blocks[rows] * block_size
        assert not too_few.any(), f"seqs {[scheduled[i].seq_id for i in np.flatnonzero(too_few)]}: too few blocks"
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        if num_tokens == num_seqs:  # decode only: one token per sequence
            token_seq, positions = np.arange(num_seqs), starts
        else:
            token_seq = np.repeat(np.arange(num_seqs), query_lens)
            positions = starts[token_seq] + np.arange(num_tokens) - query_start_loc[token_seq]
        slot_mapping = (
            tables.array[rows[token_seq], positions // block_size].astype(np.int64) * block_size
            + positions % block_size
        )
        max_blocks = int(tables.num_blocks[rows].max())
        sample_rows = query_start_loc[1:][sample_index] - 1
        num_samples = len(sample_index)

        fed_sources, fed_indices = _fed_token_sources(fed)
        sizes64 = (num_tokens, num_tokens, num_tokens, num_samples, len(fed), len(fed))
        offsets64 = _aligned_offsets(sizes64, itemsize=8)
        host64 = self._host(staging64, int(offsets64[-1]), np.int64)
        ids_h, positions_h, slots_h, samples_h, fed_at_h, fed_from_h = _segments(host64, offsets64, sizes64)
        ids_h[:] = input_ids
        positions_h[:] = positions
        slots_h[:] = slot_mapping
        samples_h[:] = sample_rows
        fed_at_h[:] = [position for position, _ in fed]
        fed_from_h[:] = fed_indices
        sizes32 = (num_seqs + 1, num_seqs, num_seqs * max_blocks)
        offsets32 = _aligned_offsets(sizes32, itemsize=4)
        host32 = self._host(staging32, int(offsets32[-1]), np.int32)
        starts_h, lens_h, tables_h = _segments(host32, offsets32, sizes32)
        starts_h[:] = query_start_loc
        lens_h[:] = seq_lens
        tables_h.reshape(num_seqs, max_blocks)[:] = tables.array[rows, :max_blocks]

        device64, device32 = self._to_device(host64, staging64), self._to_device(host32, staging32)

        def part(tensor: torch.Tensor, offsets: list[int], index: int) -> torch.Tensor:
            sizes = sizes64 if offsets is offsets64 else sizes32
            return tensor[offsets[index] : offsets[index] + sizes[index]]

        input_ids_device = part(device64, offsets64, 0)
        if fed:
            input_ids_device.index_copy_(
                0, part(device64, offsets64, 4), fed_sources.index_select(0, part(device64, offsets64, 5))
            )
        metadata = AttentionMetadata(
            slot_mapping=part(device64, offsets64, 2),
            query_start_loc=part(device32, offsets32, 0),
            seq_lens=part(device32, offsets32, 1),
            block_tables=part(device32, offsets32, 2).view(num_seqs, max_blocks),
            max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()),
            no_cached_context=bool((starts == 0).all()),
        )
        return StepInputs(
            input_ids=input_ids_device,
            positions=part(device64, offsets64, 1),
            metadata=metadata,
            sample_rows=part(device64, offsets64, 3),
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


def _fed_token_sources(fed: list[tuple[int, DeviceToken]]) -> tuple[torch.Tensor | None, list[int]]:
    """One tensor holding every fed token (normally the previous step's draws, as they
    are) and each token's index in it."""
    if not fed:
        return None, []
    first = fed[0][1].tokens
    if all(token.tokens is first for _, token in fed):
        return first, [token.index for _, token in fed]
    sources: dict[int, torch.Tensor] = {}
    for _, token in fed:
        sources.setdefault(id(token.tokens), token.tokens)
    offsets, start = {}, 0
    for key, tensor in sources.items():
        offsets[key] = start
        start += tensor.shape[0]
    combined = next(iter(sources.values())) if len(sources) == 1 else torch.cat(list(sources.values()))
    return combined, [offsets[id(token.tokens)] + token.index for _, token in fed]


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
