"""The inputs of a step with speculating sequences: each of those computes its last
known token and its proposals in one forward, and is verified rather than sampled; the
other sequences of the step are gathered as in any step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from pagedserve.v1 import worker_pb2

if TYPE_CHECKING:
    from gpu_worker.input_batch import StepInputBuilder, _Gathered, _SequenceLike


@dataclass
class Verification:
    """The speculating sequences of a step: their batch indices, ids and numbers of
    proposals, and the rows of the flattened batch that predict their tokens (k + 1 per
    sequence, in order)."""

    batch_index: list[int] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)
    num_proposed: list[int] = field(default_factory=list)
    rows: torch.Tensor | None = None

    def with_rows(self, query_start_loc: np.ndarray, device: torch.device) -> Verification:
        starts = query_start_loc
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in self.batch_index])
        self.rows = torch.from_numpy(rows).to(device)
        return self


def extend_tables(builder: StepInputBuilder, scheduled: Sequence[worker_pb2.ScheduledSequence]) -> None:
    """Appends each entry's new blocks now, ahead of build(tables_extended=True), for a
    proposer that reads the tables before the step's inputs are built."""
    for entry in scheduled:
        builder.block_tables.extend(entry.seq_id, entry.new_block_ids)


def gather_speculative(
    builder: StepInputBuilder,
    scheduled: Sequence[worker_pb2.ScheduledSequence],
    sequences: Mapping[int, _SequenceLike],
    proposals: Mapping[int, Sequence[int]],
    tables_extended: bool,
    gathered: _Gathered,
) -> _Gathered:
    """StepInputBuilder._gather for a step with speculating sequences: each of those computes its last
    token and its proposals, and is verified rather than sampled."""
    row_of = builder.block_tables.row_of
    verification = gathered.verification = Verification()
    for index, entry in enumerate(scheduled):
        seq_id = entry.seq_id
        drafts = proposals.get(seq_id)
        if drafts is None:
            one = builder._gather([_no_new_blocks(entry)] if tables_extended else [entry], sequences)
            _append_gathered(gathered, one, index)
            continue
        state = sequences[seq_id]
        if not tables_extended:
            builder.block_tables.extend(seq_id, entry.new_block_ids)
        start = state.num_computed_tokens
        assert entry.num_new_tokens == 1 and not state.num_pending_tokens, (
            f"seq {seq_id}: speculates while its tokens are not all known"
        )
        assert start == len(state.token_ids) - 1, f"seq {seq_id}: speculates past {start}"
        gathered.rows.append(row_of[seq_id])
        gathered.starts.append(start)
        gathered.query_lens.append(1 + len(drafts))
        gathered.input_ids.append(state.token_ids[start])
        gathered.input_ids.extend(drafts)
        verification.batch_index.append(index)
        verification.seq_ids.append(seq_id)
        verification.num_proposed.append(len(drafts))
        state.num_computed_tokens = start + 1
    return gathered


def _no_new_blocks(entry: worker_pb2.ScheduledSequence) -> worker_pb2.ScheduledSequence:
    return worker_pb2.ScheduledSequence(seq_id=entry.seq_id, num_new_tokens=entry.num_new_tokens)


def _append_gathered(into: _Gathered, one: _Gathered, index: int) -> None:
    """Appends the gathering of the single entry at batch index `index`."""
    offset = len(into.input_ids)
    into.rows += one.rows
    into.starts += one.starts
    into.query_lens += one.query_lens
    into.fed_at += [offset + at for at in one.fed_at]
    into.fed_tokens += one.fed_tokens
    into.input_ids += one.input_ids
    if one.sample_index:
        into.sample_index.append(index)
        into.sample_seq_ids += one.sample_seq_ids
