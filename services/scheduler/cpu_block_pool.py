"""The workers' CPU swap pool as the scheduler books it. A CPU block holds the KV of one
swapped-out sequence's block; nothing shares or caches CPU blocks."""

from collections import deque

from services.scheduler.block_manager import FREED_BLOCK


class CpuBlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_total_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def free_block_ids(self) -> list[int]:
        return list(self._free)

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks > len(self._free):
            return None
        return [self._free.popleft() for _ in range(num_blocks)]

    def free(self, block_ids: list[int]) -> None:
        """block_ids: a swapped sequence's CPU table, whose FREED_BLOCK placeholders
        (blocks dropped before the swap) hold no CPU block."""
        self._free.extend(block_id for block_id in block_ids if block_id != FREED_BLOCK)
