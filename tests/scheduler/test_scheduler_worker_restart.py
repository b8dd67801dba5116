"""A worker that restarts mid-generation (its KV, its swap pool and the steps in flight
are gone): the scheduler keeps every request, recomputes each from its tokens on a fresh
worker stream, and every completion comes out as in an undisturbed run."""

from collections import deque

import pytest

from tests.support.fake_worker import FakeWorker
from tests.support.scheduler_harness import Harness, sampling

PROMPT_PREFIX = [7, 8, 9, 10, 11, 12, 13, 14]


def _add_requests(h: Harness) -> None:
    # A shared prefix (prefix-cache hits), a long prompt prefilled in chunks, parallel
    # sampling (forked completions) and a request that stops on its own.
    h.add("shared-a", [*PROMPT_PREFIX, 1, 2], sampling(max_tokens=12, ignore_eos=True))
    h.add("shared-b", [*PROMPT_PREFIX, 3], sampling(max_tokens=9, ignore_eos=True))
    h.add("long", [(5 * i) % 90 + 2 for i in range(40)], sampling(max_tokens=6, ignore_eos=True))
    h.add("forked", [4, 5, 6], sampling(max_tokens=7, ignore_eos=True, n=3))
    h.add("stops", [20, 21, 22], sampling(max_tokens=30))


def _harness(preemption_mode: str) -> Harness:
    return Harness(
        num_blocks=24,
        block_size=4,
        max_num_batched_tokens=16,
        num_cpu_blocks=24,
        preemption_mode=preemption_mode,
    )


def _restart_worker(h: Harness) -> None:
    h.scheduler.restart_worker_stream()
    h.worker = FakeWorker(24, 4, 24)
    h.in_flight, h.blocks_of_step = deque(), {}
    h.check()


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
@pytest.mark.parametrize("steps_before", [1, 3, 6, 12])
def test_requests_survive_a_worker_restart_with_the_same_tokens(
    preemption_mode: str, steps_before: int
) -> None:
    undisturbed = _harness(preemption_mode)
    _add_requests(undisturbed)
    undisturbed.drain()

    h = _harness(preemption_mode)
    _add_requests(h)
    for _ in range(steps_before):
        h.pipeline_step()
    # Preempt one sequence (swapped out to the pool in swap mode) so that every queue
    # holds something when the worker goes.
    h.preempt(-1, h.config.preemption_mode)
    h.schedule()  # a step in flight is lost with the worker
    before = {key: list(tokens) for key, tokens in h.tokens.items()}
    _restart_worker(h)
    stats = h.scheduler.stats()
    assert stats.num_running == stats.num_swapped == 0
    assert stats.num_free_blocks == 24 and stats.num_free_cpu_blocks == 24
    assert not h.scheduler.block_manager.cached_blocks, "the restarted worker holds no KV"

    h.drain()
    assert h.steps[-1].step_id < len(h.steps), "the new stream numbered its steps from 1"
    assert h.tokens == undisturbed.tokens
    assert all(h.tokens[key][: len(tokens)] == tokens for key, tokens in before.items())
    assert {key: out.finish_reason for key, out in h.finals.items()} == {
        key: out.finish_reason for key, out in undisturbed.finals.items()
    }


def test_a_second_restart_before_any_step_changes_nothing() -> None:
    h = _harness("recompute")
    _add_requests(h)
    h.pipeline_step()
    _restart_worker(h)
    _restart_worker(h)
    h.drain()
    assert all(out.finish_reason for out in h.finals.values())
