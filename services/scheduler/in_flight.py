"""Steps sent to the worker whose results are not back yet, and the device blocks they
still use.

The worker runs steps in the order they are sent, so a step may be planned while earlier
ones run. A sequence that finishes, is aborted or is preempted meanwhile may still be
computed by a step in flight: its blocks stay held (off every table, still counted by
the pool) until the last step that uses them has returned. Only then can the pool hand
them to another sequence.
"""

from collections import deque

from services.scheduler.block_manager import FREED_BLOCK, BlockManager
from services.scheduler.outputs import SchedulerOutput
from services.scheduler.request import Sequence


class InFlightSteps:
    def __init__(self, block_manager: BlockManager) -> None:
        self.block_manager = block_manager
        self._steps: deque[SchedulerOutput] = deque()
        # step_id -> blocks released once that step's result is back, in release order.
        self._held_for_step: dict[int, list[int]] = {}
        self.num_held_blocks = 0

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def oldest(self) -> SchedulerOutput | None:
        return self._steps[0] if self._steps else None

    def add(self, step: SchedulerOutput) -> None:
        self._steps.append(step)

    def uses(self, sequence: Sequence) -> bool:
        """Whether a step in flight computes anything for the sequence."""
        return bool(self._steps) and sequence.last_step_id >= self._steps[0].step_id

    def returned(self, step: SchedulerOutput) -> None:
        """The oldest step's result is back: the blocks only it still used are free."""
        assert self._steps and self._steps[0] is step
        self._steps.popleft()
        self._release(self._held_for_step.pop(step.step_id, []))

    def free(self, sequence: Sequence) -> None:
        """Empties the sequence's block table: its blocks go back to the pool now, or once
        the steps in flight that use them have returned."""
        if not self.uses(sequence):
            self.block_manager.free(sequence)
            return
        # Tail blocks first, as BlockManager.free does.
        self.release(sequence, [b for b in reversed(sequence.block_table) if b != FREED_BLOCK])
        sequence.block_table.clear()

    def release(self, sequence: Sequence, block_ids: list[int]) -> None:
        """Blocks out of the sequence's table go back to the pool now, or once the steps in
        flight that use the sequence have returned."""
        if not self.uses(sequence):
            self.block_manager.free_blocks(block_ids)
            return
        self._held_for_step.setdefault(sequence.last_step_id, []).extend(block_ids)
        self.num_held_blocks += len(block_ids)

    def abandon(self) -> None:
        """Forgets every step in flight (the worker stream is gone) and frees what they held."""
        self._steps.clear()
        for blocks in self._held_for_step.values():
            self._release(blocks)
        self._held_for_step.clear()

    def held_block_ids(self) -> list[int]:
        """Blocks held for steps in flight, once per hold."""
        return [b for blocks in self._held_for_step.values() for b in blocks]

    def _release(self, blocks: list[int]) -> None:
        self.block_manager.free_blocks(blocks)
        self.num_held_blocks -= len(blocks)
