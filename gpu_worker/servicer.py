"""The worker's gRPC face: thin, every step runs on one dedicated thread so that the
event loop never blocks on the model and steps keep their order (and overlap on the
device: gpu_worker/step_pipeline.py)."""

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

import grpc
from pagedserve.v1 import worker_pb2, worker_pb2_grpc

from gpu_worker.model_runner import ModelRunner
from gpu_worker.step_pipeline import pipelined_steps
from gpu_worker.step_telemetry import StepTelemetry
from services.common.errors import UnavailableError


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, telemetry: StepTelemetry, on_stream_end: Callable[[], None] | None = None) -> None:
        """on_stream_end: called when a step stream ends, in place of forgetting its
        sequences (a rank of a parallel group cannot rejoin its peers mid-stream)."""
        self.telemetry = telemetry
        self._on_stream_end = on_stream_end
        self.runner: ModelRunner | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._stream_open = False

    async def load(self, load_runner: Callable[[], ModelRunner]) -> ModelRunner:
        runner = await asyncio.get_running_loop().run_in_executor(self._executor, load_runner)
        self.runner = runner
        self.telemetry.watch_device(runner.observer.device_timer)
        return runner

    def _ready_runner(self) -> ModelRunner:
        if self.runner is None:
            raise UnavailableError("the model is still loading")
        return self.runner

    async def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        return self._ready_runner().info()

    async def Steps(
        self, request_iterator: AsyncIterator[worker_pb2.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.StepResult]:
        runner = self._ready_runner()
        if self._stream_open:
            # Per-sequence state on the worker belongs to exactly one scheduler stream.
            raise UnavailableError("another scheduler already holds this worker's step stream")
        self._stream_open = True
        loop = asyncio.get_running_loop()
        try:
            results = pipelined_steps(
                runner,
                request_iterator,
                self._executor,
                around_step=self.telemetry.step,
            )
            async with aclosing(results):
                async for result in results:
                    yield result
        finally:
            if self._on_stream_end is not None:
                self._on_stream_end()
            self._stream_open = False
            # A new stream starts from scratch: sequences of the old one are gone.
            await loop.run_in_executor(self._executor, runner.reset)
