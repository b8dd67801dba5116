"""The KV block pool: which block ids are free, and how many block tables hold each one.

Block tables themselves belong to the sequences; this class only hands out and takes back
ids. Blocks are reference counted so that a later prefix cache can share one block between
several sequences: a block is free exactly when its ref count is 0.
"""

from collections import deque
from typing import Protocol


class HoldsBlocks(Protocol):
    """What the pool needs to know of a sequence."""

    num_computed_tokens: int
    block_table: list[int]


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def free_block_ids(self) -> list[int]:
        return list(self._free_block_ids)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def num_blocks_to_hold(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def num_new_blocks_needed(self, seq: HoldsBlocks, num_new_tokens: int) -> int:
        needed = self.num_blocks_to_hold(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def allocate_slots(self, seq: HoldsBlocks, num_new_tokens: int) -> list[int] | None:
        """Grow `seq.block_table` so that it holds num_computed_tokens + num_new_tokens tokens.

        Returns the block ids added (possibly none), or None when the pool has too few free
        blocks; then nothing is allocated and the caller decides whom to preempt.
        """
        num_needed = self.num_new_blocks_needed(seq, num_new_tokens)
        if num_needed > len(self._free_block_ids):
            return None
        new_block_ids = [self._free_block_ids.popleft() for _ in range(num_needed)]
        for block_id in new_block_ids:
            assert self._ref_counts[block_id] == 0, f"block {block_id} was free but referenced"
            self._ref_counts[block_id] = 1
        seq.block_table.extend(new_block_ids)
        return new_block_ids

    def free(self, seq: HoldsBlocks) -> None:
        """Drop the sequence's hold on all its blocks and empty its block table."""
        # Tail blocks go back first so that, once blocks are shared by prefix, the blocks
        # most likely to be reused (a sequence's leading ones) are the last to be handed out.
        for block_id in reversed(seq.block_table):
            assert self._ref_counts[block_id] > 0, f"block {block_id} freed twice"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_block_ids.append(block_id)
        seq.block_table.clear()
