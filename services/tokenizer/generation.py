"""One Generate request's way through the tokenizer process, whichever API it came in by:
validate and tokenize, send it on the shared scheduler session, turn the ids that come
back into text messages, and abort it at the scheduler if the caller leaves early."""

from collections.abc import AsyncIterator

from opentelemetry import trace
from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2

from services.common.errors import UnavailableError
from services.common.telemetry import traceparent_of, tracer
from services.tokenizer.frontend import RequestFrontend
from services.tokenizer.scheduler_session import SessionClient, raise_if_error
from services.tokenizer.tracing import RequestTrace


class GenerationCore:
    """What the gRPC servicer and the HTTP API share: the scheduler session and, once the
    scheduler has told what model it serves, the frontend."""

    def __init__(self, session: SessionClient) -> None:
        self._session = session
        # Set once the scheduler has told what model it serves.
        self.frontend: RequestFrontend | None = None
        self.model = common_pb2.ModelInfo()

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
        with tracer().start_as_current_span("tokenize"):
            prepared = frontend.prepare_generate(request)
        request_trace = RequestTrace(trace.get_current_span(), self.model, request, prepared)
        completions = frontend.new_completions(prepared)
        submit = scheduler_pb2.SubmitRequest(
            request_id=prepared.request_id,
            prompt_token_ids=prepared.prompt_token_ids,
            sampling=prepared.sampling,
            priority=request.priority,
        )
        with tracer().start_as_current_span("detokenize_stream") as span:
            # The trace context travels with the request, making the scheduler's span a child.
            updates = self._session.submit(submit, traceparent_of(span) if span.is_recording() else "")
            try:
                while not completions.finished:
                    update = await updates.get()
                    if isinstance(update, Exception):
                        raise update
                    raise_if_error(update)
                    message = completions.on_tokens(update.output)
                    if message is not None:
                        request_trace.on_message(message)
                        yield message
            finally:
                # The client went away (cancel, deadline) or stop strings finished the
                # request early: the scheduler aborts it and frees its blocks.
                self._session.release(prepared.request_id, abort=not completions.ended_by_scheduler)
                request_trace.end()
