"""The load an engine reports to the frontends that route to it: its queues, its free
blocks, and keys of its cached blocks that a frontend computes the same from a prompt,
whole in a stream's first report and as changes after."""

import asyncio

from pagedserve.v1 import scheduler_pb2

from services.common.block_hash import chained_hashes, routing_key
from services.scheduler.cached_keys import CachedKeys
from services.scheduler.load_report import engine_load, load_reports
from services.tokenizer.routing import matched_blocks
from tests.support.scheduler_harness import Harness, sampling

PROMPT = list(range(3, 3 + 4 * 3 + 2))  # three full blocks of 4, and two tokens more


def _apply(keys: set[int], report: scheduler_pb2.EngineLoad) -> set[int]:
    """What a frontend's view becomes after a report (services/tokenizer/engine_client.py)."""
    if not report.cached_keys_changed:
        return set(report.cached_block_keys)
    return (keys - set(report.removed_block_keys)) | set(report.cached_block_keys)


def test_a_served_prompt_is_found_cached_by_the_frontends_keys() -> None:
    h = Harness(num_blocks=32, block_size=4)
    first, seen = engine_load(h.scheduler, serving=True)
    assert first.cached_block_keys == [] and not first.cached_keys_changed
    h.add("first", PROMPT, sampling(max_tokens=3, ignore_eos=True))
    h.step()
    running, _ = engine_load(h.scheduler, serving=True)
    assert (running.num_running, running.num_waiting, running.block_size) == (1, 0, 4)
    assert running.num_free_blocks < running.num_total_blocks == 32
    h.drain()
    report, _ = engine_load(h.scheduler, serving=True)
    prompt_keys = [routing_key(block_hash) for block_hash in chained_hashes(PROMPT + [0], 4)]
    assert matched_blocks(prompt_keys, frozenset(report.cached_block_keys)) == 3
    other_keys = [routing_key(block_hash) for block_hash in chained_hashes([99, *PROMPT], 4)]
    assert matched_blocks(other_keys, frozenset(report.cached_block_keys)) == 0
    # After the first report, only what changed: the prompt's three blocks.
    changes, _ = engine_load(h.scheduler, serving=True, seen=seen)
    assert changes.cached_keys_changed and not changes.removed_block_keys
    assert sorted(changes.cached_block_keys) == sorted(report.cached_block_keys)


def test_a_frontend_applying_the_changes_holds_the_engines_keys_through_evictions() -> None:
    """A pool too small for every prompt: later prompts evict earlier ones' blocks."""
    h = Harness(num_blocks=12, block_size=4)
    view, seen = set(), None
    for i in range(8):
        h.add(f"r{i}", [100 * i + t for t in range(17)], sampling(max_tokens=2, ignore_eos=True))
        h.drain()
        report, seen = engine_load(h.scheduler, serving=True, seen=seen)
        view = _apply(view, report)
        whole, _ = h.scheduler.block_manager.cached_keys.snapshot()
        assert view == set(whole) and len(whole) <= 12
        assert report.cached_keys_changed == (i > 0)
    assert report.removed_block_keys, "the last prompts evicted earlier ones"


def test_changes_are_kept_while_readers_may_need_them() -> None:
    keys = CachedKeys(min_kept_changes=4)
    start = keys.snapshot()[1]
    for key in range(3):
        keys.add(key)
    keys.add(1)  # a second hash with the same key: no change
    keys.remove(1)
    assert keys.changes_since(start) == ([0, 1, 2], [], keys.snapshot()[1])
    middle = keys.snapshot()[1]
    keys.remove(2)
    keys.add(7)
    keys.remove(7)
    assert keys.changes_since(middle)[:2] == ([], [2, 7])
    # Far more changes than keys: a reader that far behind gets the whole set instead.
    for _ in range(10):
        keys.add(9)
        keys.remove(9)
    assert keys.changes_since(start) is None and keys.changes_since(middle) is None
    assert sorted(keys.snapshot()[0]) == [0, 1]
    # A cleared cache and another journal send their readers to a snapshot too.
    recent = keys.snapshot()[1]
    keys.clear()
    assert keys.changes_since(recent) is None and len(keys) == 0
    assert CachedKeys().changes_since(keys.snapshot()[1]) is None


def test_reports_come_when_the_load_changes_and_end_with_not_serving() -> None:
    """Each call of `current` sees the next state; unchanged ones send nothing."""
    states = iter([0, 1, 1, 1, 2, 2])

    async def collect() -> list[tuple[int, bool]]:
        stopped = asyncio.Event()

        def current(seen):
            running = next(states, None)
            if running is None:
                stopped.set()
                return engine_load(None, serving=False)
            report = scheduler_pb2.EngineLoad(
                serving=True, num_running=running, cached_keys_changed=seen is not None
            )
            return report, "cursor"

        reports = load_reports(current, 0.001, stopped)
        return [(report.num_running, report.serving) async for report in reports]

    assert asyncio.run(asyncio.wait_for(collect(), 10)) == [(0, True), (1, True), (2, True), (0, False)]
