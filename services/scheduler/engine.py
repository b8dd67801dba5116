"""The continuous-batching loop: asks the scheduler for a step, sends it down the workers'
long-lived step streams, feeds the sampled tokens back and hands each request its output."""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import trace
from pagedserve.v1 import common_pb2, worker_pb2

from services.common.errors import UnavailableError
from services.common.telemetry import traceparent_of
from services.scheduler.coalescing import OutputCoalescer
from services.scheduler.metrics import RequestTimes, SchedulerMetrics, record_request_span
from services.scheduler.outputs import RequestEvent, SchedulerOutput
from services.scheduler.scheduler import RequestOutput, Scheduler
from services.scheduler.worker_group import GroupStepStream, WorkerGroup, WorkerGroupError
from services.scheduler.worker_watch import WorkerWatchConfig

log = logging.getLogger(__name__)


# Takes each output of one request, in order, up to the one that finishes it, or the error
# that ends it instead.
Deliver = Callable[[RequestOutput | Exception], None]


@dataclass
class RequestStream:
    """Where one request's outputs go, and what its trace and metrics need to know."""

    deliver: Deliver
    finished: bool = False
    times: RequestTimes = field(default_factory=RequestTimes)
    # The request's span: the scheduler's events about the request go on it.
    span: trace.Span = trace.INVALID_SPAN
    # W3C traceparent of that span, handed to the worker for its step spans; empty while
    # the request is not traced.
    traceparent: str = ""
    # Whose stream-message budget the request's messages count against: the frontend
    # that streams them (services/scheduler/coalescing.py).
    group: Hashable = None


# How often a scheduler whose workers failed asks whether they serve again, at most.
_RECOVERY_POLL_S = 1.0
# How often it says that it is still waiting.
_RECOVERY_REPORT_S = 10.0

# Told False when the workers fail and True once they serve again.
ReportServing = Callable[[bool], Awaitable[None]]


async def _ignore_serving(serving: bool) -> None:
    pass


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        workers: WorkerGroup,
        metrics: SchedulerMetrics | None = None,
        report_serving: ReportServing = _ignore_serving,
        watch: WorkerWatchConfig | None = None,
    ) -> None:
        self.scheduler = scheduler
        self._workers = workers
        self._metrics = metrics
        self._report_serving = report_serving
        self._watch = watch or WorkerWatchConfig()
        # Why the workers cannot take requests now; None while they can.
        self.worker_failure: UnavailableError | None = None
        self._streams: dict[str, RequestStream] = {}
        self._has_work = asyncio.Event()
        self._coalescer = OutputCoalescer(scheduler.config.max_stream_messages_per_step, self._group_of)
        scheduler.on_event = self._on_event

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: common_pb2.SamplingParams,
        priority: int,
        deliver: Deliver,
        span: trace.Span = trace.INVALID_SPAN,
        num_resumed_tokens: int = 0,
        group: Hashable = None,
    ) -> RequestStream:
        """Queues a request whose outputs go to `deliver`, counted against `group`'s
        stream-message budget; raises InvalidArgumentError or ResourceExhaustedError when
        the scheduler refuses it, UnavailableError while the workers are down."""
        if self.worker_failure is not None:
            raise UnavailableError(f"{self.worker_failure}; waiting for the workers to serve again")
        self.scheduler.add_request(request_id, prompt_token_ids, sampling, priority, num_resumed_tokens)
        traceparent = traceparent_of(span) if span.is_recording() else ""
        stream = RequestStream(deliver=deliver, span=span, traceparent=traceparent, group=group)
        self._streams[request_id] = stream
        span.add_event("queued")
        self._has_work.set()
        return stream

    def abort_request(self, request_id: str) -> bool:
        outputs = self.scheduler.abort_request(request_id)
        if outputs is None:
            return False
        for output in self._coalescer.add(outputs):
            self._deliver(output)
        return True

    def _group_of(self, request_id: str) -> Hashable:
        stream = self._streams.get(request_id)
        return stream.group if stream is not None else None

    def _on_event(self, event: RequestEvent) -> None:
        stream = self._streams.get(event.request_id)
        if stream is not None:
            stream.span.add_event(event.name, event.attributes)

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        now = time.monotonic()
        num_new_tokens = len(output.new_token_ids)
        gap = stream.times.record_tokens(num_new_tokens, now)
        if num_new_tokens and stream.times.num_tokens == num_new_tokens:
            stream.span.add_event("first_token")
        if self._metrics is not None:
            self._metrics.on_tokens(stream.times, num_new_tokens, gap)
            if output.request_finished:
                self._metrics.on_finished(stream.times, output.finish_reason, now)
        if output.request_finished:
            stream.finished = True
            del self._streams[output.request_id]
            # Before the last output leaves: its receiver may end the span right after.
            record_request_span(stream.span, stream.times, output)
        stream.deliver(output)

    def _step_request(self, scheduled: SchedulerOutput) -> worker_pb2.StepRequest:
        """The step's message, with the trace context of each request the worker meets for
        the first time; and the first step of each request ends its queue time."""
        step = scheduled.to_proto()
        now = time.monotonic()
        request_of_seq = {}
        for entry in scheduled.scheduled:
            stream = self._streams.get(entry.sequence.request_id)
            if stream is None:
                continue
            request_of_seq[entry.seq_id] = stream
            if stream.times.first_scheduled is None:
                stream.times.first_scheduled = now
                stream.span.add_event("scheduled")
                if self._metrics is not None:
                    self._metrics.queue_time.observe(now - stream.times.arrival)
        for new_sequence in step.new_sequences:
            stream = request_of_seq.get(new_sequence.seq_id)
            if stream is not None:
                new_sequence.traceparent = stream.traceparent
        return step

    def _fail_all(self, error: Exception) -> None:
        self._coalescer.clear()
        self.scheduler.abort_all()
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.deliver(error)

    async def run(self) -> None:
        """Runs steps while there is work; sleeps when there is none. When a worker fails
        (its step stream breaks, or it stops answering: services/scheduler/worker_watch.py)
        every request in flight stays: each is recomputed from its tokens once every rank
        serves again, and its stream goes on. Meanwhile new requests are refused and
        health says NOT_SERVING; requests held longer than the recovery timeout fail with
        UNAVAILABLE."""
        while True:
            error = await self._serve_until_failure()
            log.error(
                "workers failed: %s; %d requests wait to be recomputed",
                error,
                len(self.scheduler.requests),
            )
            self.worker_failure = error
            if self._metrics is not None:
                self._metrics.worker_failures.inc()
            for output in self._coalescer.flush():
                self._deliver(output)
            self.scheduler.restart_worker_stream()
            await self._recover()
            if self.scheduler.has_unfinished_requests():
                self._has_work.set()

    async def _serve_until_failure(self) -> UnavailableError:
        """Runs steps on a new step stream while every rank answers; returns why that ended."""
        steps = self._workers.open_steps()
        stepping = asyncio.ensure_future(self._run_steps(steps))
        watching = asyncio.ensure_future(self._workers.watch(self._watch.timeout_s))
        try:
            done, _ = await asyncio.wait({stepping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stepping.cancel()
            watching.cancel()
            steps.cancel()
            # Tokens already applied reach their requests before they are requeued.
            await asyncio.gather(stepping, watching, return_exceptions=True)
        error = next(iter(done)).exception()
        if isinstance(error, UnavailableError):
            return error
        raise error if error is not None else RuntimeError("the step loop ended")

    async def _recover(self) -> None:
        """Reports NOT_SERVING until every rank serves again (their supervisor restarts
        the ranks that failed) with a KV pool at least as large as the scheduler's."""
        await self._report_serving(False)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._watch.recovery_timeout_s
        next_report = loop.time()
        while True:
            if self._streams and loop.time() > give_up_at:
                self._fail_all(
                    UnavailableError(
                        f"{self.worker_failure}; the workers did not serve again within "
                        f"{self._watch.recovery_timeout_s:g}s"
                    )
                )
            try:
                await self._workers.wait_until_serving(_RECOVERY_POLL_S)
                info = await self._workers.describe()
            except (UnavailableError, WorkerGroupError, grpc.aio.AioRpcError) as error:
                if loop.time() >= next_report:
                    next_report = loop.time() + _RECOVERY_REPORT_S
                    log.warning("waiting for the workers to serve again: %s", error)
                continue
            if info.num_kv_blocks >= self.scheduler.stats().num_total_blocks:
                break
            log.error("the workers came back with %d KV blocks, fewer than before", info.num_kv_blocks)
            await asyncio.sleep(_RECOVERY_POLL_S)
        log.info("workers serving again; recomputing %d requests", len(self.scheduler.requests))
        if self._metrics is not None:
            self._metrics.requests_recomputed.inc(len(self.scheduler.requests))
        self.worker_failure = None
        await self._report_serving(True)

    async def _run_steps(self, call: GroupStepStream) -> None:
        """Keeps up to the scheduler's max_steps_in_flight steps on the worker: with
        overlap, step N+1 is planned and sent while the worker runs step N, so that the
        worker finds its next step waiting when it finishes one."""
        # The read of the next result is always pending, also while idle: see _idle.
        next_result = asyncio.ensure_future(call.read())
        in_flight: deque[tuple[SchedulerOutput, float]] = deque()
        undelivered: list[RequestOutput] = []
        try:
            while True:
                while len(in_flight) < self.scheduler.max_steps_in_flight:
                    scheduled = self.scheduler.schedule()
                    if scheduled is None:
                        break
                    in_flight.append((scheduled, time.monotonic()))
                    await call.write(self._step_request(scheduled))
                # Outputs go to their requests once the next step is on its way.
                for output in undelivered:
                    self._deliver(output)
                undelivered = []
                if not in_flight:
                    self._has_work.clear()
                    await self._idle(next_result)
                    continue
                result = await next_result
                scheduled, started = in_flight.popleft()
                if self._metrics is not None:
                    self._metrics.on_step(len(scheduled.scheduled), time.monotonic() - started)
                next_result = asyncio.ensure_future(call.read())
                undelivered = self._coalescer.pace(self.scheduler.update_from_output(scheduled, result))
        finally:
            next_result.cancel()
            # Tokens already applied reach their requests even when the stream breaks.
            for output in undelivered:
                self._deliver(output)

    async def _idle(self, next_result: asyncio.Future[Any]) -> None:
        """Waits for work. The worker sends nothing unasked, so a read that completes
        meanwhile means the stream ended (a dropped connection, a restarted worker): it is
        replaced before any request depends on it."""
        work = asyncio.ensure_future(self._has_work.wait())
        try:
            await asyncio.wait({work, next_result}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.cancel()
        if next_result.done():
            next_result.result()  # raises the stream's error
            raise UnavailableError("a worker answered a step it was not sent")
