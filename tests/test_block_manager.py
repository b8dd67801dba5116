from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.block_manager import BlockManager, cdiv


@dataclass
class Seq:
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)


def test_fresh_pool_is_all_free() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    assert manager.num_total_blocks == 8
    assert manager.num_free_blocks == 8
    assert sorted(manager.free_block_ids) == list(range(8))
    assert all(manager.ref_count(b) == 0 for b in range(8))


def test_allocate_rounds_up_to_whole_blocks() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = Seq()
    new_blocks = manager.allocate_slots(seq, 5)
    assert new_blocks is not None and len(new_blocks) == 2
    assert seq.block_table == new_blocks
    assert manager.num_free_blocks == 6
    assert all(manager.ref_count(b) == 1 for b in new_blocks)


def test_allocate_reuses_room_left_in_the_last_block() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = Seq()
    assert manager.allocate_slots(seq, 5) is not None
    seq.num_computed_tokens = 5
    # Tokens 6..8 still fit the second block.
    assert manager.allocate_slots(seq, 3) == []
    # Token 9 opens a third.
    assert len(manager.allocate_slots(seq, 4) or []) == 1
    assert len(seq.block_table) == 3


def test_allocate_too_many_allocates_nothing() -> None:
    manager = BlockManager(num_blocks=3, block_size=2)
    holder, seq = Seq(), Seq()
    assert manager.allocate_slots(holder, 4) is not None
    assert manager.allocate_slots(seq, 3) is None
    assert seq.block_table == []
    assert manager.num_free_blocks == 1
    assert manager.allocate_slots(seq, 2) is not None
    assert manager.num_free_blocks == 0


def test_free_returns_every_block_and_empties_the_table() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    seq = Seq()
    blocks = manager.allocate_slots(seq, 7)
    assert blocks is not None and len(blocks) == 4
    manager.free(seq)
    assert seq.block_table == []
    assert manager.num_free_blocks == 4
    assert all(manager.ref_count(b) == 0 for b in range(4))


def test_shared_block_stays_in_use_until_last_holder_frees_it() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    first = Seq()
    blocks = manager.allocate_slots(first, 2)
    assert blocks is not None
    # Sharing is how a prefix cache will use the ref counts: a second table takes a hold.
    second = Seq(block_table=list(blocks))
    manager._ref_counts[blocks[0]] += 1
    manager.free(first)
    assert manager.ref_count(blocks[0]) == 1
    assert blocks[0] not in manager.free_block_ids
    manager.free(second)
    assert manager.ref_count(blocks[0]) == 0
    assert manager.num_free_blocks == 4


def test_double_free_is_caught() -> None:
    manager = BlockManager(num_blocks=2, block_size=2)
    seq = Seq()
    manager.allocate_slots(seq, 2)
    stale = Seq(block_table=list(seq.block_table))
    manager.free(seq)
    with pytest.raises(AssertionError):
        manager.free(stale)


def test_rejects_empty_pool() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=16)


@settings(max_examples=60, deadline=None)
@given(
    num_blocks=st.integers(1, 12),
    block_size=st.integers(1, 4),
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9)), max_size=40),
)
def test_random_allocations_keep_the_books(
    num_blocks: int, block_size: int, ops: list[tuple[int, int]]
) -> None:
    manager = BlockManager(num_blocks, block_size)
    seqs = [Seq() for _ in range(4)]
    for which, amount in ops:
        seq = seqs[which]
        if amount == 0:
            manager.free(seq)
            seq.num_computed_tokens = 0
            continue
        before = list(seq.block_table)
        free_before = manager.num_free_blocks
        new_blocks = manager.allocate_slots(seq, amount)
        needed = cdiv(seq.num_computed_tokens + amount, block_size) - len(before)
        if new_blocks is None:
            assert needed > free_before
            assert seq.block_table == before and manager.num_free_blocks == free_before
        else:
            assert len(new_blocks) == max(0, needed)
            seq.num_computed_tokens += amount
        held = [b for s in seqs for b in s.block_table]
        assert len(held) == len(set(held))
        assert set(held).isdisjoint(manager.free_block_ids)
        assert len(held) + manager.num_free_blocks == num_blocks
        assert all(manager.ref_count(b) == (b in held) for b in range(num_blocks))
    for seq in seqs:
        manager.free(seq)
    assert manager.num_free_blocks == num_blocks
