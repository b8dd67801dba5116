"""Overlapped scheduling: step N+1 is planned and sent while step N runs. A sequence that
samples in N is computed in N+1 with the token the worker sampled; stops found in N's
result apply one step late, and the token N+1 sampled for a stopped sequence is dropped;
blocks a step in flight uses stay held until it returns."""

from collections.abc import Callable, Sequence

import pytest

from services.scheduler.config import PreemptionMode
from tests.support.fake_worker import LENGTH, STOP, reference_output
from tests.support.scheduler_harness import ABORT, Harness, sampling


def scripted(tokens: list[int]) -> Callable[[Sequence[int], int], int]:
    """Samples tokens[k] as the k-th generated token of any 3-token prompt."""
    return lambda context, index: tokens[len(context) - 3]


def test_a_decode_runs_ahead_of_its_sample_with_the_slot_for_that_token() -> None:
    h = Harness(num_blocks=16, block_size=4)
    params = sampling(max_tokens=6, ignore_eos=True)
    h.add("a", [2, 3, 4], params)
    first, ahead = h.schedule(), h.schedule()
    assert first is not None and ahead is not None
    # Step 2 computes position 3, the token step 1 samples: the first block's last slot.
    assert [(s.seq_id, s.num_new_tokens, s.new_block_ids) for s in ahead.scheduled] == [(1, 1, ())]
    sequence = h.scheduler.running[0]
    assert (sequence.num_tokens, sequence.num_pending_samples, sequence.num_computed_tokens) == (3, 2, 4)
    h.finish_step(first)
    # Step 3 computes position 4, which starts a second block.
    third = h.schedule()
    assert third is not None and len(third.scheduled[0].new_block_ids) == 1
    h.drain()
    assert h.tokens["a", 0] == reference_output([2, 3, 4], params, 1024)[0]
    assert h.finals["a", 0].finish_reason == LENGTH and h.num_dropped_tokens == 0


def test_a_stop_found_one_step_late_drops_one_token_and_frees_the_blocks_when_that_step_returns() -> None:
    h = Harness(num_blocks=16, block_size=2, sampler=scripted([7, 1, 9, 9, 9]))  # 1 is eos
    h.add("a", [2, 3, 4], sampling())
    h.pipeline_step()  # prompt + 7; steps 2 (computes 7, samples eos) and 3 (ahead) in flight
    outputs = h.pipeline_step()
    assert outputs is not None and [o.new_token_ids for o in outputs] == [[1]] and outputs[0].finished
    assert h.finals["a", 0].finish_reason == STOP and h.finals["a", 0].num_output_tokens == 2
    # Step 3 still computes position 4 (the eos) and samples a token nobody gets.
    manager = h.scheduler.block_manager
    assert len(h.in_flight) == 1 and manager.num_free_blocks < manager.num_total_blocks
    assert h.pipeline_step() == []
    assert manager.num_free_blocks == manager.num_total_blocks
    assert h.num_dropped_tokens == 1 and h.scheduler.stats().num_generation_tokens == 2
    h.drain()
    assert h.tokens["a", 0] == [7, 1]


def test_length_limits_are_not_run_ahead() -> None:
    h = Harness(num_blocks=16, block_size=4, max_model_len=6)
    h.add("short", [2, 3, 4], sampling(max_tokens=2, ignore_eos=True))
    h.add("long", [5, 6, 7], sampling(ignore_eos=True))  # stops at max_model_len 6
    h.drain()
    assert h.num_dropped_tokens == 0
    assert [len(h.tokens[r, 0]) for r in ("short", "long")] == [2, 3]
    # No step computes the last token of either: nothing would read its KV.
    computed = {}
    for step in h.steps:
        for new in step.new_sequences:
            computed[new.seq_id] = new.num_computed_tokens
        for item in step.scheduled:
            computed[item.seq_id] += item.num_new_tokens
    assert sorted(computed.values()) == [4, 5]


def test_abort_while_two_steps_run_keeps_the_blocks_until_both_return() -> None:
    h = Harness(num_blocks=16, block_size=2)
    h.add("a", [2, 3, 4], sampling(max_tokens=9, ignore_eos=True))
    h.add("b", [5, 6], sampling(max_tokens=3, ignore_eos=True))
    h.schedule()
    h.schedule()
    manager = h.scheduler.block_manager
    free_before = manager.num_free_blocks
    [out] = h.abort("a") or []
    assert out.finish_reason == ABORT and out.new_token_ids == [] and out.num_output_tokens == 0
    assert manager.num_free_blocks == free_before  # both steps still use a's blocks
    h.finish_step()
    assert manager.num_free_blocks == free_before
    h.finish_step()
    assert manager.num_free_blocks == free_before + 2
    h.drain()
    assert h.tokens["a", 0] == [] and h.num_dropped_tokens == 2
    assert h.tokens["b", 0] == reference_output([5, 6], sampling(max_tokens=3, ignore_eos=True), 1024)[0]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_victim_in_a_step_in_flight_makes_room_once_that_step_returns(mode: str) -> None:
    params = sampling(max_tokens=5, ignore_eos=True)
    h = Harness(num_blocks=4, block_size=2, num_cpu_blocks=4, preemption_mode=mode)
    h.add("old", [2, 3, 4], params)
    h.add("new", [5, 6], params)
    h.drain()
    stats = h.scheduler.stats()
    assert stats.num_preemptions == 1
    assert (stats.num_preemptions_swap == 1) == (mode == "swap")
    # Steps 1 and 2 fill the pool. Planning step 3, "old" needs a third block: "new" is
    # preempted, but step 2 still computes it, so "old" waits for step 2 to return (rather
    # than preempting itself too) and step 3 carries "new"'s eviction.
    third = h.steps[2]
    assert list(third.finished_seq_ids) == [2] and [s.seq_id for s in third.scheduled] == [1]
    assert len(third.scheduled[0].new_block_ids) == 1
    assert len(third.swap_out) == (2 if mode == "swap" else 0)
    for request_id, prompt in (("old", [2, 3, 4]), ("new", [5, 6])):
        assert h.tokens[request_id, 0] == reference_output(prompt, params, 8)[0]


def test_a_fork_waits_for_its_first_sample() -> None:
    params = sampling(max_tokens=3, ignore_eos=True, n=3)
    h = Harness(num_blocks=32, block_size=4)
    h.add("a", [3, 4, 5, 6, 7], params)
    assert h.schedule() is not None
    assert h.schedule() is None  # nothing to run ahead: the sample decides the completions
    outputs = h.finish_step()
    assert sorted(o.index for o in outputs) == [0, 1, 2]
    h.drain()
    for index in range(3):
        assert h.tokens["a", index] == reference_output([3, 4, 5, 6, 7], params, 1024, index=index)[0]


@pytest.mark.parametrize("mode", [PreemptionMode.RECOMPUTE, PreemptionMode.SWAP])
def test_preempted_while_its_sample_is_in_flight(mode: PreemptionMode) -> None:
    """The token comes back to the preempted sequence, which resumes only then; one about
    to fork is recomputed (CPU blocks are not shared) and its completions start over."""
    single, forking = sampling(max_tokens=4, ignore_eos=True), sampling(max_tokens=3, ignore_eos=True, n=2)
    h = Harness(num_blocks=32, block_size=4, num_cpu_blocks=16)
    h.add("single", [2, 3, 4, 5, 6], single)
    h.add("forking", [7, 8, 9], forking)
    h.schedule()
    for sequence in list(h.scheduler.running):
        h.scheduler.preempt(sequence, mode)
    assert h.schedule() is None  # neither resumes before its token is back
    outputs = h.finish_step()
    assert sorted((o.request_id, o.index) for o in outputs) == [("forking", 0), ("forking", 1), ("single", 0)]
    h.check()
    h.drain()
    assert h.tokens["single", 0] == reference_output([2, 3, 4, 5, 6], single, 1024)[0]
    for index in range(2):
        assert h.tokens["forking", index] == reference_output([7, 8, 9], forking, 1024, index=index)[0]
    stats = h.scheduler.stats()
    assert (stats.num_preemptions_swap, stats.num_preemptions_recompute) == (
        (1, 1) if mode is PreemptionMode.SWAP else (0, 2)
    )


def test_without_overlap_one_step_is_in_flight() -> None:
    h = Harness(num_blocks=16, block_size=4, overlap=False)
    h.add("a", [2, 3, 4], sampling(max_tokens=4, ignore_eos=True))
    h.drain()
    assert h.scheduler.max_steps_in_flight == 1 and h.num_ran_ahead == 0
    assert [len(s.scheduled) for s in h.steps] == [1] * 4
