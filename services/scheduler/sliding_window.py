"""Blocks that a windowed-only model's attention never reads again go back to the pool.

When every layer attends within a sliding window of W tokens, the token at position p
sees the keys at positions p - W + 1 .. p. A sequence's next step computes its tokens
from num_computed_tokens on, so no later query reads a key before
num_computed_tokens - W + 1: the blocks wholly before that position leave its table
(FREED_BLOCK keeps their places, services/scheduler/block_manager.py). Steps in flight
may still read them, so they go back to the pool once those steps have returned. A
sequence's memory then stays about W tokens however long it grows. With prefix caching, a
block is dropped only once it is offered to the cache (its step's result is back), so
that a later prompt with the same prefix still finds it.

A model with a layer that sees the whole context (Gemma's global layers), or a draft
model beside it, needs every block: the worker reports no window then
(WorkerInfo.sliding_window), and nothing is dropped.
"""

from services.scheduler.block_manager import BlockManager
from services.scheduler.in_flight import InFlightSteps
from services.scheduler.request import Sequence


class WindowedBlocks:
    def __init__(
        self, window: int, block_manager: BlockManager, in_flight: InFlightSteps, prefix_caching: bool
    ) -> None:
        """window: every layer's window at most, in tokens; 0: some layer has none."""
        self.window = window
        self.block_manager = block_manager
        self.in_flight = in_flight
        self.prefix_caching = prefix_caching

    def release_outside(self, sequence: Sequence) -> None:
        """Drops the blocks before the window of the sequence's next token, if any."""
        if not self.window:
            return
        first_needed = sequence.num_computed_tokens - self.window + 1
        num_outside = max(0, first_needed) // self.block_manager.block_size
        if self.prefix_caching:
            num_outside = min(num_outside, sequence.num_registered_blocks)
        if num_outside:
            dropped = self.block_manager.drop_leading_blocks(sequence, num_outside)
            if dropped:
                self.in_flight.release(sequence, dropped)
