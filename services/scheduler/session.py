"""One frontend's Session stream: many requests on one long-lived stream. Submits and
aborts come in; each step's outputs of all the stream's requests go out in one message,
since gRPC costs tens of microseconds per message whatever it carries.

Each request gets its own span here, continuing the trace the submit carries, because the
stream itself belongs to no single request."""

import asyncio
from collections.abc import AsyncIterator
from functools import partial

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from pagedserve.v1 import common_pb2, scheduler_pb2

from services.common.call_frame import status_of
from services.common.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from services.common.telemetry import span_context_of, tracer
from services.scheduler.coalescing import Frontend
from services.scheduler.engine import Engine
from services.scheduler.outputs import RequestOutput
from services.scheduler.submit_checks import checked_prompt

REQUEST_SPAN = "scheduler.request"


def _parent_context(traceparent: str) -> Context:
    parent = span_context_of(traceparent)
    return trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent is not None else Context()


def _error_update(request_id: str, handle: int, error: Exception) -> scheduler_pb2.RequestUpdate:
    code, message = status_of(error)
    return scheduler_pb2.RequestUpdate(
        request_id=request_id,
        handle=handle,
        error=scheduler_pb2.RequestError(code=code.value[0], message=message),
    )


class SchedulerSession:
    def __init__(self, engine: Engine, model: common_pb2.ModelInfo) -> None:
        self._engine = engine
        self._model = model
        # The stream's requests in flight, and their spans.
        self._spans: dict[str, trace.Span] = {}
        self._updates: list[scheduler_pb2.RequestUpdate] = []
        # Set when there are updates to send, the incoming side has ended, or draining began.
        self._wake = asyncio.Event()
        # The scheduler is shutting down: no new requests; the stream ends with its last.
        self._draining = False
        # The group whose stream-message budget the stream's requests share.
        self.frontend = Frontend()

    def handle(self, message: scheduler_pb2.SessionRequest) -> None:
        action = message.WhichOneof("action")
        if action == "submit":
            self._submit(message.submit)
        elif action == "abort":
            # Only this stream's requests: another frontend's ids are not its to abort.
            if message.abort.request_id in self._spans:
                self._engine.abort_request(message.abort.request_id)
        elif action == "load":
            self.frontend.keeps_up = message.load.keeps_up
        else:
            raise InvalidArgumentError("action", "a session message must hold a submit, an abort or a load")

    def _submit(self, submit: scheduler_pb2.SessionSubmit) -> None:
        request = submit.request
        request_id = request.request_id
        span = tracer().start_span(
            REQUEST_SPAN,
            context=_parent_context(submit.traceparent),
            kind=SpanKind.SERVER,
            attributes={"gen_ai.request.id": request_id},
        )
        try:
            if self._draining:
                raise UnavailableError("the scheduler is shutting down; send the request to another one")
            prompt = checked_prompt(request, self._model.vocab_size)
            self._engine.add_request(
                request_id,
                prompt,
                request.sampling,
                request.priority,
                deliver=partial(self._on_output, request_id, submit.handle),
                span=span,
                num_resumed_tokens=request.num_resumed_tokens,
                group=self.frontend,
            )
        except (InvalidArgumentError, ResourceExhaustedError, UnavailableError) as error:
            self._end_span(span, error)
            self._push(_error_update(request_id, submit.handle, error))
            return
        self._spans[request_id] = span

    def _on_output(self, request_id: str, handle: int, output: RequestOutput | Exception) -> None:
        if isinstance(output, Exception):
            self._end_span(self._spans.pop(request_id, trace.INVALID_SPAN), output)
            self._push(_error_update(request_id, handle, output))
            return
        if output.request_finished:
            self._end_span(self._spans.pop(request_id, trace.INVALID_SPAN))
        self._push(
            scheduler_pb2.RequestUpdate(request_id=request_id, handle=handle, output=output.to_proto())
        )

    def _push(self, update: scheduler_pb2.RequestUpdate) -> None:
        self._updates.append(update)
        self._wake.set()

    @staticmethod
    def _end_span(span: trace.Span, error: Exception | None = None) -> None:
        if error is not None:
            code, message = status_of(error)
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))
        span.end()

    def incoming_ended(self, _: object = None) -> None:
        self._wake.set()

    def drain(self) -> None:
        """Refuses new requests from now on and ends the stream once those in flight end."""
        self._draining = True
        self._wake.set()

    async def responses(self, incoming: asyncio.Future[None]) -> AsyncIterator[scheduler_pb2.SessionResponse]:
        """Everything pushed since the last message, in one message, each time there is
        some; ends once `incoming` (the task reading the stream) has ended or draining has
        begun, and no request of the stream is left; raises what ended `incoming` if it
        failed."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._updates:
                updates, self._updates = self._updates, []
                yield scheduler_pb2.SessionResponse(updates=updates)
            if incoming.done():
                incoming.result()
            # Updates pushed while the last message was being sent (a request's final
            # tokens among them) go out before the stream ends.
            if (incoming.done() or self._draining) and not self._spans and not self._updates:
                return

    def close(self) -> None:
        """The stream is over: its requests still in flight are aborted, their blocks freed."""
        for request_id in list(self._spans):
            self._engine.abort_request(request_id)
        for span in self._spans.values():
            span.end()
        self._spans.clear()
