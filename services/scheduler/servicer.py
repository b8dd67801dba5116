"""The scheduler's gRPC face: decode, call the engine, encode."""

from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.common.errors import InvalidArgumentError, UnavailableError
from services.scheduler.engine import Engine
from services.scheduler.metrics import record_request_span


def check_prompt(prompt_token_ids: list[int], model: common_pb2.ModelInfo) -> None:
    """The scheduler trusts no caller blindly: the worker would index out of bounds."""
    if not prompt_token_ids:
        raise InvalidArgumentError("prompt_token_ids", "must hold at least one token")
    if len(prompt_token_ids) >= model.max_model_len:
        raise InvalidArgumentError(
            "prompt_token_ids",
            f"{len(prompt_token_ids)} tokens leave no room to generate within max_model_len {model.max_model_len}",
        )
    for i, token_id in enumerate(prompt_token_ids):
        if not 0 <= token_id < model.vocab_size:
            raise InvalidArgumentError(
                f"prompt_token_ids[{i}]", f"{token_id} is outside the vocabulary [0, {model.vocab_size})"
            )


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.model = common_pb2.ModelInfo()

    def _ready_engine(self) -> Engine:
        if self.engine is None:
            raise UnavailableError("the scheduler is waiting for its worker")
        return self.engine

    async def Submit(
        self, request: scheduler_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        engine = self._ready_engine()
        prompt = list(request.prompt_token_ids)
        check_prompt(prompt, self.model)
        span = trace.get_current_span()
        stream = engine.add_request(request.request_id, prompt, request.sampling, request.priority, span=span)
        span.add_event("queued")
        sent_tokens = False
        try:
            while True:
                output = await stream.outputs.get()
                if isinstance(output, Exception):
                    raise output
                if output.new_token_ids and not sent_tokens:
                    sent_tokens = True
                    span.add_event("first_token")
                response = output.to_proto()
                # Recorded before the last message leaves: the caller may cancel the call
                # as soon as it has it, and the generator would not run again.
                if output.request_finished:
                    record_request_span(span, stream.times, response)
                yield response
                if output.request_finished:
                    return
        finally:
            # The caller went away (cancel, deadline) before the request finished: its
            # blocks go back to the pool now.
            if not stream.finished:
                engine.abort_request(request.request_id)

    async def Abort(
        self, request: scheduler_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.AbortResponse:
        return scheduler_pb2.AbortResponse(found=self._ready_engine().abort_request(request.request_id))

    async def GetModelInfo(
        self, request: common_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        self._ready_engine()
        return self.model

    async def GetStats(
        self, request: scheduler_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SchedulerStats:
        return self._ready_engine().scheduler.stats()
