from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.common.block_hash import chained_hashes, hash_block, routing_key
from services.scheduler.block_manager import FREED_BLOCK, BlockManager, SlotAllocation, cdiv, num_freed_blocks


@dataclass
class Seq:
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)


def _allocate(manager: BlockManager, seq: Seq, num_tokens: int) -> list[int] | None:
    allocation = manager.allocate_slots(seq, num_tokens)
    return None if allocation is None else list(allocation.new_block_ids)


def test_fresh_pool_is_all_free() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    assert manager.num_total_blocks == 8
    assert manager.num_free_blocks == 8
    assert sorted(manager.free_block_ids) == list(range(8))
    assert all(manager.ref_count(b) == 0 for b in range(8))
    assert manager.cached_blocks == {}


def test_allocate_rounds_up_to_whole_blocks() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = Seq()
    new_blocks = _allocate(manager, seq, 5)
    assert new_blocks is not None and len(new_blocks) == 2
    assert seq.block_table == new_blocks
    assert manager.num_free_blocks == 6
    assert all(manager.ref_count(b) == 1 for b in new_blocks)


def test_allocate_reuses_room_left_in_the_last_block() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = Seq()
    assert _allocate(manager, seq, 5) is not None
    seq.num_computed_tokens = 5
    # Tokens 6..8 still fit the second block.
    assert _allocate(manager, seq, 3) == []
    # Token 9 opens a third.
    assert len(_allocate(manager, seq, 4) or []) == 1
    assert len(seq.block_table) == 3


def test_allocate_too_many_allocates_nothing() -> None:
    manager = BlockManager(num_blocks=3, block_size=2)
    holder, seq = Seq(), Seq()
    assert _allocate(manager, holder, 4) is not None
    assert _allocate(manager, seq, 3) is None
    assert seq.block_table == []
    assert manager.num_free_blocks == 1
    assert _allocate(manager, seq, 2) is not None
    assert manager.num_free_blocks == 0


def test_free_returns_every_block_and_empties_the_table() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    seq = Seq()
    blocks = _allocate(manager, seq, 7)
    assert blocks is not None and len(blocks) == 4
    manager.free(seq)
    assert seq.block_table == []
    assert manager.num_free_blocks == 4
    assert all(manager.ref_count(b) == 0 for b in range(4))


def test_forked_blocks_stay_in_use_until_the_last_holder_frees_them() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    parent = Seq()
    blocks = _allocate(manager, parent, 3)
    assert blocks is not None
    child = Seq(num_computed_tokens=3)
    parent.num_computed_tokens = 3
    manager.fork(parent, child)
    assert child.block_table == blocks and [manager.ref_count(b) for b in blocks] == [2, 2]
    manager.free(parent)
    assert [manager.ref_count(b) for b in blocks] == [1, 1]
    assert not set(blocks) & set(manager.free_block_ids)
    manager.free(child)
    assert manager.num_free_blocks == 4


def test_writing_into_a_shared_block_copies_it_first() -> None:
    manager = BlockManager(num_blocks=6, block_size=4)
    parent = Seq()
    full, partial = _allocate(manager, parent, 6) or []
    parent.num_computed_tokens = 6
    child = Seq(num_computed_tokens=6)
    manager.fork(parent, child)
    allocation = manager.allocate_slots(child, 1)
    assert allocation is not None and allocation.new_block_ids == ()
    [(source, copy)] = allocation.copies
    assert source == partial and child.block_table == [full, copy]
    assert (manager.ref_count(full), manager.ref_count(partial), manager.ref_count(copy)) == (2, 1, 1)
    # The parent now owns its partial block alone and writes into it without a copy.
    assert manager.allocate_slots(parent, 1) == SlotAllocation(new_block_ids=(), copies=())


def test_a_copy_needs_a_free_block() -> None:
    manager = BlockManager(num_blocks=2, block_size=4)
    parent = Seq()
    _allocate(manager, parent, 6)
    parent.num_computed_tokens = 6
    child = Seq(num_computed_tokens=6)
    manager.fork(parent, child)
    assert manager.allocate_slots(child, 1) is None
    assert [manager.ref_count(b) for b in parent.block_table] == [2, 2]


def test_cached_blocks_are_found_shared_and_evicted_last() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    tokens = [5, 6, 7, 8, 9]
    first = Seq()
    _allocate(manager, first, 5)
    first.num_computed_tokens = 5
    hashes = chained_hashes(tokens, 2)
    manager.cache_full_blocks(first.block_table[:2], hashes)
    assert manager.cached_prefix(hashes) == first.block_table[:2]
    assert manager.cached_prefix([hash_block(None, [1, 2])]) == []
    cached = first.block_table[:2]
    manager.free(first)
    assert manager.num_free_blocks == 4 and manager.cached_prefix(hashes) == cached

    # A hit takes a free cached block out of the free list.
    second = Seq()
    allocation = manager.allocate_slots(second, 1, cached_blocks=cached)
    assert allocation is not None and second.block_table[:2] == cached
    assert [manager.ref_count(b) for b in cached] == [1, 1] and manager.num_free_blocks == 1
    manager.free(second)

    # Never-cached blocks go first; the cached ones only when nothing else is left.
    stranger = Seq()
    _allocate(manager, stranger, 4)
    assert not set(stranger.block_table) & set(cached)
    assert manager.cached_prefix(hashes) == cached
    _allocate(manager, Seq(), 4)
    assert manager.cached_blocks == {}


def test_the_same_tokens_computed_twice_are_cached_once() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    a, b = Seq(num_computed_tokens=0), Seq()
    _allocate(manager, a, 2)
    _allocate(manager, b, 2)
    hashes = chained_hashes([1, 2], 2)
    manager.cache_full_blocks(a.block_table, hashes)
    manager.cache_full_blocks(b.block_table, hashes)
    assert manager.cached_blocks == {hashes[0]: a.block_table[0]}
    manager.free(b)
    manager.free(a)
    assert manager.num_free_blocks == 4


def test_reset_prefix_cache_forgets_every_hash() -> None:
    manager = BlockManager(num_blocks=2, block_size=1)
    seq = Seq()
    _allocate(manager, seq, 2)
    manager.cache_full_blocks(seq.block_table, chained_hashes([3, 4], 1))
    manager.free(seq)
    manager.reset_prefix_cache()
    assert manager.cached_blocks == {} and manager.num_free_blocks == 2


def test_double_free_is_caught() -> None:
    manager = BlockManager(num_blocks=2, block_size=2)
    seq = Seq()
    _allocate(manager, seq, 2)
    stale = Seq(block_table=list(seq.block_table))
    manager.free(seq)
    with pytest.raises(AssertionError):
        manager.free(stale)


def test_rejects_empty_pool() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=16)


def test_hash_chains_over_the_whole_prefix() -> None:
    # Equal blocks after different prefixes differ; the same prefix gives the same chain.
    assert chained_hashes([1, 2, 3, 4], 2)[1] != chained_hashes([9, 9, 3, 4], 2)[1]
    assert chained_hashes([1, 2, 3, 4, 5], 2) == chained_hashes([1, 2, 3, 4], 2)
    assert hash_block(None, [1, 2]) != hash_block(0, [1, 2])


class BlockManagerMachine(RuleBasedStateMachine):
    """Sequences as the scheduler drives them: grow (computing what they were given),
    fork, take cache hits, drop blocks before a sliding window, free. The books must hold
    after every operation:

    - free blocks are exactly the blocks with ref count 0, listed once;
    - a block's ref count is the number of tables holding it (the cache holds none);
    - every block a sequence is about to write is held by it alone;
    - every cached hash maps to a full block whose recorded tokens produce that hash;
    - a frontend applying the published key changes holds the cache's keys.
    """

    BLOCK_SIZE = 2

    def __init__(self) -> None:
        super().__init__()
        self.manager = BlockManager(num_blocks=8, block_size=self.BLOCK_SIZE)
        # A frontend's view of the cache's keys, built from the changes published.
        self.keys_seen: set[int] = set()
        self.keys_cursor = self.manager.cached_keys.snapshot()[1]
        self.seqs: list[tuple[Seq, list[int]]] = []  # (sequence, its tokens)
        # What each block holds, as the tokens of its whole prefix: a stand-in for KV.
        self.contents: dict[int, tuple[int, ...]] = {}

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=9))
    def add(self, tokens: list[int]) -> None:
        seq = Seq()
        num_blocks = (len(tokens) - 1) // self.BLOCK_SIZE
        hits = self.manager.cached_prefix(chained_hashes(tokens, self.BLOCK_SIZE)[:num_blocks])
        allocation = self.manager.allocate_slots(seq, len(tokens) - len(hits) * self.BLOCK_SIZE, hits)
        if allocation is None:
            return
        self._write(seq, tokens, len(hits) * self.BLOCK_SIZE, allocation)
        self.seqs.append((seq, tokens))

    @precondition(lambda self: self.seqs)
    @rule(which=st.integers(0, 20), new_tokens=st.lists(st.integers(0, 3), min_size=1, max_size=4))
    def grow(self, which: int, new_tokens: list[int]) -> None:
        seq, tokens = self.seqs[which % len(self.seqs)]
        allocation = self.manager.allocate_slots(seq, len(new_tokens))
        if allocation is not None:
            start = seq.num_computed_tokens
            tokens.extend(new_tokens)
            self._write(seq, tokens, start, allocation)

    @precondition(lambda self: self.seqs)
    @rule(which=st.integers(0, 20))
    def fork(self, which: int) -> None:
        parent, tokens = self.seqs[which % len(self.seqs)]
        child = Seq(num_computed_tokens=parent.num_computed_tokens)
        self.manager.fork(parent, child)
        self.seqs.append((child, list(tokens)))

    @precondition(lambda self: self.seqs)
    @rule(which=st.integers(0, 20), num_blocks=st.integers(1, 4))
    def drop(self, which: int, num_blocks: int) -> None:
        # Never the block the sequence writes next: a window holds at least its newest token.
        seq, _ = self.seqs[which % len(self.seqs)]
        num_blocks = min(num_blocks, seq.num_computed_tokens // self.BLOCK_SIZE)
        self.manager.free_blocks(self.manager.drop_leading_blocks(seq, num_blocks))

    @precondition(lambda self: self.seqs)
    @rule(which=st.integers(0, 20))
    def free(self, which: int) -> None:
        seq, _ = self.seqs.pop(which % len(self.seqs))
        self.manager.free(seq)

    def _write(self, seq: Seq, tokens: list[int], start: int, allocation) -> None:
        size = self.BLOCK_SIZE
        for source, copy in allocation.copies:
            self.contents[copy] = self.contents.get(source, ())
        for position in range(start, len(tokens)):
            block_id = seq.block_table[position // size]
            assert self.manager.ref_count(block_id) == 1, "writing into a shared block"
            self.contents[block_id] = tuple(tokens[: position + 1])
        seq.num_computed_tokens = len(tokens)
        num_full = len(tokens) // size
        self.manager.cache_full_blocks(seq.block_table[:num_full], chained_hashes(tokens, size)[:num_full])

    @invariant()
    def books_balance(self) -> None:
        manager = self.manager
        free = manager.free_block_ids
        assert len(free) == len(set(free))
        holders = [b for seq, _ in self.seqs for b in seq.block_table if b != FREED_BLOCK]
        for block_id in range(manager.num_total_blocks):
            assert manager.ref_count(block_id) == holders.count(block_id)
            assert (block_id in free) == (manager.ref_count(block_id) == 0)
        for seq, tokens in self.seqs:
            assert len(seq.block_table) == cdiv(len(tokens), self.BLOCK_SIZE)
            # Reading a sequence's context through its table gives its own tokens.
            num_freed = num_freed_blocks(seq.block_table)
            assert FREED_BLOCK not in seq.block_table[num_freed:]
            for block_index, block_id in enumerate(seq.block_table[num_freed:], start=num_freed):
                end = min(len(tokens), (block_index + 1) * self.BLOCK_SIZE)
                assert self.contents[block_id][:end] == tuple(tokens[:end])

    @invariant()
    def cached_hashes_name_their_tokens(self) -> None:
        for block_hash, block_id in self.manager.cached_blocks.items():
            prefix = self.contents[block_id]
            assert len(prefix) % self.BLOCK_SIZE == 0
            assert chained_hashes(prefix, self.BLOCK_SIZE)[-1] == block_hash

    @invariant()
    def published_keys_follow_the_cache(self) -> None:
        keys = self.manager.cached_keys
        expected = {routing_key(block_hash) for block_hash in self.manager.cached_blocks}
        changes = keys.changes_since(self.keys_cursor)
        assert changes is not None, "the changes of a pool this small are all kept"
        added, removed, self.keys_cursor = changes
        self.keys_seen = (self.keys_seen - set(removed)) | set(added)
        assert self.keys_seen == expected == set(keys.snapshot()[0])

    def teardown(self) -> None:
        for seq, _ in self.seqs:
            self.manager.free(seq)
        assert self.manager.num_free_blocks == self.manager.num_total_blocks


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
