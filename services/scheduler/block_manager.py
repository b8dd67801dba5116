"""The KV block pool: which block ids are free, how many block tables hold each one, and
the prefix cache of full blocks.

Block tables belong to the sequences; this class hands out and takes back ids. The books
it keeps (tests/scheduler/test_block_manager.py checks them after every operation):

- A block's ref count is the number of block tables holding it. The prefix cache holds no
  reference: a block is free, that is allocatable, exactly when its ref count is 0.
- A cached block (hash -> block) may be free: its KV stays valid until the block is handed
  out again, which evicts it. Free blocks without cached KV are handed out first, then
  cached ones, least recently freed first.
- Only full blocks whose every token's KV is computed are cached. Nobody writes them again:
  a sequence writes only past its computed tokens, and every holder of a cached block has
  computed all of it.
- A block that several tables hold is never written: a sequence about to write into a
  shared block gets a private copy first (copy on write, see `allocate_slots`).
- With a model whose every layer attends within a sliding window, a table's leading
  blocks that lie wholly before the window of the sequence's next token go back to the
  pool (`drop_leading_blocks`); FREED_BLOCK keeps their places, so that a block's index
  in the table stays its position in the sequence. The placeholders form a leading run.
"""

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.block_hash import BlockHash, routing_key
from services.scheduler.cached_keys import CachedKeys


class HoldsBlocks(Protocol):
    """What the pool needs to know of a sequence."""

    num_computed_tokens: int
    block_table: list[int]


# A table entry whose block went back to the pool (see the books above); the worker's
# attention kernels never read it.
FREED_BLOCK = -1


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


def num_freed_blocks(table: Sequence[int]) -> int:
    """The length of the table's leading run of FREED_BLOCK placeholders."""
    count = 0
    for block_id in table:
        if block_id != FREED_BLOCK:
            break
        count += 1
    return count


@dataclass(frozen=True)
class SlotAllocation:
    # Block ids appended to the sequence's table.
    new_block_ids: tuple[int, ...]
    # (shared block, private copy) pairs: shared blocks that the sequence is about to write
    # into, replaced in its table by copies it alone holds. The caller has the worker copy
    # the KV before the step writes.
    copies: tuple[tuple[int, int], ...] = ()


# What most decode steps get: room left in a block the sequence owns alone.
_NOTHING_NEW = SlotAllocation(())


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        # Free blocks in the order they are handed out; OrderedDicts as ordered sets, so
        # that a cache hit takes a block out of the middle in O(1).
        self._free_uncached: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._hash_of_block: list[BlockHash | None] = [None] * num_blocks
        self._block_of_hash: dict[BlockHash, int] = {}
        # What the engine's load reports tell frontends of this cache.
        self.cached_keys = CachedKeys()

    # --- the books -----------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def free_block_ids(self) -> list[int]:
        return [*self._free_uncached, *self._free_cached]

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    @property
    def cached_blocks(self) -> dict[BlockHash, int]:
        """A copy of the prefix cache: hash -> block id."""
        return dict(self._block_of_hash)

    def num_blocks_to_hold(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def num_new_blocks_needed(self, seq: HoldsBlocks, num_new_tokens: int) -> int:
        needed = self.num_blocks_to_hold(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    # --- the prefix cache ----------------------------------------------------------------

    def cached_prefix(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks of the longest leading run of `block_hashes`."""
        blocks = []
        for block_hash in block_hashes:
            block_id = self._block_of_hash.get(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def cache_full_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[BlockHash]) -> None:
        """Offers blocks whose tokens' KV is all computed to the cache, each under the
        chained hash of its tokens (aligned lists)."""
        for block_id, block_hash in zip(block_ids, block_hashes, strict=True):
            if block_id == FREED_BLOCK:
                continue  # its block left the table (a sliding window): nothing to offer
            assert self._ref_counts[block_id] > 0, f"block {block_id} is cached while nobody holds it"
            known = self._hash_of_block[block_id]
            if known is not None:
                assert known == block_hash, f"block {block_id} changed its tokens"
                continue
            # The same tokens computed twice (two requests prefilled the same prefix at
            # once): the first copy serves later hits, this one stays private.
            if block_hash not in self._block_of_hash:
                self._block_of_hash[block_hash] = block_id
                self._hash_of_block[block_id] = block_hash
                self.cached_keys.add(routing_key(block_hash))

    def reset_prefix_cache(self) -> None:
        """Forgets every cached block, as when the worker that held their KV is gone."""
        for block_id in self._block_of_hash.values():
            self._hash_of_block[block_id] = None
        self._block_of_hash.clear()
        self.cached_keys.clear()
        self._free_uncached.update(self._free_cached)
        self._free_cached.clear()

    # --- holding blocks ------------------------------------------------------------------

    def allocate_slots(
        self, seq: HoldsBlocks, num_new_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> SlotAllocation | None:
        """Makes `seq.block_table` hold num_computed_tokens + num_new_tokens tokens, every
        block the new tokens go to owned by `seq` alone.

        `cached_blocks` (found by `cached_prefix`) are appended first and count as computed:
        the caller moves num_computed_tokens past them once this succeeds. Returns None when
        the pool has too few free blocks; then nothing changes and the caller decides whom
        to preempt.
        """
        block_size = self.block_size
        table = seq.block_table
        end = seq.num_computed_tokens + num_new_tokens
        if (
            not cached_blocks
            and (len(table) - 1) * block_size <= seq.num_computed_tokens < end <= len(table) * block_size
            and self._ref_counts[table[-1]] == 1
        ):
            return _NOTHING_NEW  # writes only into its last block, which it owns alone
        if cached_blocks:
            assert seq.num_computed_tokens == len(table) * block_size, "cache hits follow whole blocks"
        num_computed = seq.num_computed_tokens + len(cached_blocks) * block_size
        num_new = max(0, cdiv(num_computed + num_new_tokens, block_size) - len(table) - len(cached_blocks))
        # Cached blocks lie before the first token written, so only the table's own blocks
        # from there on may need a copy.
        first_written = num_computed // block_size if num_new_tokens > 0 else len(table)
        shared = [i for i in range(first_written, len(table)) if self._ref_counts[table[i]] > 1]
        num_revived = sum(1 for block_id in cached_blocks if self._ref_counts[block_id] == 0)
        if num_new + len(shared) + num_revived > self.num_free_blocks:
            return None

        # Holds on cached blocks first, so that the blocks handed out below are not them.
        for block_id in cached_blocks:
            self._hold(block_id)
        table.extend(cached_blocks)
        copies = []
        for i in shared:
            copy = self._take_free_block()
            self._ref_counts[table[i]] -= 1
            copies.append((table[i], copy))
            table[i] = copy
        new_block_ids = tuple(self._take_free_block() for _ in range(num_new))
        table.extend(new_block_ids)
        return SlotAllocation(new_block_ids, tuple(copies))

    def allocate_blocks(self, num_blocks: int) -> list[int] | None:
        """Fresh blocks outside any table (to swap KV into), or None if too few are free."""
        if num_blocks > self.num_free_blocks:
            return None
        return [self._take_free_block() for _ in range(num_blocks)]

    def fork(self, parent: HoldsBlocks, child: HoldsBlocks) -> None:
        """The child holds all of the parent's blocks too."""
        assert not child.block_table, "a fork starts with no blocks of its own"
        for block_id in parent.block_table:
            self._hold(block_id)
        child.block_table.extend(parent.block_table)

    def free(self, seq: HoldsBlocks) -> None:
        """Drop the sequence's hold on all its blocks and empty its block table."""
        # Tail blocks go back first, so that a sequence's leading blocks, the likeliest to
        # be shared by a later prompt, are the last of its blocks to be evicted.
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()

    def shrink(self, seq: HoldsBlocks, num_blocks: int) -> None:
        """Gives back the tail blocks of the sequence's table past its first num_blocks
        (lookahead slots that speculation did not fill). They hold no cached KV: only
        computed full blocks are cached, and those lie before the slots."""
        table = seq.block_table
        while len(table) > num_blocks:
            self._release(table.pop())

    def drop_leading_blocks(self, seq: HoldsBlocks, num_blocks: int) -> list[int]:
        """Puts FREED_BLOCK in place of the table's first num_blocks blocks; returns the
        blocks so taken out, for the caller to release (now, or once the steps in flight
        that read them have returned)."""
        table = seq.block_table
        dropped = []
        index = min(num_blocks, len(table)) - 1
        while index >= 0 and table[index] != FREED_BLOCK:
            dropped.append(table[index])
            table[index] = FREED_BLOCK
            index -= 1
        return dropped

    def free_blocks(self, block_ids: Sequence[int]) -> None:
        """Releases blocks taken with `allocate_blocks` and not put into a table."""
        for block_id in block_ids:
            self._release(block_id)

    # --- helpers -------------------------------------------------------------------------

    def _hold(self, block_id: int) -> None:
        if block_id == FREED_BLOCK:
            return  # a fork's copy of a placeholder
        if self._ref_counts[block_id] == 0:
            del self._free_cached[block_id]  # only cached blocks are held while free
        self._ref_counts[block_id] += 1

    def _release(self, block_id: int) -> None:
        if block_id == FREED_BLOCK:
            return  # went back to the pool when it was dropped
        assert self._ref_counts[block_id] > 0, f"block {block_id} freed twice"
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            free = self._free_uncached if self._hash_of_block[block_id] is None else self._free_cached
            free[block_id] = None

    def _take_free_block(self) -> int:
        if self._free_uncached:
            block_id, _ = self._free_uncached.popitem(last=False)
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            evicted = self._hash_of_block[block_id]
            assert evicted is not None
            del self._block_of_hash[evicted]
            self._hash_of_block[block_id] = None
            self.cached_keys.remove(routing_key(evicted))
        assert self._ref_counts[block_id] == 0, f"block {block_id} was free but referenced"
        self._ref_counts[block_id] = 1
        return block_id
