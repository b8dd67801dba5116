"""Continuous batching with one rule: each step, every sequence it schedules catches up
its num_computed_tokens toward len(token_ids), within the step's token budget.

Prefill, chunked prefill, decode and recompute after preemption are that rule applied to
different gaps. When a sequence's computation reaches the end of its tokens the worker
samples one more, and the gap opens again by one.

One step is in flight at a time: schedule(), then update_from_output() with its result.
"""

import bisect
from collections.abc import Sequence

from pagedserve.v1 import common_pb2, scheduler_pb2, worker_pb2

from services.common.errors import InvalidArgumentError, UnavailableError
from services.scheduler.block_manager import BlockManager
from services.scheduler.config import SchedulerConfig
from services.scheduler.outputs import (
    NewSequenceData,
    RequestOutput,
    ScheduledSequenceData,
    SchedulerOutput,
)
from services.scheduler.request import Request, RequestStatus

__all__ = ["Scheduler", "SchedulerConfig", "SchedulerOutput", "RequestOutput"]


def _arrival(request: Request) -> int:
    return request.arrival_index


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        eos_token_ids: Sequence[int],
    ) -> None:
        if config.num_kv_blocks is not None:
            num_blocks = min(num_blocks, config.num_kv_blocks)
        self.config = config
        self.block_manager = BlockManager(num_blocks, block_size)
        # A sequence longer than the whole pool could never run, even alone; stopping it
        # there keeps every admitted request able to finish.
        self.max_model_len = min(max_model_len, num_blocks * block_size)
        self.eos_token_ids = frozenset(eos_token_ids)

        self.requests: dict[str, Request] = {}
        # Both queues are sorted by arrival. Admission is first come first served, so
        # preempted requests (admitted earlier) sort ahead of never-admitted ones.
        self.waiting: list[Request] = []
        self.running: list[Request] = []

        self._num_arrivals = 0
        self._next_seq_id = 1
        self._next_step_id = 1
        self._in_flight: SchedulerOutput | None = None
        # seq_ids the worker must forget in the next step.
        self._finished_seq_ids: list[int] = []

        self.num_preemptions = 0
        self.num_steps = 0

    # --- requests in and out -------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling: common_pb2.SamplingParams
    ) -> None:
        if request_id in self.requests:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already in flight")
        if not prompt_token_ids:
            raise InvalidArgumentError("prompt_token_ids", "the prompt is empty")
        # The prompt plus the first sampled token must fit the model and the KV pool.
        if len(prompt_token_ids) + 1 > self.max_model_len:
            raise InvalidArgumentError(
                "prompt_token_ids",
                f"{len(prompt_token_ids)} prompt tokens leave no room to generate within "
                f"{self.max_model_len} tokens (model length and KV cache size)",
            )
        if sampling.HasField("max_tokens") and sampling.max_tokens < 1:
            raise InvalidArgumentError(
                "sampling.max_tokens", f"must be at least 1, got {sampling.max_tokens}"
            )
        own_sampling = common_pb2.SamplingParams()
        own_sampling.CopyFrom(sampling)
        request = Request(
            request_id=request_id,
            token_ids=list(prompt_token_ids),
            num_prompt_tokens=len(prompt_token_ids),
            sampling=own_sampling,
            arrival_index=self._num_arrivals,
        )
        self._num_arrivals += 1
        self.requests[request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finishes the request with FINISH_REASON_ABORT and frees its blocks now.
        None when no such request is in flight."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, common_pb2.FINISH_REASON_ABORT)
        return RequestOutput.of(request, [])

    def abort_all(self) -> list[RequestOutput]:
        """Aborts every request in flight, in arrival order, and starts over with the worker.

        For when the worker stream is over (the worker died, or shutdown): the step in
        flight is dropped, and the next step is step 1 of a new stream that knows no
        seq_ids. To abort everything on a live stream, abort each request instead.
        """
        in_flight = sorted(self.requests.values(), key=_arrival)
        outputs = [self.abort_request(r.request_id) for r in in_flight]
        self._in_flight = None
        self._finished_seq_ids.clear()
        self._next_step_id = 1
        return [o for o in outputs if o is not None]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> scheduler_pb2.SchedulerStats:
        return scheduler_pb2.SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_total_blocks=self.block_manager.num_total_blocks,
            num_free_blocks=self.block_manager.num_free_blocks,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
        )

    # --- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput | None:
        """Builds the next step, or None when no request has anything to compute."""
        if self._in_flight is not None:
            raise RuntimeError(f"step {self._in_flight.step_id} has no result yet")
        budget = self.config.max_num_batched_tokens
        output = SchedulerOutput(step_id=self._next_step_id)

        # Running sequences first, oldest first; the newest give up their blocks if needed.
        num_preemptions_before = self.num_preemptions
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new_tokens = min(request.num_tokens_to_compute, budget)
            new_block_ids = self._allocate_or_preempt(request, num_new_tokens)
            if new_block_ids is None:
                break  # it preempted itself, and every sequence after it is gone too
            output.scheduled.append(self._scheduled(request, num_new_tokens, new_block_ids))
            budget -= num_new_tokens
            index += 1

        # Blocks just taken from a preempted sequence go to the running ones on the next
        # steps, not to a newcomer that would make the same shortage happen again.
        if self.num_preemptions == num_preemptions_before:
            self._admit_waiting(output, budget)

        if not output.scheduled:
            return None
        output.finished_seq_ids = self._finished_seq_ids
        self._finished_seq_ids = []
        self._next_step_id += 1
        self.num_steps += 1
        self._in_flight = output
        return output

    def update_from_output(
        self, scheduled: SchedulerOutput, result: worker_pb2.StepResult
    ) -> list[RequestOutput]:
        """Applies the worker's sampled tokens; returns an output for every request that got
        a token (finished ones included), in batch order."""
        if self._in_flight is not scheduled:
            raise RuntimeError(f"step {scheduled.step_id} is not the step in flight")
        # A worker that answers something else is broken; treating it as gone lets the
        # caller abort_all() and start a fresh stream. Nothing is changed before this.
        if result.step_id != scheduled.step_id:
            raise UnavailableError(f"worker answered step {result.step_id} to step {scheduled.step_id}")
        if len(result.seq_ids) != len(result.token_ids) or sorted(result.seq_ids) != sorted(
            scheduled.sampling_seq_ids
        ):
            raise UnavailableError(
                f"worker answered step {scheduled.step_id} with {len(result.token_ids)} tokens for "
                f"seq_ids {list(result.seq_ids)}, expected one token each for "
                f"{scheduled.sampling_seq_ids}"
            )
        self._in_flight = None
        sampled = dict(zip(result.seq_ids, result.token_ids))

        outputs: list[RequestOutput] = []
        for item in scheduled.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING or request.seq_id != item.seq_id:
                continue  # aborted while the step ran
            request.num_computed_tokens += item.num_new_tokens
            if not item.samples_token:
                continue  # a prompt chunk; the rest follows in later steps
            token_id = sampled[item.seq_id]
            request.token_ids.append(token_id)
            stop_reason = request.stop_reason(self.eos_token_ids, self.max_model_len)
            if stop_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                self.running.remove(request)
                self._finish(request, stop_reason)
            outputs.append(RequestOutput.of(request, [token_id]))
        return outputs

    # --- helpers -------------------------------------------------------------------------

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Blocks for a running request, preempting the newest running requests until they
        fit. None if it had to preempt itself.

        Running requests are scheduled oldest first, so the newest ones are never already
        in this step's batch, unless the newest is `request` itself.
        """
        while True:
            new_block_ids = self.block_manager.allocate_slots(request, num_new_tokens)
            if new_block_ids is not None:
                return new_block_ids
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return None

    def _admit_waiting(self, output: SchedulerOutput, budget: int) -> None:
        """First come first served: stops at the first request that does not fit, so that a
        large request is not overtaken forever by small ones."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new_tokens = min(request.num_tokens_to_compute, budget)
            if self.block_manager.allocate_slots(request, num_new_tokens) is None:
                return
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            request.seq_id = self._next_seq_id
            self._next_seq_id += 1
            bisect.insort(self.running, request, key=_arrival)
            output.new_sequences.append(
                NewSequenceData(
                    seq_id=request.seq_id,
                    token_ids=tuple(request.token_ids),
                    num_computed_tokens=request.num_computed_tokens,
                    sampling=request.sampling,
                )
            )
            # A sequence new to the worker brings its whole block table.
            output.scheduled.append(self._scheduled(request, num_new_tokens, request.block_table))
            budget -= num_new_tokens

    @staticmethod
    def _scheduled(
        request: Request, num_new_tokens: int, new_block_ids: list[int]
    ) -> ScheduledSequenceData:
        assert request.seq_id is not None
        return ScheduledSequenceData(
            request=request,
            seq_id=request.seq_id,
            num_new_tokens=num_new_tokens,
            new_block_ids=tuple(new_block_ids),
            samples_token=request.num_computed_tokens + num_new_tokens == request.num_tokens,
        )

    def _preempt(self, request: Request) -> None:
        """Recompute later: drop the KV, keep the tokens, queue ahead of new arrivals."""
        self.running.remove(request)
        self._forget_on_worker(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=_arrival)
        self.num_preemptions += 1

    def _finish(self, request: Request, finish_reason: int) -> None:
        """Takes a request already out of both queues out of the scheduler."""
        self._forget_on_worker(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = finish_reason
        del self.requests[request.request_id]

    def _forget_on_worker(self, request: Request) -> None:
        self.block_manager.free(request)
        if request.seq_id is not None:
            self._finished_seq_ids.append(request.seq_id)
            request.seq_id = None
