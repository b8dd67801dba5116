"""The continuous-batching loop: asks the scheduler for a step, sends it down the worker's
long-lived step stream, feeds the sampled tokens back and hands each request its output."""

import asyncio
import logging
from dataclasses import dataclass

import grpc

from pagedserve.v1 import common_pb2, worker_pb2_grpc
from services.common.errors import UnavailableError
from services.scheduler.scheduler import RequestOutput, Scheduler

log = logging.getLogger(__name__)


@dataclass
class RequestStream:
    """What the engine has produced for one request and not yet been read."""

    outputs: asyncio.Queue
    finished: bool = False


class Engine:
    def __init__(self, scheduler: Scheduler, worker: worker_pb2_grpc.WorkerStub) -> None:
        self.scheduler = scheduler
        self._worker = worker
        self._streams: dict[str, RequestStream] = {}
        self._has_work = asyncio.Event()

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: common_pb2.SamplingParams,
        priority: int = 0,
    ) -> RequestStream:
        self.scheduler.add_request(request_id, prompt_token_ids, sampling, priority)
        stream = RequestStream(outputs=asyncio.Queue())
        self._streams[request_id] = stream
        self._has_work.set()
        return stream

    def abort_request(self, request_id: str) -> bool:
        outputs = self.scheduler.abort_request(request_id)
        if outputs is None:
            return False
        for output in outputs:
            self._deliver(output)
        return True

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        stream.outputs.put_nowait(output)
        if output.request_finished:
            stream.finished = True
            del self._streams[output.request_id]

    def _fail_all(self, error: Exception) -> None:
        self.scheduler.abort_all()
        for stream in self._streams.values():
            stream.outputs.put_nowait(error)
        self._streams.clear()

    async def run(self) -> None:
        """Runs steps while there is work; sleeps when there is none. A broken worker
        stream fails the requests in flight (they get an explicit error, their blocks come
        back) and the next request opens a new stream."""
        while True:
            await self._has_work.wait()
            call = self._worker.Steps()
            try:
                await self._run_steps(call)
            except (grpc.aio.AioRpcError, UnavailableError) as error:
                details = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
                log.error("worker step stream failed: %s", details)
                self._fail_all(UnavailableError(f"worker failed: {details}"))
            finally:
                call.cancel()

    async def _run_steps(self, call: grpc.aio.StreamStreamCall) -> None:
        # The read of the next result is always pending, also while idle: see _idle.
        next_result = asyncio.ensure_future(call.read())
        try:
            while True:
                scheduled = self.scheduler.schedule()
                if scheduled is None:
                    self._has_work.clear()
                    await self._idle(next_result)
                    continue
                await call.write(scheduled.to_proto())
                result = await next_result
                if result is grpc.aio.EOF:
                    raise UnavailableError("worker closed the step stream")
                next_result = asyncio.ensure_future(call.read())
                for output in self.scheduler.update_from_output(scheduled, result):
                    self._deliver(output)
        finally:
            next_result.cancel()

    async def _idle(self, next_result: asyncio.Future) -> None:
        """Waits for work. The worker sends nothing unasked, so a read that completes
        meanwhile means the stream ended (a dropped connection, a restarted worker): it is
        replaced before any request depends on it."""
        work = asyncio.ensure_future(self._has_work.wait())
        try:
            await asyncio.wait({work, next_result}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.cancel()
        if next_result.done():
            next_result.result()  # raises the stream's error, if it failed
            raise UnavailableError("worker closed the step stream")
