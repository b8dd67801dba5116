"""The prefix cache as the scheduler uses it: hits start a request with its leading blocks
computed, only computed blocks are offered, freed blocks stay cached until the pool needs
them, and caching never changes a request's tokens."""

from services.common.block_hash import chained_hashes
from tests.support.fake_worker import reference_output
from tests.support.scheduler_harness import Harness, sampling

SHARED = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # three blocks of 4
PARAMS = sampling(max_tokens=3, ignore_eos=True)


def test_a_later_request_starts_past_the_cached_blocks_it_shares() -> None:
    h = Harness(num_blocks=32, block_size=4)
    events = []
    h.scheduler.on_event = events.append
    h.add("first", SHARED + [20, 21], PARAMS)
    h.drain()
    first_blocks = list(h.steps[0].scheduled[0].new_block_ids)

    h.add("second", SHARED + [22], PARAMS)
    h.step()
    [new] = h.steps[-1].new_sequences
    [item] = h.steps[-1].scheduled
    assert new.num_computed_tokens == 12 and item.num_new_tokens == 1
    assert list(item.new_block_ids[:3]) == first_blocks[:3]
    h.drain()
    assert h.finals["second", 0].num_cached_tokens == 12
    assert h.tokens["second", 0] == reference_output(SHARED + [22], PARAMS, 1024)[0]
    stats = h.scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (14 + 13, 12)
    # The hit is told once, for the request that had it, for its trace.
    assert [(e.request_id, e.name, e.attributes["pagedserve.cached_tokens"]) for e in events] == [
        ("second", "prefix_cache_hit", 12)
    ]


def test_a_whole_prompt_hit_still_computes_its_last_token() -> None:
    h = Harness(num_blocks=32, block_size=4)
    h.add("first", SHARED, PARAMS)
    h.drain()
    h.add("again", SHARED, PARAMS)
    h.step()
    [new] = h.steps[-1].new_sequences
    # 12 tokens are 3 full blocks, but the worker needs one token to compute for logits.
    assert new.num_computed_tokens == 8 and h.steps[-1].scheduled[0].num_new_tokens == 4
    h.drain()
    assert h.tokens["again", 0] == h.tokens["first", 0]


def test_blocks_are_offered_only_once_computed() -> None:
    # The first prompt is prefilled in chunks of 4: after one step only its first block
    # has KV, and a request arriving then may share only that one.
    h = Harness(num_blocks=32, block_size=4, max_num_batched_tokens=4)
    h.add("chunked", SHARED + [20], PARAMS)
    h.step()
    assert len(h.scheduler.block_manager.cached_blocks) == 1
    h.add("follower", SHARED + [21], PARAMS)
    scheduled = h.schedule()
    assert scheduled is not None and not scheduled.new_sequences  # the budget went to the first
    h.finish_step(scheduled)
    h.drain()
    followers = [n for s in h.steps for n in s.new_sequences if n.token_ids[-1] == 21]
    assert followers and followers[0].num_computed_tokens >= 4


def test_same_step_twins_share_nothing_and_the_cache_keeps_one_copy() -> None:
    h = Harness(num_blocks=32, block_size=4)
    h.add("a", SHARED + [20], PARAMS)
    h.add("b", SHARED + [21], PARAMS)
    h.step()
    assert [n.num_computed_tokens for n in h.steps[0].new_sequences] == [0, 0]
    assert len(h.scheduler.block_manager.cached_blocks) == 3
    h.drain()
    assert h.tokens["b", 0] == reference_output(SHARED + [21], PARAMS, 1024)[0]


def test_freed_blocks_stay_cached_until_the_pool_needs_them() -> None:
    h = Harness(num_blocks=8, block_size=4)
    h.add("first", SHARED + [20], sampling(max_tokens=1))
    h.drain()
    manager = h.scheduler.block_manager
    first_hashes = chained_hashes(SHARED, 4)
    assert manager.num_free_blocks == 8 and set(manager.cached_blocks) == set(first_hashes)
    # A stranger takes never-cached blocks first: the cache survives it.
    h.add("stranger", [30] * 14, sampling(max_tokens=1))
    h.drain()
    assert set(first_hashes) <= set(manager.cached_blocks)
    # One that needs the whole pool evicts them.
    h.add("big", [31] * 31, sampling(max_tokens=1))
    h.drain()
    assert not set(first_hashes) & set(manager.cached_blocks)


def test_prefix_caching_off_computes_everything() -> None:
    h = Harness(num_blocks=32, block_size=4, enable_prefix_caching=False)
    for name in ("a", "b"):
        h.add(name, SHARED + [20], PARAMS)
        h.drain()
    assert all(n.num_computed_tokens == 0 for s in h.steps for n in s.new_sequences)
    stats = h.scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0)
    assert not h.scheduler.block_manager.cached_blocks
    assert h.finals["b", 0].num_cached_tokens == 0


def test_a_recomputed_request_finds_its_own_blocks_again() -> None:
    h = Harness(num_blocks=32, block_size=4)
    h.add("a", SHARED + [20], sampling(max_tokens=6, ignore_eos=True))
    h.step()
    h.preempt(0, h.config.preemption_mode)
    h.step()
    readmitted = h.steps[-1].new_sequences[0]
    assert readmitted.num_computed_tokens == 12
    h.drain()
    assert (
        h.tokens["a", 0] == reference_output(SHARED + [20], sampling(max_tokens=6, ignore_eos=True), 1024)[0]
    )
    # cached_tokens counts the first admission's hits only.
    assert h.finals["a", 0].num_cached_tokens == 0
