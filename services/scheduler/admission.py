"""Admission: the checks a request must pass before it may queue (one that could never
run is refused now, INVALID_ARGUMENT, rather than left waiting forever), and which queued
sequences join the running batch when a step has room (and, when the batch is full, when
enough of them can join at once: services/scheduler/admission_pacing.py)."""

from collections.abc import Callable
from collections.abc import Sequence as Seq

from pagedserve.v1 import common_pb2

from services.common.errors import InvalidArgumentError, ResourceExhaustedError
from services.common.prompt_checks import check_prompt_length
from services.scheduler.admission_pacing import AdmissionPacing
from services.scheduler.block_manager import BlockManager, SlotAllocation, num_freed_blocks
from services.scheduler.cpu_block_pool import CpuBlockPool
from services.scheduler.outputs import RequestEvent, SchedulerOutput
from services.scheduler.preemption import Preemption
from services.scheduler.prefix_cache import PrefixCache
from services.scheduler.queues import SequenceQueues
from services.scheduler.request import Sequence, SequenceStatus

# Puts a sequence into the step being built: (step, sequence, tokens it computes, its slots).
AddToBatch = Callable[[SchedulerOutput, Sequence, int, SlotAllocation], None]


def check_request(
    prompt_token_ids: Seq[int],
    sampling: common_pb2.SamplingParams,
    max_model_len: int,
    max_num_seqs: int,
) -> None:
    """max_model_len: the most tokens one sequence may hold, the model's length capped by
    the KV pool, so that every admitted sequence can finish even when alone in the pool."""
    if sampling.HasField("max_tokens") and sampling.max_tokens < 1:
        raise InvalidArgumentError("sampling.max_tokens", f"must be at least 1, got {sampling.max_tokens}")
    check_prompt_length(len(prompt_token_ids), sampling, max_model_len)
    if sampling.HasField("n") and not 1 <= sampling.n <= max_num_seqs:
        raise InvalidArgumentError(
            "sampling.n", f"must be in [1, {max_num_seqs}] (the scheduler's max_num_seqs), got {sampling.n}"
        )


class Admission:
    def __init__(
        self,
        max_num_seqs: int,
        queues: SequenceQueues,
        block_manager: BlockManager,
        prefix_cache: PrefixCache,
        cpu_pool: CpuBlockPool,
        preemption: Preemption,
        report_event: Callable[[RequestEvent], None],
        pacing: AdmissionPacing,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.queues = queues
        self.block_manager = block_manager
        self.prefix_cache = prefix_cache
        self.cpu_pool = cpu_pool
        self.preemption = preemption
        self.report_event = report_event
        self.pacing = pacing

    def check_waiting_limit(self, limit: int | None, num_seats: int, num_tokens: int) -> None:
        """Refuses a newcomer that would make more than `limit` requests wait: those the
        free seats and blocks could not start now. A burst that fits is not refused,
        however many of it queue at once."""
        if limit is None:
            return
        num_left = self.num_requests_left_waiting(num_seats, num_tokens)
        if num_left > limit:
            raise ResourceExhaustedError(
                f"{num_left - 1} requests already wait for seats or KV blocks, the limit "
                f"(max_waiting_requests {limit}); retry later"
            )

    def num_requests_left_waiting(self, newcomer_seats: int = 0, newcomer_tokens: int = 0) -> int:
        """Requests among the swapped and waiting ones, and a newcomer with these seats and
        tokens after them (0 seats: none), that the seats and blocks free now could not
        start: walked in scheduling order, as the next step would admit them, stopping
        at the first that does not fit. Whole prompts are counted in blocks, though a
        prefill may start with a chunk: what could start at once is not overstated."""
        queues = self.queues
        free_seats = self.max_num_seqs - sum(s.num_seats for s in queues.running)
        free_blocks = self.block_manager.num_free_blocks
        candidates: list[tuple[tuple[int, int, int], int, int, str | None]] = [
            (s.sort_key, s.num_seats, self._blocks_to_start(s), s.request.request_id)
            for s in (*queues.swapped, *queues.waiting)
        ]
        candidates.sort(key=lambda candidate: candidate[0])
        if newcomer_seats:
            blocks = self.block_manager.num_blocks_to_hold(newcomer_tokens)
            candidates.append(((0, 0, 0), newcomer_seats, blocks, None))
        left: set[str | None] = set()
        for _, seats, blocks, request_id in candidates:
            if left or seats > free_seats or blocks > free_blocks:
                left.add(request_id)
                continue
            free_seats -= seats
            free_blocks -= blocks
        return len(left)

    def _blocks_to_start(self, sequence: Sequence) -> int:
        if sequence.status is SequenceStatus.SWAPPED:
            return len(sequence.cpu_block_table) - num_freed_blocks(sequence.cpu_block_table)
        return self.block_manager.num_blocks_to_hold(sequence.num_tokens)

    def resume_and_admit(self, output: SchedulerOutput, budget: int, add_to_batch: AddToBatch) -> None:
        """Best first among swapped and waiting sequences; stops at the first that does not
        fit, so that a large request is not overtaken forever by small ones."""
        queues = self.queues
        # Most steps have nobody to resume or admit; counting the seats taken would cost a
        # pass over the running batch.
        if not (queues.swapped or queues.waiting):
            return
        if not self.pacing.lets_in(output.step_id, [s.num_new_tokens for s in output.scheduled]):
            return
        seats = sum(s.num_seats for s in queues.running)
        cpu_blocks_read: list[int] = []
        while budget > 0:
            heads = [queue[0] for queue in (queues.swapped, queues.waiting) if queue]
            if not heads:
                break
            sequence = min(heads, key=lambda s: s.sort_key)
            if seats + sequence.num_seats > self.max_num_seqs:
                break
            if sequence.num_pending_samples:
                break  # preempted while a step in flight samples for it: it resumes once back
            if sequence.status is SequenceStatus.SWAPPED:
                num_new_tokens = self._swap_in(sequence, budget, output, cpu_blocks_read, add_to_batch)
            else:
                num_new_tokens = self._admit(sequence, budget, output, add_to_batch)
            if num_new_tokens is None:
                break
            seats += sequence.num_seats
            budget -= num_new_tokens
        # Free only now, so that no swap-out of this step could reuse a CPU block before
        # the worker has read it back (the worker swaps out before it swaps in).
        self.cpu_pool.free(cpu_blocks_read)

    def _admit(
        self, sequence: Sequence, budget: int, output: SchedulerOutput, add_to_batch: AddToBatch
    ) -> int | None:
        """Starts a waiting sequence past its cached prefix; the tokens it computes this
        step, or None when the pool cannot hold them."""
        # Prompt logprobs need every prompt position's logits: no cached prefix.
        wants_prompt_logprobs = sequence.request.sampling.HasField("prompt_logprobs")
        cached_blocks = [] if wants_prompt_logprobs else self.prefix_cache.lookup(sequence)
        num_cached_tokens = len(cached_blocks) * self.block_manager.block_size
        num_new_tokens = min(sequence.num_tokens - num_cached_tokens, budget)
        allocation = self.block_manager.allocate_slots(sequence, num_new_tokens, cached_blocks)
        if allocation is None:
            return None
        self.queues.remove(sequence)
        sequence.num_computed_tokens = num_cached_tokens
        sequence.num_registered_blocks = len(cached_blocks)
        request = sequence.request
        if request.num_cached_tokens is None:
            request.num_cached_tokens = num_cached_tokens
            self.prefix_cache.count_first_admission(request.num_prompt_tokens, num_cached_tokens)
            if num_cached_tokens:
                self.report_event(
                    RequestEvent(
                        request.request_id,
                        "prefix_cache_hit",
                        {
                            "pagedserve.cached_tokens": num_cached_tokens,
                            "pagedserve.prompt_tokens": request.num_prompt_tokens,
                        },
                    )
                )
        self.queues.insert(sequence, SequenceStatus.RUNNING)
        add_to_batch(output, sequence, num_new_tokens, allocation)
        return num_new_tokens

    def _swap_in(
        self,
        sequence: Sequence,
        budget: int,
        output: SchedulerOutput,
        cpu_blocks_read: list[int],
        add_to_batch: AddToBatch,
    ) -> int | None:
        """Brings a swapped sequence back into fresh device blocks; the tokens it computes
        this step, or None when the pool cannot hold them."""
        num_new_tokens = min(sequence.num_tokens_to_compute, budget)
        allocation = self.preemption.swap_in(sequence, num_new_tokens)
        if allocation is None:
            return None
        num_freed = num_freed_blocks(sequence.cpu_block_table)
        output.swap_in.extend(zip(sequence.cpu_block_table[num_freed:], sequence.block_table[num_freed:]))
        cpu_blocks_read.extend(sequence.cpu_block_table)
        sequence.cpu_block_table = []
        add_to_batch(output, sequence, num_new_tokens, allocation)
        return num_new_tokens
