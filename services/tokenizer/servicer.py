"""The public API's gRPC face: decode, call the frontend and the scheduler, encode."""

from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2

from services.common.errors import UnavailableError
from services.common.telemetry import traceparent_of, tracer
from services.tokenizer.frontend import RequestFrontend
from services.tokenizer.scheduler_session import SessionClient, raise_if_error
from services.tokenizer.tracing import RequestTrace


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, session: SessionClient) -> None:
        self._session = session
        # Set once the scheduler has told what model it serves.
        self.frontend: RequestFrontend | None = None
        self.model = common_pb2.ModelInfo()

    @property
    def _frontend(self) -> RequestFrontend:
        if self.frontend is None:
            raise UnavailableError("waiting for the scheduler to report its model")
        return self.frontend

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        with tracer().start_as_current_span("tokenize"):
            prepared = self._frontend.prepare_generate(request)
        request_trace = RequestTrace(trace.get_current_span(), self.model, request, prepared)
        completions = self._frontend.new_completions(prepared)
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

    async def Tokenize(
        self, request: generation_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.TokenizeResponse:
        return self._frontend.tokenize(request)

    async def Detokenize(
        self, request: generation_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.DetokenizeResponse:
        return self._frontend.detokenize(request)

    async def GetModelInfo(
        self, request: common_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        self._frontend  # noqa: B018 - raises UNAVAILABLE until the scheduler reported its model
        return self.model
