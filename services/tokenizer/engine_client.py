"""The tokenizer's link to one engine (a scheduler and its workers): the one Session stream
its requests travel on, and the WatchLoad stream that keeps the engine's load and cached
prefix blocks current for routing."""

import asyncio
import logging
import time

import grpc
from pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from services.common.peer_access import PeerAccess
from services.tokenizer.engine_health import EngineLiveness
from services.tokenizer.intake import Intake
from services.tokenizer.migration import EngineStoppedServing
from services.tokenizer.routing import EngineView
from services.tokenizer.scheduler_session import SessionClient

log = logging.getLogger(__name__)

# How long to wait before watching an engine's load again after its stream broke.
_RECONNECT_S = 0.5


class EngineClient:
    def __init__(
        self,
        address: str,
        suspend_after_failure_s: float = 2.0,
        health_timeout_s: float = 10.0,
        access: PeerAccess | None = None,
        intake: Intake | None = None,
    ) -> None:
        self.address = address
        access = access or PeerAccess()
        self._channel = access.channel(address)
        self._metadata = access.metadata
        self._liveness = EngineLiveness(self._channel, address, health_timeout_s)
        self._tasks: list[asyncio.Task[None]] = []
        self.stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self.session = SessionClient(self.stub, self._metadata, intake)
        # The engine's latest report; None until one comes, and while its stream is down.
        self.load: scheduler_pb2.EngineLoad | None = None
        # The keys the engine's reports have built up (whole, then changes).
        self._cached_keys: set[int] = set()
        # Requests this frontend sent since the latest report, which does not count them.
        self._num_sent_since_report = 0
        self._suspend_after_failure_s = suspend_after_failure_s
        # A request failed here: no new ones until then (monotonic seconds).
        self._suspended_until = 0.0

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch_load()),
            asyncio.create_task(self._liveness.follow(self._move_requests)),
        ]

    @property
    def available(self) -> bool:
        """Serving, as of its latest report, and no request failed here just now."""
        return self.serving and time.monotonic() >= self._suspended_until

    @property
    def serving(self) -> bool:
        """Serving, as of its latest report, and answering."""
        return self.load is not None and self.load.serving and self._liveness.answers

    def _move_requests(self) -> None:
        """Tells its requests that they may move to an engine that serves."""
        self.session.notify_all(EngineStoppedServing(f"engine {self.address} stopped serving"))

    async def _move_requests_if_workers_failed(self) -> None:
        if await self._liveness.lost_its_workers():
            self._move_requests()

    @property
    def block_size(self) -> int:
        return self.load.block_size if self.load is not None else 0

    def view(self) -> EngineView:
        assert self.load is not None
        load = self.load.num_running + self.load.num_waiting + self._num_sent_since_report
        return EngineView(self.address, load, self._cached_keys)

    def on_sent(self) -> None:
        self._num_sent_since_report += 1

    def on_failure(self, reason: str) -> None:
        """A request failed here (the stream broke, or the engine answered UNAVAILABLE):
        no new requests until the engine reports serving after a pause, so that a report
        written before the failure does not bring it back."""
        log.warning("engine %s failed: %s", self.address, reason)
        self._suspended_until = time.monotonic() + self._suspend_after_failure_s

    async def model_info(self) -> common_pb2.ModelInfo:
        info: common_pb2.ModelInfo = await self.stub.GetModelInfo(
            common_pb2.GetModelInfoRequest(), timeout=10.0, metadata=self._metadata
        )
        return info

    async def _watch_load(self) -> None:
        while True:
            try:
                async for report in self.stub.WatchLoad(
                    scheduler_pb2.WatchLoadRequest(), metadata=self._metadata
                ):
                    if self.load is None or report.serving != self.load.serving:
                        log.info("engine %s %s", self.address, "serving" if report.serving else "not serving")
                    if self.load is not None and self.load.serving and not report.serving:
                        self._tasks = [task for task in self._tasks if not task.done()]
                        self._tasks.append(asyncio.create_task(self._move_requests_if_workers_failed()))
                    self.load = report
                    if report.cached_keys_changed:
                        self._cached_keys.difference_update(report.removed_block_keys)
                        self._cached_keys.update(report.cached_block_keys)
                    else:
                        self._cached_keys = set(report.cached_block_keys)
                    self._num_sent_since_report = 0
            except grpc.aio.AioRpcError as error:
                if self.load is not None:
                    log.warning("engine %s load stream broke: %s", self.address, error.details())
            self.load = None
            await asyncio.sleep(_RECONNECT_S)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.session.close()
        await self._channel.close()
