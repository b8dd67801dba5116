"""What a tokenizer learns of an engine besides its load reports: whether its scheduler
answers at all, and why it stopped serving.

A scheduler that stops answering (a stopped process, a lost host) breaks no stream and
sends no report (reports come only on change), so its liveness is asked all the time; one
silent for `timeout_s` counts as not serving, and its requests move if another engine
serves. An engine that reports not serving may be draining (it finishes what it holds; its
liveness says NOT_SERVING too) or may have lost its workers (it holds its requests to
recompute them; its liveness stays SERVING): only in the second case may they move."""

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_server import LIVENESS_SERVICE

log = logging.getLogger(__name__)

_LIVENESS = health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE)


class EngineLiveness:
    def __init__(self, channel: grpc.aio.Channel, address: str, timeout_s: float) -> None:
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._address = address
        self._timeout_s = timeout_s
        # False once the scheduler has not answered for timeout_s.
        self.answers = True

    async def follow(self, on_silent: Callable[[], None]) -> None:
        """Keeps `answers` current; calls on_silent each time it turns False."""
        loop = asyncio.get_running_loop()
        last_answer = loop.time()
        while True:
            try:
                await self._stub.Check(_LIVENESS, timeout=self._timeout_s)
                last_answer = loop.time()
                if not self.answers:
                    log.info("engine %s answers again", self._address)
                    self.answers = True
            except grpc.aio.AioRpcError:
                pass
            if self.answers and loop.time() - last_answer >= self._timeout_s:
                log.warning("engine %s has not answered for %.1fs", self._address, loop.time() - last_answer)
                self.answers = False
                on_silent()
            await asyncio.sleep(self._timeout_s / 4)

    async def lost_its_workers(self) -> bool:
        """Whether an engine that just reported not serving did so because its workers
        failed (it is alive and not draining)."""
        try:
            reply = await self._stub.Check(_LIVENESS, timeout=self._timeout_s)
        except grpc.aio.AioRpcError:
            return False
        serving: bool = reply.status == health_pb2.HealthCheckResponse.SERVING
        return serving
