"""What every pagedserve service does the same way: health, reflection, the frame around
every call (services/common/call_frame.py), and graceful shutdown on SIGTERM / SIGINT."""

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from services.common.call_frame import CallInterceptor
from services.common.channels import MAX_MESSAGE_BYTES, SERVER_KEEPALIVE_OPTIONS, message_size_options
from services.common.errors import UnavailableError
from services.common.metrics import serve_metrics

log = logging.getLogger(__name__)

LIVENESS_SERVICE = "liveness"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 0
    # Seconds that in-flight calls get to finish once shutdown begins.
    shutdown_grace_s: float = 30.0
    # HTTP port of Prometheus' /metrics; None serves no metrics.
    metrics_port: int | None = None
    # Several processes may listen on the port at once (SO_REUSEPORT), the kernel spreading
    # the connections over them.
    reuse_port: bool = False
    # Largest message a caller may send; a larger one ends its call with RESOURCE_EXHAUSTED.
    max_receive_message_bytes: int = MAX_MESSAGE_BYTES


class ServiceHost:
    """A grpc.aio server with health (NOT_SERVING until `set_serving`), reflection, and a
    Prometheus registry that its metrics port serves."""

    def __init__(self, config: ServerConfig, service_names: list[str]) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.server = grpc.aio.server(
            interceptors=[CallInterceptor(self.registry)],
            options=[
                ("grpc.so_reuseport", int(config.reuse_port)),
                *message_size_options(config.max_receive_message_bytes),
                *SERVER_KEEPALIVE_OPTIONS,
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names = service_names
        reflection.enable_server_reflection(
            [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0

    async def start(self) -> int:
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        await self.server.start()
        serve_metrics(self.registry, self.config.metrics_port, self.config.host)
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        # Liveness: the process answers. Readiness ("" and each service) waits for the
        # model or the peers.
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def set_serving(self) -> None:
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)

    async def set_not_serving(self) -> None:
        """Readiness lost after start-up (a peer failed); liveness stays SERVING."""
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_status(self, status: "health_pb2.HealthCheckResponse.ServingStatus") -> None:
        # "" is the whole server, as Kubernetes' grpc probes ask by default.
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def run(
        self,
        prepare: Callable[[], Coroutine[Any, Any, None]],
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Runs `prepare` (load a model, wait for a peer) while health says NOT_SERVING,
        then serves until SIGTERM or SIGINT. A signal during `prepare` ends it too. On the
        way out: stop admitting, let calls in flight finish within the grace period."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        preparing = asyncio.create_task(prepare())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({preparing, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if preparing.done():
                preparing.result()
                # What start-up made (modules, a model, captured graphs) lives as long as the
                # process: out of the collector's generations, no collection walks it again,
                # and the pauses that stall the steps in flight stay short.
                gc.freeze()
                await self.set_serving()
                await stopping
            log.info("shutting down: draining for up to %.0fs", self.config.shutdown_grace_s)
            await self.health.enter_graceful_shutdown()
            if on_shutdown is not None:
                await on_shutdown()
        finally:
            preparing.cancel()
            stopping.cancel()
            await self.server.stop(self.config.shutdown_grace_s)


async def wait_for_serving(channel: grpc.aio.Channel, timeout_s: float, service: str = "") -> None:
    """Waits until the peer behind `channel` reports SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise UnavailableError(f"peer not serving after {timeout_s:.0f}s")
        await asyncio.sleep(0.2)
