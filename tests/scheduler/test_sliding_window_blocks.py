"""A model whose every layer attends within a sliding window: the scheduler gives back
the blocks before the window of each sequence's next token, keeps their places in the
table, waits for steps in flight that still read them, drops a block only once the
prefix cache has it, and swaps sequences out and in around the placeholders. Fed by
hand-made worker results; the served models' tokens against HF's are in
tests/e2e/test_e2e_architectures.py."""

from __future__ import annotations

from pagedserve.v1 import common_pb2, worker_pb2

from services.scheduler.block_manager import FREED_BLOCK, BlockManager, num_freed_blocks
from services.scheduler.config import PreemptionMode, SchedulerConfig
from services.scheduler.outputs import SchedulerOutput
from services.scheduler.scheduler import Scheduler

BLOCK_SIZE = 4
WINDOW = 6
NUM_BLOCKS = 32


def _scheduler(**config: object) -> Scheduler:
    return Scheduler(
        SchedulerConfig(seed=0, **config),
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        max_model_len=256,
        eos_token_ids=[2],
        num_cpu_blocks=16,
        sliding_window=WINDOW,
    )


def _result(step: SchedulerOutput) -> worker_pb2.StepResult:
    result = worker_pb2.StepResult(step_id=step.step_id)
    for item in step.scheduled:
        result.seq_ids.extend([item.seq_id] * item.num_samples)
        result.token_ids.extend([7] * item.num_samples)
    return result


def _add(scheduler: Scheduler, name: str = "r", prompt_len: int = 10) -> None:
    sampling = common_pb2.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=40)
    scheduler.add_request(name, list(range(10, 10 + prompt_len)), sampling)


def _step(scheduler: Scheduler) -> SchedulerOutput:
    step = scheduler.schedule()
    assert step is not None
    scheduler.update_from_output(step, _result(step))
    return step


def _first_needed_block(num_computed_tokens: int) -> int:
    return max(0, num_computed_tokens - WINDOW + 1) // BLOCK_SIZE


def test_blocks_before_the_window_go_back_and_keep_their_places() -> None:
    scheduler = _scheduler(enable_prefix_caching=False, max_steps_in_flight=1)
    _add(scheduler)
    sequence = scheduler.requests["r"].sequences[0]
    for _ in range(30):
        step = _step(scheduler)
        table = step.scheduled[0].sequence.block_table
        # The step just planned freed what its own first token no longer sees.
        first_query = sequence.num_computed_tokens - step.scheduled[0].num_new_tokens
        num_freed = num_freed_blocks(table)
        assert num_freed == _first_needed_block(first_query)
        assert FREED_BLOCK not in table[num_freed:]
        assert len(table) == -(-sequence.num_computed_tokens // BLOCK_SIZE)
        assert scheduler.block_manager.num_free_blocks == NUM_BLOCKS - (len(table) - num_freed)
    # 40 tokens computed, yet the sequence holds the blocks of its window only.
    assert sequence.num_computed_tokens >= 39
    assert len(sequence.block_table) - num_freed_blocks(sequence.block_table) <= 3


def test_steps_in_flight_keep_the_blocks_they_read() -> None:
    scheduler = _scheduler(enable_prefix_caching=False, max_steps_in_flight=2)
    _add(scheduler, prompt_len=12)
    first = scheduler.schedule()
    assert first is not None
    scheduler.update_from_output(first, _result(first))
    older = scheduler.schedule()  # in flight, computes position 12
    newer = scheduler.schedule()  # planned behind it, from position 13 on
    assert older is not None and newer is not None
    sequence = newer.scheduled[0].sequence
    # Position 13's window starts at 8: block 1 (positions 4..7) left the table, but the
    # step in flight reads position 7 for position 12, so the pool has it back only later.
    assert num_freed_blocks(sequence.block_table) == 2
    held = scheduler.in_flight.held_block_ids()
    assert held
    scheduler.update_from_output(older, _result(older))
    scheduler.update_from_output(newer, _result(newer))
    assert not scheduler.in_flight.held_block_ids()
    assert scheduler.block_manager.num_free_blocks == NUM_BLOCKS - (
        len(sequence.block_table) - num_freed_blocks(sequence.block_table)
    )


def test_a_dropped_block_stays_in_the_prefix_cache() -> None:
    scheduler = _scheduler(max_steps_in_flight=2)
    _add(scheduler, prompt_len=12)
    # Two steps in flight: each is planned before the result of the one before it, which
    # is what offers that step's blocks to the cache.
    in_flight = scheduler.schedule()
    for _ in range(8):
        planned = scheduler.schedule()
        assert in_flight is not None and planned is not None
        scheduler.update_from_output(in_flight, _result(in_flight))
        in_flight = planned
    assert in_flight is not None
    scheduler.update_from_output(in_flight, _result(in_flight))
    cached = scheduler.block_manager.cached_blocks
    sequence = scheduler.requests["r"].sequences[0]
    assert num_freed_blocks(sequence.block_table) >= 2
    # Its first blocks are out of its table, free, and still found by their hashes.
    assert len(cached) >= num_freed_blocks(sequence.block_table)
    _add(scheduler, "same prefix", prompt_len=12)
    step = _step(scheduler)
    newcomer = next(item for item in step.scheduled if item.sequence.request.request_id == "same prefix")
    assert newcomer.sequence.num_computed_tokens == 12 and newcomer.num_new_tokens < 12


def test_a_swapped_sequence_keeps_its_placeholders() -> None:
    scheduler = _scheduler(enable_prefix_caching=False, max_steps_in_flight=1, preemption_mode="swap")
    _add(scheduler, prompt_len=12)
    for _ in range(10):
        _step(scheduler)
    sequence = scheduler.requests["r"].sequences[0]
    table = list(sequence.block_table)
    num_freed = num_freed_blocks(table)
    assert num_freed >= 3
    scheduler.preemption.preempt(sequence, PreemptionMode.SWAP)
    assert num_freed_blocks(sequence.cpu_block_table) == num_freed
    assert len(sequence.cpu_block_table) == len(table)
    swap_out = list(scheduler._worker_ops.swap_out)
    assert [device for device, _ in swap_out] == table[num_freed:]
    step = _step(scheduler)
    assert [cpu for cpu, _ in step.swap_in] == [cpu for _, cpu in swap_out]
    assert num_freed_blocks(sequence.block_table) == num_freed
    assert len(sequence.block_table) >= len(table)
    assert scheduler.cpu_pool.num_free_blocks == 16


def test_the_pool_skips_placeholders_when_forking_and_freeing() -> None:
    manager = BlockManager(8, BLOCK_SIZE)

    class Seq:
        def __init__(self) -> None:
            self.num_computed_tokens = 0
            self.block_table: list[int] = []

    parent = Seq()
    assert manager.allocate_slots(parent, 16) is not None
    dropped = manager.drop_leading_blocks(parent, 2)
    assert len(dropped) == 2 and parent.block_table[:2] == [FREED_BLOCK] * 2
    assert manager.drop_leading_blocks(parent, 2) == []  # already dropped
    manager.free_blocks(dropped)
    child = Seq()
    manager.fork(parent, child)
    assert child.block_table == parent.block_table
    assert [manager.ref_count(b) for b in parent.block_table[2:]] == [2, 2]
    manager.free(parent)
    manager.free(child)
    assert manager.num_free_blocks == 8
