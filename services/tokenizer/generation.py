"""One Generate request's way through the tokenizer process, whichever API it came in by:
validate and tokenize, route it to an engine and send it on that engine's session, turn
the ids that come back into text messages, move it to another engine if its engine fails,
and abort it at the scheduler if the caller leaves early."""

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2

from services.common.errors import UnavailableError
from services.common.telemetry import traceparent_of, tracer
from services.tokenizer.completion import Completions
from services.tokenizer.engine_pool import EnginePool
from services.tokenizer.frontend import RequestFrontend
from services.tokenizer.migration import (
    EngineStoppedServing,
    MigrationConfig,
    ResumableRequest,
    is_engine_failure,
)
from services.tokenizer.routing import NoEngineError
from services.tokenizer.routing_metrics import RoutingMetrics
from services.tokenizer.scheduler_session import raise_if_error
from services.tokenizer.tracing import RequestTrace

Request = TypeVar("Request")
Reply = TypeVar("Reply")

TOKENIZER_THREADS = 2


class GenerationCore:
    """What the gRPC servicer and the HTTP API share: the engines and, once one has told
    what model it serves, the frontend."""

    def __init__(
        self,
        engines: EnginePool,
        migration: MigrationConfig | None = None,
        metrics: RoutingMetrics | None = None,
    ) -> None:
        self._engines = engines
        self._migration = migration or MigrationConfig()
        self._metrics = metrics or RoutingMetrics(registry=None)
        # Set once an engine has told what model it serves.
        self.frontend: RequestFrontend | None = None
        self.model = common_pb2.ModelInfo()
        # Few threads: they bound how many prompts are tokenized, and held in memory as
        # tokens and offsets, at once; the others wait their turn.
        self._tokenizer_threads = ThreadPoolExecutor(
            max_workers=TOKENIZER_THREADS, thread_name_prefix="tokenize"
        )

    @property
    def ready_frontend(self) -> RequestFrontend:
        if self.frontend is None:
            raise UnavailableError("waiting for the scheduler to report its model")
        return self.frontend

    async def generate(
        self, request: generation_pb2.GenerateRequest
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """The client's messages for `request`, the last one of each completion with its
        finish reason and usage. Raises InvalidArgumentError before anything is sent, and
        what the scheduler refused or failed the request with."""
        frontend = self.ready_frontend
        with tracer().start_as_current_span("tokenize"), self._engines.intake.taking_in():
            prepared = await self._off_loop(frontend.prepare_generate, request)
        request_trace = RequestTrace(trace.get_current_span(), self.model, request, prepared)
        completions = frontend.new_completions(prepared)
        submit = scheduler_pb2.SubmitRequest(
            request_id=prepared.request_id,
            prompt_token_ids=prepared.prompt_token_ids,
            sampling=prepared.sampling,
            priority=request.priority,
        )
        resumable = ResumableRequest(submit, self._migration)
        # What made the request leave its last engine, if it did.
        failure: Exception | None = None
        # Started, not made current: this generator may be closed by another task than
        # the one that began it, which could not detach a context attached here.
        span = tracer().start_span("detokenize_stream")
        try:
            while not completions.finished:
                try:
                    async for message in self._stream(resumable, completions, span, request_trace):
                        yield message
                except NoEngineError as error:
                    if failure is None:
                        raise
                    await self._wait_for_engine(failure, error)
                except Exception as error:
                    if not is_engine_failure(error):
                        raise
                    resumable.migrate(error)
                    failure = error
        except Exception as error:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
            raise
        finally:
            span.end()
            request_trace.end()

    async def tokenize(self, request: generation_pb2.TokenizeRequest) -> generation_pb2.TokenizeResponse:
        return await self._off_loop(self.ready_frontend.tokenize, request)

    async def detokenize(
        self, request: generation_pb2.DetokenizeRequest
    ) -> generation_pb2.DetokenizeResponse:
        return await self._off_loop(self.ready_frontend.detokenize, request)

    async def _off_loop(self, work: Callable[[Request], Reply], request: Request) -> Reply:
        """Runs tokenizer work on its threads, so that a long prompt does not stall the
        loop that streams every other request (the tokenizer releases the GIL)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_threads, work, request)

    async def _wait_for_engine(self, failure: Exception, error: NoEngineError) -> None:
        """A request that left a failed engine waits for one to serve: another, or the same
        one once it is restarted (a single engine's scheduler that comes back at its
        address is where the request moves to)."""
        wait_s = self._migration.engine_wait_s
        if not await self._engines.wait_until_available(wait_s):
            raise UnavailableError(
                f"{failure}; no engine served within {wait_s:g}s to move the request to"
            ) from error

    async def _stream(
        self,
        resumable: ResumableRequest,
        completions: Completions,
        span: trace.Span,
        request_trace: RequestTrace,
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """The request's messages from one engine, until it finishes or the engine fails
        (raised, after marking the engine failed)."""
        submit = resumable.submit_request()
        engine, decision = self._engines.choose(submit.prompt_token_ids)
        self._metrics.on_routed(engine.address, decision.reason)
        span.set_attributes(
            {
                "pagedserve.engine": engine.address,
                "pagedserve.route.reason": decision.reason,
                "pagedserve.route.matched_blocks": decision.matched_blocks,
                "pagedserve.route.load": decision.load,
            }
        )
        # The trace context travels with the request, making the scheduler's span a child.
        updates = engine.session.submit(submit, traceparent_of(span) if span.is_recording() else "")
        try:
            while not completions.finished:
                update = await updates.get()
                if isinstance(update, EngineStoppedServing):
                    # Its scheduler recomputes it once the workers are back, unless it can
                    # go on elsewhere now.
                    if not any(other is not engine for other in self._engines.available()):
                        continue
                    raise update
                if isinstance(update, Exception):
                    raise update
                raise_if_error(update)
                resumable.on_output(update.output)
                message = completions.on_tokens(update.output)
                if message is not None:
                    request_trace.on_message(message)
                    yield message
        except Exception as error:
            if is_engine_failure(error):
                engine.on_failure(str(error))
                self._metrics.on_migrated(engine.address)
                span.add_event(
                    "migrated",
                    {
                        "pagedserve.migration.from_engine": engine.address,
                        "pagedserve.migration.reason": str(error),
                        "pagedserve.migration.resumed_tokens": len(resumable.generated),
                    },
                )
            raise
        finally:
            # The client went away (cancel, deadline) or stop strings finished the
            # request early: the scheduler aborts it and frees its blocks.
            engine.session.release(submit.request_id, abort=not completions.ended_by_scheduler)
