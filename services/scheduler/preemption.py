"""When blocks run out: which running sequence loses its KV, where that KV goes (the
workers' CPU swap pool, or nowhere, to be recomputed), and how a swapped sequence comes
back into fresh device blocks."""

import enum
from collections.abc import Callable

from services.scheduler.block_manager import FREED_BLOCK, BlockManager, SlotAllocation, num_freed_blocks
from services.scheduler.config import PreemptionMode
from services.scheduler.cpu_block_pool import CpuBlockPool
from services.scheduler.in_flight import InFlightSteps
from services.scheduler.outputs import PendingWorkerOps, RequestEvent
from services.scheduler.queues import SequenceQueues
from services.scheduler.request import Sequence, SequenceStatus


class NoRoom(enum.Enum):
    # The sequence itself was the last running one: preempted to make room for those
    # before it, and every sequence after it is gone too.
    PREEMPTED_ITSELF = enum.auto()
    # Blocks that steps in flight still hold will cover it once they are back: wait for
    # them rather than preempt more.
    BLOCKS_RETURNING = enum.auto()


class Preemption:
    def __init__(
        self,
        mode: PreemptionMode,
        block_manager: BlockManager,
        cpu_pool: CpuBlockPool,
        queues: SequenceQueues,
        in_flight: InFlightSteps,
        worker_ops: PendingWorkerOps,
        report_event: Callable[[RequestEvent], None],
    ) -> None:
        self.mode = mode
        self.block_manager = block_manager
        self.cpu_pool = cpu_pool
        self.queues = queues
        self.in_flight = in_flight
        self.worker_ops = worker_ops
        self.report_event = report_event
        self.num_recompute = 0
        self.num_swap = 0

    def allocate_or_preempt(self, sequence: Sequence, num_new_tokens: int) -> SlotAllocation | NoRoom:
        """Blocks for a running sequence, preempting the last running sequences (lowest
        priority, latest arrival) until it fits.

        Running sequences are scheduled in order, so the last ones are never already in
        this step's batch, unless the last is `sequence` itself.
        """
        manager = self.block_manager
        while True:
            allocation = manager.allocate_slots(sequence, num_new_tokens)
            if allocation is not None:
                return allocation
            # A victim that a step in flight computes gives its blocks back only when that
            # step returns: preempting more now would not make room any sooner.
            returning = self.in_flight.num_held_blocks
            if returning and manager.num_free_blocks + returning >= manager.num_new_blocks_needed(
                sequence, num_new_tokens
            ):
                return NoRoom.BLOCKS_RETURNING
            victim = self.queues.running[-1]
            self.preempt(victim)
            if victim is sequence:
                return NoRoom.PREEMPTED_ITSELF

    def preempt(self, sequence: Sequence, mode: PreemptionMode | None = None) -> None:
        """Takes a running sequence's device blocks, between steps or while building one:
        its KV goes to the CPU pool (swap, while the pool has room) or is dropped, to be
        recomputed when it resumes. Either way the worker forgets it, and it resumes as a
        sequence new to the worker. mode: the configured one unless given.

        A step in flight may still compute it: its KV is copied out by the next step sent,
        after that one has run, and the token the step samples still comes back to it (it
        resumes only then). A sequence whose sample in flight forks it is recomputed
        rather than swapped: CPU blocks are not shared, so its completions start over too.
        """
        assert sequence.status is SequenceStatus.RUNNING
        self.queues.remove(sequence)
        self.worker_ops.forget(sequence)
        sequence.num_registered_blocks = 0
        num_computed_tokens = sequence.num_computed_tokens
        cpu_blocks = None
        forks_in_flight = sequence.awaits_fork and sequence.num_pending_samples > 0
        num_freed = num_freed_blocks(sequence.block_table)
        if (mode or self.mode) is PreemptionMode.SWAP and not forks_in_flight:
            cpu_blocks = self.cpu_pool.allocate(len(sequence.block_table) - num_freed)
        if cpu_blocks is not None:
            # The next step copies the KV out before it computes anything, so the freed
            # device blocks may serve that very step (once no step in flight uses them).
            self.worker_ops.swap_out.extend(zip(sequence.block_table[num_freed:], cpu_blocks))
            # Placeholders keep their places in the CPU table too.
            sequence.cpu_block_table = [FREED_BLOCK] * num_freed + cpu_blocks
            self.in_flight.free(sequence)
            self.queues.insert(sequence, SequenceStatus.SWAPPED)
            self.num_swap += 1
        else:
            self.in_flight.free(sequence)
            sequence.num_computed_tokens = 0
            self.queues.insert(sequence, SequenceStatus.WAITING)
            self.num_recompute += 1
        self.report_event(
            RequestEvent(
                sequence.request_id,
                "preempted",
                {
                    "pagedserve.completion_index": sequence.index,
                    "pagedserve.preemption_mode": "swap" if cpu_blocks is not None else "recompute",
                    "pagedserve.num_computed_tokens": num_computed_tokens,
                },
            )
        )

    def requeue_all(self) -> None:
        """Every unfinished sequence loses its KV and waits to be recomputed from its
        tokens, as a sequence new to the worker: for when the workers' state is gone (a
        worker restarted). Steps in flight must have been abandoned first, so that blocks
        go straight back to the pool."""
        queues = self.queues
        for sequence in [*queues.running, *queues.swapped, *queues.waiting]:
            queues.remove(sequence)
            self.block_manager.free(sequence)
            self.cpu_pool.free(sequence.cpu_block_table)
            sequence.cpu_block_table = []
            sequence.num_computed_tokens = 0
            sequence.num_registered_blocks = 0
            # What steps in flight would have sampled is lost with them; the new stream
            # numbers its steps from 1 again.
            sequence.num_pending_samples = 0
            sequence.last_step_id = 0
            sequence.seq_id = None
            queues.insert(sequence, SequenceStatus.WAITING)

    def swap_in(self, sequence: Sequence, num_new_tokens: int) -> SlotAllocation | None:
        """Moves a swapped sequence back into fresh device blocks, with room for the tokens
        it computes next; None when the pool cannot hold them. The caller schedules it and
        frees its CPU blocks once the step that reads them is built."""
        manager = self.block_manager
        num_freed = num_freed_blocks(sequence.cpu_block_table)
        needed = manager.num_blocks_to_hold(sequence.num_computed_tokens + num_new_tokens) - num_freed
        if needed > manager.num_free_blocks:
            return None
        device_blocks = manager.allocate_blocks(len(sequence.cpu_block_table) - num_freed)
        assert device_blocks is not None
        sequence.block_table = [FREED_BLOCK] * num_freed + device_blocks
        allocation = manager.allocate_slots(sequence, num_new_tokens)
        assert allocation is not None and not allocation.copies
        self.queues.remove(sequence)
        self.queues.insert(sequence, SequenceStatus.RUNNING)
        self.report_event(
            RequestEvent(
                sequence.request_id,
                "swapped_in",
                {
                    "pagedserve.completion_index": sequence.index,
                    "pagedserve.num_computed_tokens": sequence.num_computed_tokens,
                },
            )
        )
        return allocation
