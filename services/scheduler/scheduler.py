"""Continuous batching with one rule: each step, every sequence it schedules catches up
its num_computed_tokens toward len(token_ids), within the step's token budget.

Prefill, chunked prefill, decode, prefix-cache hits (a sequence that starts with its
leading blocks computed), recompute after preemption (it starts again from 0) and swap-in
(a new sequence whose KV is already there) are that rule applied to different gaps. When a
sequence's computation reaches the end of its tokens the worker samples one more, and the
gap opens again by one.

A step: running sequences first, in scheduling order (priority, arrival, completion index),
each as far as the budget allows; when blocks run out, the last running one in that order
is preempted until the current one fits (preemption.py). Then, if nobody was preempted,
swapped and waiting ones fill the budget and seats, best first (admission_pacing.py).

Steps overlap: schedule() may plan the next step while up to limits.max_steps_in_flight - 1
are in flight, and update_from_output() takes results oldest first. Planning ahead, a
sequence that samples in a step in flight is taken to have that token already: its KV slot
is allocated and the worker feeds in what it sampled. Stop conditions come one step late:
a sequence stopped by the result of step N may also be in step N+1, whose token for it is
dropped (never streamed, never counted). Blocks a step in flight uses stay held until it
returns (services/scheduler/in_flight.py).
"""

import random
from collections.abc import Callable
from collections.abc import Sequence as Seq

from pagedserve.v1 import common_pb2, scheduler_pb2, worker_pb2

from services.common.errors import InvalidArgumentError, UnavailableError
from services.common.step_limits import StepLimits
from services.scheduler.admission import Admission, check_request
from services.scheduler.admission_pacing import AdmissionPacing
from services.scheduler.batching import StepBatcher
from services.scheduler.block_manager import BlockManager
from services.scheduler.config import PreemptionMode, SchedulerConfig
from services.scheduler.cpu_block_pool import CpuBlockPool
from services.scheduler.in_flight import InFlightSteps
from services.scheduler.outputs import PendingWorkerOps, RequestEvent, RequestOutput, SchedulerOutput
from services.scheduler.preemption import NoRoom, Preemption
from services.scheduler.prefix_cache import PrefixCache
from services.scheduler.prompt_budget import PromptBudget
from services.scheduler.queues import SequenceQueues
from services.scheduler.request import Request, Sequence, SequenceStatus
from services.scheduler.sliding_window import WindowedBlocks
from services.scheduler.speculation import SpeculationPolicy, sampled_counts
from services.scheduler.stats import scheduler_stats

__all__ = ["Scheduler", "SchedulerConfig", "SchedulerOutput", "RequestOutput"]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        eos_token_ids: Seq[int],
        num_cpu_blocks: int = 0,
        worker_limits: StepLimits | None = None,
        num_speculative_tokens: int = 0,
        sliding_window: int = 0,
    ) -> None:
        """num_speculative_tokens: the most the worker proposes per sequence and step;
        sliding_window: every layer's attention window at most (0: some layer has none)."""
        if config.num_kv_blocks is not None:
            num_blocks = min(num_blocks, config.num_kv_blocks)
        self.config = config
        self.limits = config.step_limits(worker_limits)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.prefix_cache = PrefixCache(self.block_manager, config.enable_prefix_caching)
        self.cpu_pool = CpuBlockPool(num_cpu_blocks)
        # A sequence longer than the whole pool could never run, even alone; stopping it
        # there keeps every admitted request able to finish.
        self.max_model_len = min(max_model_len, num_blocks * block_size)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._seed_source = random.Random(config.seed)

        self.requests: dict[str, Request] = {}
        queues = self.queues = SequenceQueues()
        self.waiting, self.running, self.swapped = queues.waiting, queues.running, queues.swapped
        self.in_flight = InFlightSteps(self.block_manager)
        caching = config.enable_prefix_caching
        self.windowed_blocks = WindowedBlocks(sliding_window, self.block_manager, self.in_flight, caching)
        self._worker_ops = PendingWorkerOps()
        # Told of cache hits, preemptions and swap-ins (the service puts them on spans).
        self.on_event: Callable[[RequestEvent], None] | None = None
        self.preemption = Preemption(
            config.preemption_mode,
            self.block_manager,
            self.cpu_pool,
            self.queues,
            self.in_flight,
            self._worker_ops,
            self._report_event,
        )
        self.admission = Admission(
            self.limits.max_num_seqs,
            self.queues,
            self.block_manager,
            self.prefix_cache,
            self.cpu_pool,
            self.preemption,
            self._report_event,
            AdmissionPacing(config, self.limits.max_num_seqs, queues),
        )
        self.speculation = SpeculationPolicy(
            config, num_speculative_tokens, self.block_manager, self.prefix_cache
        )
        self.prompt_budget = PromptBudget(config, self.limits, queues)
        self.batcher = StepBatcher()
        self._num_arrivals = 0
        self._next_step_id = 1
        self.num_steps = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    @property
    def max_steps_in_flight(self) -> int:
        return self.limits.max_steps_in_flight

    @property
    def num_preemptions(self) -> int:
        return self.preemption.num_recompute + self.preemption.num_swap

    # --- requests in and out -------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: common_pb2.SamplingParams,
        priority: int = 0,
        num_resumed_tokens: int = 0,
    ) -> None:
        """Queues a request; raises InvalidArgumentError for one that could never run and
        ResourceExhaustedError when max_waiting_requests could not start now.
        num_resumed_tokens: the prompt's last tokens were generated by another engine."""
        if request_id in self.requests:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already in flight")
        if not 0 <= num_resumed_tokens < len(prompt_token_ids):
            raise InvalidArgumentError(
                "num_resumed_tokens",
                f"must be in [0, {len(prompt_token_ids)}) (the prompt's length), got {num_resumed_tokens}",
            )
        check_request(prompt_token_ids, sampling, self.max_model_len, self.limits.max_num_seqs)
        self.admission.check_waiting_limit(
            self.config.max_waiting_requests,
            sampling.n if sampling.HasField("n") else 1,
            len(prompt_token_ids),
        )
        # A seed drawn once here keeps a request's random stream when it is preempted and
        # resumed.
        request = Request.new(
            request_id,
            prompt_token_ids,
            sampling,
            priority,
            self._num_arrivals,
            seed_if_unset=self._seed_source.getrandbits(64),
            num_resumed_tokens=num_resumed_tokens,
        )
        self._num_arrivals += 1
        self.requests[request_id] = request
        self.queues.insert(request.sequences[0], SequenceStatus.WAITING)

    def abort_request(self, request_id: str) -> list[RequestOutput] | None:
        """Finishes every unfinished completion of the request with FINISH_REASON_ABORT and
        frees its blocks (once no step in flight uses them); one output per such
        completion. None when no such request is in flight."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        unfinished = [s for s in request.sequences if s.status is not SequenceStatus.FINISHED]
        # Completions not forked yet end too, each with its own last message.
        request.end_unforked_completions(common_pb2.FINISH_REASON_ABORT)
        for sequence in unfinished:
            self.queues.remove(sequence)
            self._finish(sequence, common_pb2.FINISH_REASON_ABORT)
        outputs = [
            RequestOutput.of(s, [])
            for s in request.sequences
            if s.finish_reason == common_pb2.FINISH_REASON_ABORT
        ]
        # Only the last message ends the request's stream.
        for output in outputs[:-1]:
            output.request_finished = False
        return outputs

    def abort_all(self) -> list[RequestOutput]:
        """Aborts every request in flight, in arrival order, and starts over with the worker,
        for when its stream is over (the worker died, or shutdown): the steps in flight are
        dropped, and the next step is step 1 of a new stream that knows no seq_ids. To
        abort everything on a live stream, abort each request instead."""
        unfinished = sorted(self.requests.values(), key=lambda r: r.arrival_index)
        outputs = [o for r in unfinished for o in self.abort_request(r.request_id) or []]
        self.restart_worker_stream()
        return outputs

    def restart_worker_stream(self) -> None:
        """Starts over with the worker after its stream is gone, keeping every request: the
        steps in flight are dropped, each unfinished sequence is recomputed from its tokens,
        and the next step is step 1 of a new stream that knows no seq_ids (the next stream
        may reach a restarted worker, whose cache holds no KV)."""
        self.in_flight.abandon()
        self.preemption.requeue_all()
        self._worker_ops.clear()
        self._next_step_id = 1
        self.block_manager.reset_prefix_cache()

    def _report_event(self, event: RequestEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> scheduler_pb2.SchedulerStats:
        return scheduler_stats(self)

    # --- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput | None:
        """Builds the next step, or None when no sequence has anything to compute now (with
        steps in flight, their results may give some)."""
        if len(self.in_flight) >= self.max_steps_in_flight:
            raise RuntimeError(f"{len(self.in_flight)} steps in flight have no result yet")
        budget = self.limits.max_num_batched_tokens
        prompt_budget = self.prompt_budget.for_step()
        output = SchedulerOutput(step_id=self._next_step_id)

        num_preemptions_before = self.num_preemptions
        waits_for_blocks = False
        speculates = self.speculation.in_step(len(self.running) + len(self.waiting) + len(self.swapped))
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            index += 1
            num_new_tokens = min(sequence.num_tokens_to_schedule(self.max_model_len), budget)
            if num_new_tokens > 1:  # a chunk of its prompt (or of a recompute)
                num_new_tokens = min(num_new_tokens, prompt_budget)
            if not num_new_tokens:
                continue  # a result in flight decides what it does next, or a later step
            self.windowed_blocks.release_outside(sequence)
            planned = self.speculation.plan(sequence, num_new_tokens, budget, self.max_model_len, speculates)
            if planned is None:
                continue  # speculates once its sample in flight is back
            allocation, lookahead = planned
            granted = allocation or self.preemption.allocate_or_preempt(sequence, num_new_tokens)
            if isinstance(granted, NoRoom):
                waits_for_blocks = granted is NoRoom.BLOCKS_RETURNING
                break
            self.batcher.add(output, sequence, num_new_tokens, granted, lookahead)
            budget -= num_new_tokens + lookahead
            if num_new_tokens > 1:
                prompt_budget -= num_new_tokens

        # Blocks just taken from a preempted sequence, or about to come back from steps in
        # flight, go to the running ones on the next steps, not to a newcomer that would
        # make the same shortage happen again.
        if not waits_for_blocks and (self.num_preemptions == num_preemptions_before or not output.scheduled):
            self.admission.resume_and_admit(output, min(budget, prompt_budget), self.batcher.add)

        if not output.scheduled:
            return None
        self._worker_ops.move_into(output)
        self._next_step_id += 1
        self.num_steps += 1
        self.in_flight.add(output)
        return output

    def update_from_output(
        self, scheduled: SchedulerOutput, result: worker_pb2.StepResult
    ) -> list[RequestOutput]:
        """Applies the worker's sampled tokens of the oldest step in flight; returns an
        output for every completion that got a token (finished ones included), in batch
        order."""
        if self.in_flight.oldest is not scheduled:
            raise RuntimeError(f"step {scheduled.step_id} is not the oldest step in flight")
        # A worker that answers something else is broken; treating it as gone lets the
        # caller abort_all() and start a fresh stream. Nothing is changed before this.
        if result.step_id != scheduled.step_id:
            raise UnavailableError(f"worker answered step {result.step_id} to step {scheduled.step_id}")
        counts = sampled_counts(scheduled, result)
        self.in_flight.returned(scheduled)
        sampled = list(result.token_ids)
        next_sampled = 0

        prompt_logprobs = {entry.seq_id: entry for entry in result.prompt_logprobs}
        outputs: list[RequestOutput] = []
        for index, item in enumerate(scheduled.scheduled):
            # The result is in batch order: this item's tokens come next.
            first_sampled = next_sampled
            num_samples = item.num_samples if counts is None else counts[index]
            next_sampled += num_samples
            sequence = item.sequence
            if sequence.status is SequenceStatus.RUNNING:
                self.prefix_cache.register_computed_blocks(sequence)
            if prompt_logprobs:
                sequence.request.receive_prompt_logprobs(prompt_logprobs.get(item.seq_id))
            num_outputs = len(outputs)
            if item.num_lookahead_tokens:
                outputs.extend(
                    self.speculation.apply(sequence, sampled[first_sampled:next_sampled], self._stops)
                )
                continue
            # A sequence that finished or was aborted since expects no token: it is dropped.
            if num_samples and sequence.num_pending_samples:
                sequence.num_pending_samples -= 1
                wants_logprobs = bool(result.logprobs) and sequence.request.sampling.HasField("logprobs")
                if num_samples == 1:  # most: one token, no fork
                    sequence.token_ids.append(sampled[first_sampled])
                    output = self._after_sample(sequence)
                    if wants_logprobs:
                        output.logprobs.append(result.logprobs[first_sampled])
                    outputs.append(output)
                else:
                    forked = self._apply_first_samples(sequence, sampled[first_sampled:next_sampled])
                    if wants_logprobs:
                        # The parent's token first, then each fork's, as the draws came.
                        for output, logprobs in zip(forked, result.logprobs[first_sampled:next_sampled]):
                            output.logprobs.append(logprobs)
                    outputs.extend(forked)
                # The token may complete a block that a step in flight has computed. Only
                # a token that completes a block can leave more to register than the call
                # above found.
                if (
                    sequence.status is SequenceStatus.RUNNING
                    and not sequence.num_tokens % self.block_manager.block_size
                ):
                    self.prefix_cache.register_computed_blocks(sequence)
            if len(outputs) > num_outputs and sequence.request.prompt_logprobs is not None:
                outputs[num_outputs].prompt_logprobs = sequence.request.take_prompt_logprobs()
        return outputs

    def _apply_first_samples(self, sequence: Sequence, tokens: list[int]) -> list[RequestOutput]:
        """Forks the request's other completions from the first sample of n, one token
        each, and appends the first token to `sequence`; an output per completion."""
        children = self._fork(sequence, tokens[1:])
        sequence.token_ids.append(tokens[0])
        return [self._after_sample(completion) for completion in (sequence, *children)]

    def _after_sample(self, sequence: Sequence) -> RequestOutput:
        """Finishes a sequence whose new last token stops it; its output either way. It may
        have been preempted since the step that sampled the token was sent."""
        self._stops(sequence)
        return RequestOutput.of(sequence, [sequence.token_ids[-1]])

    def _stops(self, sequence: Sequence) -> bool:
        """Counts the sequence's new last token; finishes it when that token stops it."""
        self.num_generation_tokens += 1
        stop_reason = sequence.stop_reason(self.eos_token_ids, self.max_model_len)
        if stop_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
            return False
        self.queues.remove(sequence)
        self._finish(sequence, stop_reason)
        return True

    # --- preempting, forking, finishing -------------------------------------------------

    def preempt(self, sequence: Sequence, mode: PreemptionMode | None = None) -> None:
        """Preempts a running sequence now (see Preemption.preempt)."""
        self.preemption.preempt(sequence, mode)

    def _fork(self, parent: Sequence, first_tokens: list[int]) -> list[Sequence]:
        """Completions 1..n-1 of the parent's request, each starting from the prompt the
        parent computed and its own first token, holding the parent's blocks. A parent
        preempted while its sample was in flight holds none: they start over with it."""
        children = []
        for index, token_id in enumerate(first_tokens, start=1):
            child = parent.fork(index, token_id)
            if parent.status is SequenceStatus.RUNNING:
                self.block_manager.fork(parent, child)
            parent.request.sequences.append(child)
            self.queues.insert(child, parent.status)
            children.append(child)
        # The parent is introduced anew too: whichever sharer writes into the shared last
        # prompt block first then gets a private copy, and a table the worker knows never
        # changes under it.
        self._worker_ops.forget(parent)
        return children

    def _finish(self, sequence: Sequence, finish_reason: common_pb2.FinishReason) -> None:
        """Takes a sequence already out of every queue out of the scheduler."""
        self._worker_ops.forget(sequence)
        self.in_flight.free(sequence)
        self._worker_ops.cancel_swap_out(sequence.cpu_block_table)
        self.cpu_pool.free(sequence.cpu_block_table)
        sequence.cpu_block_table = []
        # Whatever steps in flight still sample for it is dropped.
        sequence.num_pending_samples = 0
        sequence.speculating = False
        sequence.status = SequenceStatus.FINISHED
        sequence.finish_reason = finish_reason
        request = sequence.request
        if request.finished:
            del self.requests[request.request_id]
            self.num_prompt_tokens += request.num_prompt_tokens
