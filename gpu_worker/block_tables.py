"""The worker's copy of its live sequences' block tables: the rows the scheduler's step
deltas extend, laid out so that a batch's tables are one NumPy index."""

from collections.abc import Sequence

import numpy as np


class BlockTables:
    """Block tables of the live sequences, one row each, in one growable int32 array."""

    def __init__(self, max_blocks_per_seq: int, capacity: int = 64) -> None:
        self.array = np.zeros((capacity, max(max_blocks_per_seq, 1)), dtype=np.int32)
        self.num_blocks = np.zeros(capacity, dtype=np.int64)
        self.row_of: dict[int, int] = {}
        self._free_rows = list(range(capacity - 1, -1, -1))

    def extend(self, seq_id: int, block_ids: Sequence[int]) -> int:
        """Appends blocks to the sequence's table (creating it); returns its row."""
        row = self.row_of.get(seq_id)
        if row is None:
            if not self._free_rows:
                self._grow_rows()
            row = self._free_rows.pop()
            self.row_of[seq_id] = row
        if block_ids:
            start = int(self.num_blocks[row])
            end = start + len(block_ids)
            if end > self.array.shape[1]:
                self._grow_columns(end)
            self.array[row, start:end] = block_ids
            self.num_blocks[row] = end
        return row

    def truncate(self, seq_id: int, num_blocks: int) -> None:
        """Keeps the sequence's first num_blocks blocks (speculative lookahead given back)."""
        row = self.row_of[seq_id]
        self.num_blocks[row] = min(int(self.num_blocks[row]), num_blocks)

    def remove(self, seq_id: int) -> None:
        row = self.row_of.pop(seq_id, None)
        if row is not None:
            self.num_blocks[row] = 0
            self._free_rows.append(row)

    def clear(self) -> None:
        for seq_id in list(self.row_of):
            self.remove(seq_id)

    def _grow_rows(self) -> None:
        capacity = self.array.shape[0]
        self.array = np.concatenate([self.array, np.zeros_like(self.array)])
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
        self._free_rows.extend(range(2 * capacity - 1, capacity - 1, -1))

    def _grow_columns(self, width: int) -> None:
        grown = np.zeros((self.array.shape[0], max(width, 2 * self.array.shape[1])), dtype=np.int32)
        grown[:, : self.array.shape[1]] = self.array
        self.array = grown
