"""The scheduler's side of speculative decoding, fed by hand-made worker results: lookahead
slots taken from free blocks and counted in the token budget, the blocks past the gained
tokens given back, a speculating sequence never planned ahead of its result, stops
inside a run of accepted tokens, and the rule that turns speculation off."""

from __future__ import annotations

import pytest
from pagedserve.v1 import common_pb2, worker_pb2

from services.common.errors import UnavailableError
from services.scheduler.config import SchedulerConfig
from services.scheduler.outputs import SchedulerOutput
from services.scheduler.scheduler import Scheduler

BLOCK_SIZE = 4
K = 3


def _scheduler(**config: object) -> Scheduler:
    return Scheduler(
        SchedulerConfig(seed=0, **config),
        num_blocks=16,
        block_size=BLOCK_SIZE,
        max_model_len=256,
        eos_token_ids=[2],
        num_speculative_tokens=K,
    )


def _sampling(**fields: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=40, **fields)


def _result(step: SchedulerOutput, tokens: dict[int, list[int]]) -> worker_pb2.StepResult:
    """Each sampling entry's tokens: `tokens[seq_id]` for speculating ones, else [7]."""
    result = worker_pb2.StepResult(step_id=step.step_id)
    for item in step.scheduled:
        if not item.num_samples:
            continue
        gained = tokens.get(item.seq_id, [7] * item.num_samples)
        result.seq_ids.extend([item.seq_id] * len(gained))
        result.token_ids.extend(gained)
        if item.num_lookahead_tokens:
            result.speculation.add(seq_id=item.seq_id, num_proposed=K, num_accepted=len(gained) - 1)
    return result


def _planned(scheduler: Scheduler) -> SchedulerOutput:
    """The next step, which the test expects there to be."""
    step = scheduler.schedule()
    assert step is not None
    return step


def _prefilled(scheduler: Scheduler, prompt_len: int = 5, **sampling: object) -> None:
    scheduler.add_request("r", list(range(10, 10 + prompt_len)), _sampling(**sampling))
    step = _planned(scheduler)
    scheduler.update_from_output(step, _result(step, {}))


def test_lookahead_is_budgeted_and_rejected_slots_go_back() -> None:
    scheduler = _scheduler()
    _prefilled(scheduler)  # 6 tokens known, 5 computed
    free_before = scheduler.block_manager.num_free_blocks
    step = _planned(scheduler)
    (item,) = step.scheduled
    assert (item.num_new_tokens, item.num_lookahead_tokens) == (1, K)
    assert step.num_scheduled_tokens == 1 + K
    sequence = item.sequence
    assert len(sequence.block_table) == 3  # slots for positions 0..8
    assert scheduler.block_manager.num_free_blocks == free_before - 1
    # With the step in flight nothing else is planned: its gain is unknown.
    assert scheduler.schedule() is None
    outputs = scheduler.update_from_output(step, _result(step, {item.seq_id: [20]}))
    assert [o.new_token_ids for o in outputs] == [[20]]
    assert (sequence.num_tokens, sequence.num_computed_tokens) == (7, 6)
    assert len(sequence.block_table) == 2
    assert scheduler.block_manager.num_free_blocks == free_before


def test_accepted_tokens_count_as_computed() -> None:
    scheduler = _scheduler()
    _prefilled(scheduler)
    step = _planned(scheduler)
    (item,) = step.scheduled
    outputs = scheduler.update_from_output(step, _result(step, {item.seq_id: [20, 21, 22, 23]}))
    assert outputs[0].new_token_ids == [20, 21, 22, 23]
    assert (item.sequence.num_tokens, item.sequence.num_computed_tokens) == (10, 9)
    # The next step computes the last token and speculates again.
    step = scheduler.schedule()
    assert step is not None and step.scheduled[0].num_lookahead_tokens == K


def test_a_stop_token_ends_the_run_of_accepted_tokens() -> None:
    scheduler = _scheduler()
    _prefilled(scheduler, stop_token_ids=[21])
    step = _planned(scheduler)
    (item,) = step.scheduled
    (output,) = scheduler.update_from_output(step, _result(step, {item.seq_id: [20, 21, 22]}))
    assert output.new_token_ids == [20, 21]
    assert output.finish_reason == common_pb2.FINISH_REASON_STOP
    assert scheduler.block_manager.num_free_blocks == 16


def test_lookahead_stays_within_max_tokens() -> None:
    scheduler = _scheduler()
    scheduler.add_request("r", [10, 11, 12], common_pb2.SamplingParams(temperature=0.0, max_tokens=3))
    step = _planned(scheduler)
    scheduler.update_from_output(step, _result(step, {}))
    step = _planned(scheduler)
    assert step.scheduled[0].num_lookahead_tokens == 1  # 1 output so far, 2 more at most


def test_no_speculation_in_large_batches() -> None:
    scheduler = _scheduler(speculative_max_batch_size=1)
    for name in ("a", "b"):
        scheduler.add_request(name, [10, 11, 12, 13], _sampling())
    step = _planned(scheduler)
    scheduler.update_from_output(step, _result(step, {}))
    step = _planned(scheduler)
    assert [item.num_lookahead_tokens for item in step.scheduled] == [0, 0]


def test_no_speculation_while_requests_queue() -> None:
    # Two may speculate, but a third waits: the batch is about to grow.
    scheduler = _scheduler(speculative_max_batch_size=2, max_num_seqs=2)
    for name in ("a", "b", "c"):
        scheduler.add_request(name, [10, 11, 12, 13], _sampling())
    step = _planned(scheduler)
    assert len(step.scheduled) == 2 and len(scheduler.waiting) == 1
    scheduler.update_from_output(step, _result(step, {}))
    step = _planned(scheduler)
    assert [item.num_lookahead_tokens for item in step.scheduled] == [0, 0]


def test_a_sequence_whose_proposals_fail_backs_off_then_retries() -> None:
    scheduler = _scheduler(
        speculative_min_accepted_tokens=0.5, speculative_backoff_steps=2, max_steps_in_flight=1
    )
    _prefilled(scheduler)
    lookaheads = []
    for _ in range(7):
        step = _planned(scheduler)
        item = step.scheduled[0]
        lookaheads.append(item.num_lookahead_tokens)
        scheduler.update_from_output(step, _result(step, {item.seq_id: [20]}))
    # The mean of accepted tokens starts at K and halves with each failure: 1.5, 0.75,
    # 0.375 < 0.5; two plain steps; one more try, which fails at once (mean at 0.5 -> 0.25).
    assert lookaheads == [K, K, K, 0, 0, K, 0]


def test_a_result_with_more_tokens_than_slots_is_refused() -> None:
    scheduler = _scheduler()
    _prefilled(scheduler)
    step = _planned(scheduler)
    (item,) = step.scheduled
    with pytest.raises(UnavailableError, match="do not fit"):
        scheduler.update_from_output(step, _result(step, {item.seq_id: [20] * (K + 2)}))
