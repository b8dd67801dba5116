"""The load an engine reports to the frontends that route to it: its queues, its free
blocks, and keys of its cached blocks that a frontend computes the same from a prompt."""

import asyncio

from pagedserve.v1 import scheduler_pb2

from services.common.block_hash import chained_hashes, routing_key
from services.scheduler.load_report import engine_load, load_reports
from services.tokenizer.routing import matched_blocks
from tests.support.scheduler_harness import Harness, sampling

PROMPT = list(range(3, 3 + 4 * 3 + 2))  # three full blocks of 4, and two tokens more


def test_a_served_prompt_is_found_cached_by_the_frontends_keys() -> None:
    h = Harness(num_blocks=32, block_size=4)
    assert engine_load(h.scheduler, serving=True).cached_block_keys == []
    h.add("first", PROMPT, sampling(max_tokens=3, ignore_eos=True))
    h.step()
    running = engine_load(h.scheduler, serving=True)
    assert (running.num_running, running.num_waiting, running.block_size) == (1, 0, 4)
    assert running.num_free_blocks < running.num_total_blocks == 32
    h.drain()
    report = engine_load(h.scheduler, serving=True)
    prompt_keys = [routing_key(block_hash) for block_hash in chained_hashes(PROMPT + [0], 4)]
    assert matched_blocks(prompt_keys, frozenset(report.cached_block_keys)) == 3
    other_keys = [routing_key(block_hash) for block_hash in chained_hashes([99, *PROMPT], 4)]
    assert matched_blocks(other_keys, frozenset(report.cached_block_keys)) == 0


def test_reports_come_when_the_load_changes_and_end_with_not_serving() -> None:
    """Each call of `current` sees the next state; unchanged ones send nothing."""
    states = iter([0, 1, 1, 1, 2, 2])

    async def collect() -> list[tuple[int, bool]]:
        stopped = asyncio.Event()

        def current() -> scheduler_pb2.EngineLoad:
            running = next(states, None)
            if running is None:
                stopped.set()
                return engine_load(None, serving=False)
            return scheduler_pb2.EngineLoad(serving=True, num_running=running)

        reports = load_reports(current, 0.001, stopped)
        return [(report.num_running, report.serving) async for report in reports]

    assert asyncio.run(asyncio.wait_for(collect(), 10)) == [(0, True), (1, True), (2, True), (0, False)]
