"""The step input builder against the inputs spelled out by hand."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pagedserve.v1 import worker_pb2

from gpu_worker.block_tables import BlockTables
from gpu_worker.input_batch import DeviceToken, StepInputBuilder

BLOCK_SIZE = 4


@dataclass
class _State:
    token_ids: list[int]
    num_computed_tokens: int
    num_pending_tokens: int = 0
    newest_pending_token: DeviceToken | None = None


def test_block_tables_grow_and_reuse_rows() -> None:
    tables = BlockTables(max_blocks_per_seq=2, capacity=1)
    row_a = tables.extend(7, [3, 4, 5])  # wider than the initial columns
    row_b = tables.extend(8, [9])  # more rows than the initial capacity
    assert row_a != row_b
    assert tables.array[row_a, :3].tolist() == [3, 4, 5] and tables.array[row_b, 0] == 9
    tables.remove(7)
    row_c = tables.extend(10, [1])
    assert row_c == row_a and tables.num_blocks[row_c] == 1


def test_mixed_step_inputs() -> None:
    builder = StepInputBuilder(max_blocks_per_seq=4, block_size=BLOCK_SIZE, device=torch.device("cpu"))
    sequences = {
        1: _State(token_ids=list(range(100, 106)), num_computed_tokens=5),  # decode at position 5
        2: _State(token_ids=list(range(200, 207)), num_computed_tokens=0),  # prefill chunk of 3
        3: _State(token_ids=list(range(300, 302)), num_computed_tokens=0),  # whole prompt of 2
    }
    step = worker_pb2.StepRequest(step_id=1)
    step.scheduled.add(seq_id=1, num_new_tokens=1, new_block_ids=[5, 2])
    step.scheduled.add(seq_id=2, num_new_tokens=3, new_block_ids=[7])
    step.scheduled.add(seq_id=3, num_new_tokens=2, new_block_ids=[0])
    inputs = builder.build(step.scheduled, sequences)

    assert inputs.input_ids.tolist() == [105, 200, 201, 202, 300, 301]
    assert inputs.positions.tolist() == [5, 0, 1, 2, 0, 1]
    assert inputs.metadata.slot_mapping.tolist() == [2 * 4 + 1, 28, 29, 30, 0, 1]
    assert inputs.metadata.query_start_loc.tolist() == [0, 1, 4, 6]
    assert inputs.metadata.seq_lens.tolist() == [6, 3, 2]
    assert inputs.metadata.block_tables.tolist() == [[5, 2], [7, 0], [0, 0]]
    assert (inputs.metadata.max_query_len, inputs.metadata.max_seq_len) == (3, 6)
    assert not inputs.metadata.no_cached_context
    # Sequences 1 and 3 reach the end of their tokens and sample; 2 is mid-prompt.
    assert inputs.sample_rows.tolist() == [0, 5] and inputs.sample_seq_ids == [1, 3]
    assert [s.num_computed_tokens for s in sequences.values()] == [6, 3, 2]


def test_tokens_still_on_the_device_are_fed_into_the_inputs() -> None:
    builder = StepInputBuilder(max_blocks_per_seq=4, block_size=BLOCK_SIZE, device=torch.device("cpu"))
    previous_draws = torch.tensor([41, 42, 43])
    sequences = {
        # Decodes position 3, the token the previous step drew in its row 2.
        1: _State(
            [100, 101, 102],
            num_computed_tokens=3,
            num_pending_tokens=1,
            newest_pending_token=DeviceToken(previous_draws, 2),
        ),
        # A known token.
        2: _State([200, 201], num_computed_tokens=1),
        # Two draws not read yet: the older one's position (3) is computed already, the
        # newer one's (4) now.
        3: _State(
            [300, 301, 302],
            num_computed_tokens=4,
            num_pending_tokens=2,
            newest_pending_token=DeviceToken(previous_draws, 0),
        ),
    }
    step = worker_pb2.StepRequest(step_id=1)
    step.scheduled.add(seq_id=1, num_new_tokens=1, new_block_ids=[5])
    step.scheduled.add(seq_id=2, num_new_tokens=1, new_block_ids=[6])
    step.scheduled.add(seq_id=3, num_new_tokens=1, new_block_ids=[7, 8])
    inputs = builder.build(step.scheduled, sequences)

    assert inputs.input_ids.tolist() == [43, 201, 41]
    assert inputs.positions.tolist() == [3, 1, 4]
    assert inputs.metadata.seq_lens.tolist() == [4, 2, 5]
    assert inputs.sample_seq_ids == [1, 2, 3]
    assert [s.num_computed_tokens for s in sequences.values()] == [4, 2, 5]
