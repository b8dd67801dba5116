"""Continuous batching with one rule: each step, every sequence it schedules catches up
its num_computed_tokens toward len(token_ids), within the step's token budget.

Prefill, chunked prefill, decode, prefix-cache hits (a sequence that starts with its
leading blocks computed), recompute after preemption (it starts again from 0) and swap-in
(a new sequence whose KV is already there) are that rule applied to different gaps. When a
sequence's computation reaches the end of its tokens the worker samples one more, and the
gap opens again by one.

A step: running sequences first, in scheduling order (priority, then arrival, then
completion index), each as far as the budget allows; when blocks run out, the last running
sequence in that order is preempted until the current one fits. Then, if nobody was
preempted, swapped and waiting sequences fill the rest of the budget and seats, best first.

One step is in flight at a time: schedule(), then update_from_output() with its result.
"""

import bisect
import random
from collections.abc import Sequence as Seq

from pagedserve.v1 import common_pb2, scheduler_pb2, worker_pb2

from services.common.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from services.scheduler.admission import check_request
from services.scheduler.block_manager import BlockManager, SlotAllocation
from services.scheduler.config import PreemptionMode, SchedulerConfig
from services.scheduler.cpu_block_pool import CpuBlockPool
from services.scheduler.outputs import (
    NewSequenceData,
    RequestOutput,
    ScheduledSequenceData,
    SchedulerOutput,
)
from services.scheduler.prefix_cache import PrefixCache
from services.scheduler.request import Request, Sequence, SequenceStatus

__all__ = ["Scheduler", "SchedulerConfig", "SchedulerOutput", "RequestOutput"]


def _sort_key(sequence: Sequence) -> tuple[int, int, int]:
    return sequence.sort_key


def _num_requests(queue: list[Sequence]) -> int:
    return len({s.request.request_id for s in queue})


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        eos_token_ids: Seq[int],
        num_cpu_blocks: int = 0,
    ) -> None:
        if config.num_kv_blocks is not None:
            num_blocks = min(num_blocks, config.num_kv_blocks)
        self.config = config
        self.block_manager = BlockManager(num_blocks, block_size)
        self.prefix_cache = PrefixCache(self.block_manager, config.enable_prefix_caching)
        self.cpu_pool = CpuBlockPool(num_cpu_blocks)
        # A sequence longer than the whole pool could never run, even alone; stopping it
        # there keeps every admitted request able to finish.
        self.max_model_len = min(max_model_len, num_blocks * block_size)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._seed_source = random.Random(config.seed)

        self.requests: dict[str, Request] = {}
        # All three queues are kept in scheduling order (Sequence.sort_key). A preempted
        # sequence arrived before any newcomer of its priority, so it resumes first.
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []

        self._num_arrivals = 0
        self._next_seq_id = 1
        self._next_step_id = 1
        self._in_flight: SchedulerOutput | None = None
        # seq_ids the worker must forget, and KV it must copy out to the CPU pool, in the
        # next step (before it computes anything).
        self._finished_seq_ids: list[int] = []
        self._pending_swap_out: list[tuple[int, int]] = []

        self.num_steps = 0
        self.num_preemptions_recompute = 0
        self.num_preemptions_swap = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    @property
    def num_preemptions(self) -> int:
        return self.num_preemptions_recompute + self.num_preemptions_swap

    # --- requests in and out -------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: common_pb2.SamplingParams,
        priority: int = 0,
    ) -> None:
        """Queues a request; raises InvalidArgumentError for one that could never run and
        ResourceExhaustedError when max_waiting_requests are already queued."""
        if request_id in self.requests:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already in flight")
        check_request(prompt_token_ids, sampling, self.max_model_len, self.config.max_num_seqs)
        limit = self.config.max_waiting_requests
        if limit is not None and len(self.waiting) >= limit:
            raise ResourceExhaustedError(f"{len(self.waiting)} requests are waiting, the limit; retry later")
        # A seed drawn once here keeps a request's random stream when it is preempted and
        # resumed.
        request = Request.new(
            request_id, prompt_token_ids, sampling, priority, self._num_arrivals,
            seed_if_unset=self._seed_source.getrandbits(64),
        )
        self._num_arrivals += 1
        self.requests[request_id] = request
        bisect.insort(self.waiting, request.sequences[0], key=_sort_key)

    def abort_request(self, request_id: str) -> list[RequestOutput] | None:
        """Finishes every unfinished completion of the request with FINISH_REASON_ABORT and
        frees its blocks now; one output per such completion. None when no such request is
        in flight."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        unfinished = [s for s in request.sequences if s.status is not SequenceStatus.FINISHED]
        # Completions not forked yet end too, each with its own last message.
        request.end_unforked_completions(common_pb2.FINISH_REASON_ABORT)
        for sequence in unfinished:
            self._queue_of(sequence).remove(sequence)
            self._finish(sequence, common_pb2.FINISH_REASON_ABORT)
        outputs = [
            RequestOutput.of(s, []) for s in request.sequences if s.finish_reason == common_pb2.FINISH_REASON_ABORT
        ]
        # Only the last message ends the request's stream.
        for output in outputs[:-1]:
            output.request_finished = False
        return outputs

    def abort_all(self) -> list[RequestOutput]:
        """Aborts every request in flight, in arrival order, and starts over with the worker.

        For when the worker stream is over (the worker died, or shutdown): the step in
        flight is dropped, and the next step is step 1 of a new stream that knows no
        seq_ids. To abort everything on a live stream, abort each request instead.
        """
        in_flight = sorted(self.requests.values(), key=lambda r: r.arrival_index)
        outputs = [o for r in in_flight for o in self.abort_request(r.request_id) or []]
        self._in_flight = None
        self._finished_seq_ids.clear()
        self._pending_swap_out.clear()
        self._next_step_id = 1
        # The next stream may reach a restarted worker, whose cache holds no KV.
        self.block_manager.reset_prefix_cache()
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> scheduler_pb2.SchedulerStats:
        return scheduler_pb2.SchedulerStats(
            num_running=_num_requests(self.running),
            num_waiting=_num_requests(self.waiting),
            num_swapped=_num_requests(self.swapped),
            num_total_blocks=self.block_manager.num_total_blocks,
            num_free_blocks=self.block_manager.num_free_blocks,
            num_total_cpu_blocks=self.cpu_pool.num_total_blocks,
            num_free_cpu_blocks=self.cpu_pool.num_free_blocks,
            num_preemptions=self.num_preemptions,
            num_preemptions_recompute=self.num_preemptions_recompute,
            num_preemptions_swap=self.num_preemptions_swap,
            prefix_cache_queries=self.prefix_cache.num_queried_tokens,
            prefix_cache_hits=self.prefix_cache.num_hit_tokens,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_steps=self.num_steps,
        )

    # --- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput | None:
        """Builds the next step, or None when no sequence has anything to compute."""
        if self._in_flight is not None:
            raise RuntimeError(f"step {self._in_flight.step_id} has no result yet")
        budget = self.config.max_num_batched_tokens
        output = SchedulerOutput(step_id=self._next_step_id)

        num_preemptions_before = self.num_preemptions
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            num_new_tokens = min(sequence.num_tokens_to_compute, budget)
            allocation = self._allocate_or_preempt(sequence, num_new_tokens)
            if allocation is None:
                break  # it preempted itself, and every sequence after it is gone too
            self._add_to_batch(output, sequence, num_new_tokens, allocation)
            budget -= num_new_tokens
            index += 1

        # Blocks just taken from a preempted sequence go to the running ones on the next
        # steps, not to a newcomer that would make the same shortage happen again.
        if self.num_preemptions == num_preemptions_before or not output.scheduled:
            self._resume_and_admit(output, budget)

        if not output.scheduled:
            return None
        output.finished_seq_ids, self._finished_seq_ids = self._finished_seq_ids, []
        output.swap_out, self._pending_swap_out = self._pending_swap_out, []
        self._next_step_id += 1
        self.num_steps += 1
        self._in_flight = output
        return output

    def update_from_output(
        self, scheduled: SchedulerOutput, result: worker_pb2.StepResult
    ) -> list[RequestOutput]:
        """Applies the worker's sampled tokens; returns an output for every completion that
        got a token (finished ones included), in batch order."""
        if self._in_flight is not scheduled:
            raise RuntimeError(f"step {scheduled.step_id} is not the step in flight")
        # A worker that answers something else is broken; treating it as gone lets the
        # caller abort_all() and start a fresh stream. Nothing is changed before this.
        if result.step_id != scheduled.step_id:
            raise UnavailableError(f"worker answered step {result.step_id} to step {scheduled.step_id}")
        expected = scheduled.sampling_seq_ids
        if len(result.seq_ids) != len(result.token_ids) or list(result.seq_ids) != expected:
            raise UnavailableError(
                f"worker answered step {scheduled.step_id} with {len(result.token_ids)} tokens for "
                f"seq_ids {list(result.seq_ids)}, expected tokens for {expected} in that order"
            )
        self._in_flight = None
        sampled = list(result.token_ids)
        next_sampled = 0

        outputs: list[RequestOutput] = []
        for item in scheduled.scheduled:
            # The result is in batch order: this item's tokens come next.
            first_sampled = next_sampled
            next_sampled += item.num_samples
            sequence = item.sequence
            if sequence.status is not SequenceStatus.RUNNING or sequence.seq_id != item.seq_id:
                continue  # aborted while the step ran
            sequence.num_computed_tokens += item.num_new_tokens
            self.prefix_cache.register_computed_blocks(sequence)
            if not item.num_samples:
                continue  # a prompt chunk; the rest follows in later steps
            children = []
            if item.num_samples > 1:
                children = self._fork(sequence, sampled[first_sampled + 1:next_sampled])
            sequence.token_ids.append(sampled[first_sampled])
            for completion in (sequence, *children):
                outputs.append(self._after_sample(completion))
        return outputs

    def _after_sample(self, sequence: Sequence) -> RequestOutput:
        """Finishes a sequence whose new last token stops it; its output either way."""
        self.num_generation_tokens += 1
        stop_reason = sequence.stop_reason(self.eos_token_ids, self.max_model_len)
        if stop_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.running.remove(sequence)
            self._finish(sequence, stop_reason)
        return RequestOutput.of(sequence, [sequence.token_ids[-1]])

    # --- running -------------------------------------------------------------------------

    def _allocate_or_preempt(self, sequence: Sequence, num_new_tokens: int) -> SlotAllocation | None:
        """Blocks for a running sequence, preempting the last running sequences (lowest
        priority, latest arrival) until it fits. None if it had to preempt itself.

        Running sequences are scheduled in order, so the last ones are never already in
        this step's batch, unless the last is `sequence` itself.
        """
        while True:
            allocation = self.block_manager.allocate_slots(sequence, num_new_tokens)
            if allocation is not None:
                return allocation
            victim = self.running[-1]
            self.preempt(victim)
            if victim is sequence:
                return None

    def _add_to_batch(
        self, output: SchedulerOutput, sequence: Sequence, num_new_tokens: int, allocation: SlotAllocation
    ) -> None:
        if sequence.seq_id is None:
            sequence.seq_id = self._next_seq_id
            self._next_seq_id += 1
            output.new_sequences.append(
                NewSequenceData(
                    seq_id=sequence.seq_id,
                    index=sequence.index,
                    token_ids=tuple(sequence.token_ids),
                    num_computed_tokens=sequence.num_computed_tokens,
                    sampling=sequence.worker_sampling,
                )
            )
            # A sequence new to the worker brings its whole block table.
            new_block_ids = tuple(sequence.block_table)
        else:
            # The protocol only appends to a known table; block_manager's books say why a
            # known sequence never writes into a shared block: sharers are all introduced
            # anew (forks, cache hits, swap-ins) and copy before their first write.
            assert not allocation.copies, f"seq {sequence.seq_id} would write into a shared block"
            new_block_ids = tuple(allocation.new_block_ids)
        output.copy_blocks.extend(allocation.copies)
        reaches_end = sequence.num_computed_tokens + num_new_tokens == sequence.num_tokens
        num_samples = (sequence.request.n if sequence.awaits_fork else 1) if reaches_end else 0
        output.scheduled.append(
            ScheduledSequenceData(
                sequence=sequence,
                seq_id=sequence.seq_id,
                num_new_tokens=num_new_tokens,
                new_block_ids=new_block_ids,
                num_samples=num_samples,
            )
        )

    def preempt(self, sequence: Sequence, mode: PreemptionMode | None = None) -> None:
        """Takes a running sequence's device blocks, between steps or while building one:
        its KV goes to the CPU pool (swap, while the pool has room) or is dropped, to be
        recomputed when it resumes. Either way the worker forgets it, and it resumes as a
        sequence new to the worker. mode: the configured one unless given."""
        assert sequence.status is SequenceStatus.RUNNING
        self.running.remove(sequence)
        self._forget_on_worker(sequence)
        sequence.num_registered_blocks = 0
        cpu_blocks = None
        if (mode or self.config.preemption_mode) is PreemptionMode.SWAP:
            cpu_blocks = self.cpu_pool.allocate(len(sequence.block_table))
        if cpu_blocks is not None:
            # The next step copies the KV out before it computes anything, so the freed
            # device blocks may serve that very step.
            self._pending_swap_out.extend(zip(sequence.block_table, cpu_blocks))
            sequence.cpu_block_table = cpu_blocks
            self.block_manager.free(sequence)
            sequence.status = SequenceStatus.SWAPPED
            bisect.insort(self.swapped, sequence, key=_sort_key)
            self.num_preemptions_swap += 1
        else:
            self.block_manager.free(sequence)
            sequence.num_computed_tokens = 0
            sequence.status = SequenceStatus.WAITING
            bisect.insort(self.waiting, sequence, key=_sort_key)
            self.num_preemptions_recompute += 1

    # --- resuming and admitting ----------------------------------------------------------

    def _resume_and_admit(self, output: SchedulerOutput, budget: int) -> None:
        """Best first among swapped and waiting sequences; stops at the first that does not
        fit, so that a large request is not overtaken forever by small ones."""
        seats = sum(s.num_seats for s in self.running)
        cpu_blocks_read: list[int] = []
        while budget > 0:
            heads = [queue[0] for queue in (self.swapped, self.waiting) if queue]
            if not heads:
                break
            sequence = min(heads, key=_sort_key)
            if seats + sequence.num_seats > self.config.max_num_seqs:
                break
            if sequence.status is SequenceStatus.SWAPPED:
                num_new_tokens = self._swap_in(sequence, budget, output, cpu_blocks_read)
            else:
                num_new_tokens = self._admit(sequence, budget, output)
            if num_new_tokens is None:
                break
            seats += sequence.num_seats
            budget -= num_new_tokens
        # Free only now, so that no swap-out of this step could reuse a CPU block before
        # the worker has read it back (the worker swaps out before it swaps in).
        self.cpu_pool.free(cpu_blocks_read)

    def _admit(self, sequence: Sequence, budget: int, output: SchedulerOutput) -> int | None:
        """Starts a waiting sequence past its cached prefix; the tokens it computes this
        step, or None when the pool cannot hold them."""
        cached_blocks = self.prefix_cache.lookup(sequence)
        num_cached_tokens = len(cached_blocks) * self.block_manager.block_size
        num_new_tokens = min(sequence.num_tokens - num_cached_tokens, budget)
        allocation = self.block_manager.allocate_slots(sequence, num_new_tokens, cached_blocks)
        if allocation is None:
            return None
        self.waiting.pop(0)
        sequence.num_computed_tokens = num_cached_tokens
        sequence.num_registered_blocks = len(cached_blocks)
        request = sequence.request
        if request.num_cached_tokens is None:
            request.num_cached_tokens = num_cached_tokens
            self.prefix_cache.count_first_admission(request.num_prompt_tokens, num_cached_tokens)
        self._start_running(sequence)
        self._add_to_batch(output, sequence, num_new_tokens, allocation)
        return num_new_tokens

    def _swap_in(
        self, sequence: Sequence, budget: int, output: SchedulerOutput, cpu_blocks_read: list[int]
    ) -> int | None:
        """Brings a swapped sequence back into fresh device blocks; the tokens it computes
        this step, or None when the pool cannot hold them."""
        num_new_tokens = min(sequence.num_tokens_to_compute, budget)
        needed = self.block_manager.num_blocks_to_hold(sequence.num_computed_tokens + num_new_tokens)
        if needed > self.block_manager.num_free_blocks:
            return None
        device_blocks = self.block_manager.allocate_blocks(len(sequence.cpu_block_table))
        assert device_blocks is not None
        sequence.block_table = device_blocks
        allocation = self.block_manager.allocate_slots(sequence, num_new_tokens)
        assert allocation is not None and not allocation.copies
        output.swap_in.extend(zip(sequence.cpu_block_table, device_blocks))
        cpu_blocks_read.extend(sequence.cpu_block_table)
        sequence.cpu_block_table = []
        self.swapped.remove(sequence)
        self._start_running(sequence)
        self._add_to_batch(output, sequence, num_new_tokens, allocation)
        return num_new_tokens

    def _start_running(self, sequence: Sequence) -> None:
        sequence.status = SequenceStatus.RUNNING
        bisect.insort(self.running, sequence, key=_sort_key)

    # --- after a step --------------------------------------------------------------------

    def _fork(self, parent: Sequence, first_tokens: list[int]) -> list[Sequence]:
        """Completions 1..n-1 of the parent's request, each starting from the prompt the
        parent computed and its own first token, holding the parent's blocks."""
        children = []
        for index, token_id in enumerate(first_tokens, start=1):
            child = parent.fork(index, token_id)
            self.block_manager.fork(parent, child)
            parent.request.sequences.append(child)
            bisect.insort(self.running, child, key=_sort_key)
            children.append(child)
        # The parent is introduced anew too: whichever sharer writes into the shared last
        # prompt block first then gets a private copy, and a table the worker knows never
        # changes under it.
        self._forget_on_worker(parent)
        return children

    def _finish(self, sequence: Sequence, finish_reason: int) -> None:
        """Takes a sequence already out of every queue out of the scheduler."""
        self._forget_on_worker(sequence)
        self.block_manager.free(sequence)
        self.cpu_pool.free(sequence.cpu_block_table)
        sequence.cpu_block_table = []
        sequence.status = SequenceStatus.FINISHED
        sequence.finish_reason = finish_reason
        request = sequence.request
        if request.finished:
            del self.requests[request.request_id]
            self.num_prompt_tokens += request.num_prompt_tokens

    def _forget_on_worker(self, sequence: Sequence) -> None:
        if sequence.seq_id is not None:
            self._finished_seq_ids.append(sequence.seq_id)
            sequence.seq_id = None

    def _queue_of(self, sequence: Sequence) -> list[Sequence]:
        return {
            SequenceStatus.WAITING: self.waiting,
            SequenceStatus.RUNNING: self.running,
            SequenceStatus.SWAPPED: self.swapped,
        }[sequence.status]
