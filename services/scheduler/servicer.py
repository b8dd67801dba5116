"""The scheduler's gRPC face: decode, call the engine, encode."""

import asyncio
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from services.common.errors import UnavailableError
from services.scheduler.cached_keys import KeyCursor
from services.scheduler.engine import Engine
from services.scheduler.load_report import engine_load, load_reports
from services.scheduler.outputs import RequestOutput
from services.scheduler.session import SchedulerSession
from services.scheduler.submit_checks import checked_prompt


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, load_report_interval_s: float = 0.05) -> None:
        self.engine: Engine | None = None
        self.model = common_pb2.ModelInfo()
        self._sessions: set[SchedulerSession] = set()
        self._load_report_interval_s = load_report_interval_s
        # Set when shutdown begins: WatchLoad streams say so and end.
        self._draining = asyncio.Event()

    async def drain(self) -> None:
        """Shutting down: open Session streams take no new requests and end once theirs
        have (the server itself refuses new calls)."""
        self._draining.set()
        for session in self._sessions:
            session.drain()

    def _load(self, seen: KeyCursor | None) -> tuple[scheduler_pb2.EngineLoad, KeyCursor | None]:
        engine = self.engine
        serving = engine is not None and engine.worker_failure is None and not self._draining.is_set()
        return engine_load(engine.scheduler if engine is not None else None, serving, seen)

    def _ready_engine(self) -> Engine:
        if self.engine is None:
            raise UnavailableError("the scheduler is waiting for its worker")
        return self.engine

    async def Submit(
        self, request: scheduler_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        engine = self._ready_engine()
        prompt = checked_prompt(request, self.model.vocab_size)
        outputs: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        stream = engine.add_request(
            request.request_id,
            prompt,
            request.sampling,
            request.priority,
            deliver=outputs.put_nowait,
            span=trace.get_current_span(),
            num_resumed_tokens=request.num_resumed_tokens,
        )
        try:
            while True:
                output = await outputs.get()
                if isinstance(output, Exception):
                    raise output
                yield output.to_proto()
                if output.request_finished:
                    return
        finally:
            # The caller went away (cancel, deadline) before the request finished: its
            # blocks go back to the pool now.
            if not stream.finished:
                engine.abort_request(request.request_id)

    async def Session(
        self, request_iterator: AsyncIterator[scheduler_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.SessionResponse]:
        session = SchedulerSession(self._ready_engine(), self.model)

        async def read_all() -> None:
            async for message in request_iterator:
                session.handle(message)

        incoming = asyncio.ensure_future(read_all())
        incoming.add_done_callback(session.incoming_ended)
        self._sessions.add(session)
        try:
            async for response in session.responses(incoming):
                yield response
        finally:
            self._sessions.discard(session)
            incoming.cancel()
            session.close()

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

    async def WatchLoad(
        self, request: scheduler_pb2.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.EngineLoad]:
        async for report in load_reports(self._load, self._load_report_interval_s, self._draining):
            yield report
