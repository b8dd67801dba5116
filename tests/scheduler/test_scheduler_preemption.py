"""Preemption by swap, priorities (admission order and victims), the waiting-queue limit,
and seeds drawn once per request."""

import pytest

from services.common.errors import ResourceExhaustedError
from tests.support.fake_worker import reference_output
from tests.support.scheduler_harness import Harness, sampling

PARAMS = sampling(max_tokens=5, ignore_eos=True)


def _tight_pool(mode: str, num_cpu_blocks: int) -> Harness:
    # Two requests outgrow a 4-block pool of 2-token blocks together, each fits alone.
    h = Harness(num_blocks=4, block_size=2, num_cpu_blocks=num_cpu_blocks, preemption_mode=mode)
    h.add("old", [2, 3, 4], PARAMS)
    h.add("new", [5, 6], PARAMS)
    return h


def test_swap_moves_the_victims_kv_out_and_back_unchanged() -> None:
    h = _tight_pool("swap", num_cpu_blocks=4)
    events = []
    h.scheduler.on_event = events.append
    h.step()
    h.step()
    h.step()  # old needs a 3rd block for token 5: new is swapped out
    stats = h.scheduler.stats()
    assert (stats.num_preemptions_swap, stats.num_preemptions_recompute, stats.num_swapped) == (1, 0, 1)
    assert stats.num_free_cpu_blocks == 2
    [victim] = h.scheduler.swapped
    assert victim.request_id == "new" and victim.num_computed_tokens == 3
    # The copy out travels with the step that preempted, applied before it computes.
    assert len(h.steps[-1].swap_out) == 2 and list(h.steps[-1].finished_seq_ids) == [2]
    h.drain()
    swap_in_step = next(s for s in h.steps if s.swap_in)
    resumed = next(n for n in swap_in_step.new_sequences if n.token_ids[:2] == [5, 6])
    assert resumed.num_computed_tokens == 3  # only the last sampled token is computed again
    for request_id, prompt in (("old", [2, 3, 4]), ("new", [5, 6])):
        assert h.tokens[request_id, 0] == reference_output(prompt, PARAMS, 8)[0]
    # What the victim's trace tells: out with its 3 computed tokens, back in with them.
    told = [
        (
            e.request_id,
            e.name,
            e.attributes.get("pagedserve.preemption_mode"),
            e.attributes["pagedserve.num_computed_tokens"],
        )
        for e in events
    ]
    assert told == [("new", "preempted", "swap", 3), ("new", "swapped_in", None, 3)]


def test_swap_falls_back_to_recompute_when_the_cpu_pool_is_full() -> None:
    h = _tight_pool("swap", num_cpu_blocks=1)
    events = []
    h.scheduler.on_event = events.append
    h.drain()
    stats = h.scheduler.stats()
    assert stats.num_preemptions_swap == 0 and stats.num_preemptions_recompute >= 1
    modes = [e.attributes["pagedserve.preemption_mode"] for e in events if e.name == "preempted"]
    assert modes == ["recompute"] * stats.num_preemptions_recompute
    assert h.tokens["new", 0] == reference_output([5, 6], PARAMS, 8)[0]


def test_swapped_requests_resume_before_newcomers_are_admitted() -> None:
    h = _tight_pool("swap", num_cpu_blocks=4)
    for _ in range(3):
        h.step()
    assert h.scheduler.swapped
    h.add("late", [7, 8], PARAMS)
    h.drain()
    introduced = [n.token_ids[:2] for s in h.steps[3:] for n in s.new_sequences]
    assert introduced.index([5, 6]) < introduced.index([7, 8])
    assert next(s for s in h.steps if s.swap_in).new_sequences[0].token_ids[:2] == [5, 6]


def test_priority_orders_admission_and_fcfs_breaks_ties() -> None:
    h = Harness(num_blocks=64, block_size=4, max_num_seqs=1)
    prompts = {"low": [2, 10], "high-1": [2, 11], "mid": [2, 12], "high-2": [2, 13]}
    for request_id, priority in (("low", 2), ("high-1", 0), ("mid", 1), ("high-2", 0)):
        h.add(request_id, prompts[request_id], sampling(max_tokens=1), priority)
    h.drain()
    by_prompt = {tuple(p): request_id for request_id, p in prompts.items()}
    admitted = [by_prompt[tuple(n.token_ids)] for s in h.steps for n in s.new_sequences]
    assert admitted == ["high-1", "high-2", "mid", "low"]


def test_the_victim_is_the_lowest_priority_then_latest_running_request() -> None:
    h = Harness(num_blocks=6, block_size=2)
    h.add("urgent-late", [2, 3, 4], PARAMS, priority=0)
    h.add("lazy-early", [5, 6], PARAMS, priority=5)
    h.add("normal", [7, 8], PARAMS, priority=1)
    assert [s.request_id for s in h.scheduler.waiting] == ["urgent-late", "normal", "lazy-early"]
    while not h.scheduler.stats().num_preemptions:
        h.step()
    assert [s.request_id for s in h.scheduler.waiting] == ["lazy-early"]
    h.drain()
    for request_id, prompt in (("urgent-late", [2, 3, 4]), ("lazy-early", [5, 6]), ("normal", [7, 8])):
        assert h.tokens[request_id, 0] == reference_output(prompt, PARAMS, 12)[0]


def test_past_the_waiting_limit_requests_are_refused_until_the_queue_drains() -> None:
    h = Harness(num_blocks=64, block_size=4, max_num_seqs=1, max_waiting_requests=2)
    h.add("a", [2, 3], PARAMS)  # takes the one seat at the next step: it does not wait
    h.add("b", [2, 3], PARAMS)
    h.add("c", [2, 3], PARAMS)
    with pytest.raises(ResourceExhaustedError, match=r"2 requests already wait .*max_waiting_requests 2"):
        h.add("d", [2, 3], PARAMS)
    assert "d" not in h.scheduler.requests
    h.step()  # a is admitted; b and c still wait
    with pytest.raises(ResourceExhaustedError):
        h.add("d", [2, 3], PARAMS)
    h.drain()
    h.add("d", [2, 3], PARAMS)
    h.drain()


def test_a_burst_that_fits_the_free_seats_is_not_refused() -> None:
    # Two requests run; a burst of 14 fits the 14 free seats, however few may wait.
    h = Harness(num_blocks=256, block_size=4, max_num_seqs=16, max_waiting_requests=2)
    h.add("running-0", [2, 3], PARAMS)
    h.add("running-1", [2, 3], PARAMS)
    h.step()
    for index in range(14):
        h.add(f"burst-{index}", [4, 5, 6], PARAMS)
    h.add("waits-0", [4, 5], PARAMS)
    h.add("waits-1", [4, 5], PARAMS)
    with pytest.raises(ResourceExhaustedError):
        h.add("refused", [4, 5], PARAMS)
    h.drain()
    assert len(h.finished_requests) == 18


def test_requests_that_wait_for_blocks_count_against_the_limit() -> None:
    # Seats are free, but the pool holds one 9-token prompt at a time.
    h = Harness(num_blocks=4, block_size=4, max_num_seqs=8, max_waiting_requests=1)
    h.add("first", [2] * 9, PARAMS)
    h.add("waits", [3] * 9, PARAMS)
    with pytest.raises(ResourceExhaustedError):
        h.add("refused", [4] * 9, PARAMS)
    h.drain()
    assert h.finished_requests == {"first", "waits"}


def test_a_request_without_a_seed_keeps_the_one_it_was_given() -> None:
    h = Harness(num_blocks=64, block_size=2)
    h.add("a", [2, 3, 4], PARAMS)
    h.add("b", [2, 3, 4], PARAMS)
    h.step()
    first, second = h.steps[0].new_sequences
    assert first.sampling.seed != second.sampling.seed
    h.preempt(1, h.config.preemption_mode)
    h.drain()
    readmitted = [n for s in h.steps[1:] for n in s.new_sequences]
    assert readmitted and all(n.sampling.seed == second.sampling.seed for n in readmitted)
