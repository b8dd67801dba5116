"""Runs a scheduler's step stream with steps overlapped on the device.

Each step is launched on the model thread as soon as it arrives, also while the previous
one still runs on the device; its result is read back once the device is done with it.
So when the scheduler sends step N+1 before N's result (overlapped scheduling), N+1's
host work (building inputs, launching kernels) happens while the device runs N. Results
leave in step order. Without overlap on the scheduler's side this is one step at a time.
A step arriving while MAX_STEPS_LAUNCHED are launched and not finished waits for the
oldest to finish; the worker reports that depth, and its scheduler keeps as many in flight.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass

from pagedserve.v1 import worker_pb2

from gpu_worker.config import MAX_STEPS_LAUNCHED
from gpu_worker.model_runner import ModelRunner
from gpu_worker.step_state import LaunchedStep


@dataclass
class StepRecord:
    """What an around_step context manager may yield: the pipeline puts the step's
    result in it before closing it, for what is known only then (speculation's counts,
    whether a graph ran the step)."""

    result: worker_pb2.StepResult | None = None
    replayed_graph: bool = False


class _StepScope:
    """around_step's context manager for one step, run in a context of its own: the
    scopes of overlapping steps close out of order, and one that sets context variables
    (a current span) must leave them as it found them."""

    def __init__(self, manager: AbstractContextManager) -> None:
        self._context = contextvars.copy_context()
        self._stack = ExitStack()
        self.entered = self._context.run(self._stack.enter_context, manager)

    def took(self, result: worker_pb2.StepResult, replayed_graph: bool) -> None:
        if isinstance(self.entered, StepRecord):
            self.entered.result = result
            self.entered.replayed_graph = replayed_graph

    def close(self) -> None:
        self._context.run(self._stack.close)


async def _next_or_none(steps: AsyncIterator[worker_pb2.StepRequest]) -> worker_pb2.StepRequest | None:
    try:
        return await anext(steps)
    except StopAsyncIteration:
        return None


class _StepThreads:
    """What the model thread and the device-wait thread run for each step."""

    def __init__(self, runner: ModelRunner, model_thread: ThreadPoolExecutor) -> None:
        self.runner = runner
        self.model_thread = model_thread
        # A step whose result has left but whose draws failed to reach their sequences:
        # the next launch raises it, since that step would build on them.
        self.failures: list[BaseException] = []

    def launch(self, step: worker_pb2.StepRequest) -> LaunchedStep:
        if self.failures:
            raise self.failures[0]
        return self.runner.launch_step(step)

    def wait_then_finish(self, launched_step: Future[LaunchedStep]) -> tuple[worker_pb2.StepResult, bool]:
        # Steps pass from thread to thread without a turn of the event loop in between.
        # The result is built here the moment the device is done with the step, without
        # queueing behind the next step's launch on the model thread, which gives the
        # draws to their sequences after. A step that speculated is finished there.
        handle = launched_step.result()
        handle.wait()
        result = self.runner.read_result(handle)
        if result is None:
            return self.model_thread.submit(self.runner.finish_step, handle).result(), handle.replayed_graph
        self.model_thread.submit(self._finish_after_result, handle)
        return result, handle.replayed_graph

    def _finish_after_result(self, handle: LaunchedStep) -> None:
        try:
            self.runner.finish_step(handle)
        except BaseException as error:
            self.failures.append(error)


async def pipelined_steps(
    runner: ModelRunner,
    steps: AsyncIterator[worker_pb2.StepRequest],
    model_thread: ThreadPoolExecutor,
    around_step: Callable[[worker_pb2.StepRequest], AbstractContextManager] = lambda step: nullcontext(),
) -> AsyncGenerator[worker_pb2.StepResult, None]:
    """Yields one result per step, in order. Launching and finishing run on model_thread
    (one thread, so that they keep their order); waiting for the device runs on a thread
    of its own, so that a step can be launched meanwhile, and builds the result there, so
    that it need not wait for that launch. around_step(step) is entered when the step
    arrives and exited once its result has been taken."""
    loop = asyncio.get_running_loop()
    device_waits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device-wait")

    threads = _StepThreads(runner, model_thread)

    # (a launched step's result to come, the scope opened around it), oldest first.
    launched: deque[tuple[asyncio.Future, _StepScope]] = deque()
    next_step: asyncio.Future | None = asyncio.ensure_future(_next_or_none(steps))
    try:
        while next_step is not None or launched:
            if next_step is None or (launched and len(launched) >= MAX_STEPS_LAUNCHED):
                waiting_on = {launched[0][0]}
            else:
                waiting_on = {launched[0][0], next_step} if launched else {next_step}
            await asyncio.wait(waiting_on, return_when=asyncio.FIRST_COMPLETED)
            # A step that arrived goes to the device before an earlier one is read back.
            if next_step is not None and next_step.done() and len(launched) < MAX_STEPS_LAUNCHED:
                step = next_step.result()
                next_step = None
                if step is not None:
                    scope = _StepScope(around_step(step))
                    launched_step = model_thread.submit(threads.launch, step)
                    launched.append(
                        (loop.run_in_executor(device_waits, threads.wait_then_finish, launched_step), scope)
                    )
                    next_step = asyncio.ensure_future(_next_or_none(steps))
                continue
            finished, scope = launched[0]
            if not finished.done():
                continue
            launched.popleft()
            try:
                result, replayed_graph = finished.result()
                scope.took(result, replayed_graph)
                yield result
            finally:
                # Once the result has left: what the scope does then (telemetry) does not
                # delay it.
                scope.close()
    finally:
        if next_step is not None:
            next_step.cancel()
        for _, scope in launched:
            scope.close()
        device_waits.shutdown(wait=False, cancel_futures=True)
