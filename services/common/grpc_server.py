"""What every pagedserve service does the same way: health, reflection, the frame around
every call (services/common/call_frame.py), and graceful shutdown on SIGTERM / SIGINT."""

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from services.common.call_frame import CallInterceptor
from services.common.caller_auth import AuthInterceptor, CallerPolicy
from services.common.channels import (
    MAX_MESSAGE_BYTES,
    SERVER_ERROR_TARPIT_OPTIONS,
    SERVER_KEEPALIVE_OPTIONS,
    message_size_options,
)
from services.common.errors import UnavailableError
from services.common.gc_pauses import GcPauses
from services.common.metrics import serve_metrics
from services.common.peer_access import PeerAccess
from services.common.tls import TlsConfig, server_credentials
from services.common.watchdog import LoopWatchdog

log = logging.getLogger(__name__)

LIVENESS_SERVICE = "liveness"

# How often readiness is brought up to date with what the service needs.
_READINESS_POLL_S = 0.2


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
    # The port's certificates, also presented to and trusted from the next service.
    tls: TlsConfig = field(default_factory=TlsConfig)
    # Sent to the next service, and required from callers of an internal one.
    internal_token: str | None = field(default=None, repr=False)
    # Seconds the service's event loop may stall before the process exits
    # (services/common/watchdog.py); 0: no watchdog.
    watchdog_timeout_s: float = 30.0
    # Largest message a caller may send; a larger one ends its call with RESOURCE_EXHAUSTED.
    max_receive_message_bytes: int = MAX_MESSAGE_BYTES

    def peer_access(self) -> PeerAccess:
        return PeerAccess(self.tls, self.internal_token)

    def internal_callers(self) -> CallerPolicy:
        """Who may call an internal service (scheduler, worker)."""
        return CallerPolicy(
            internal_token=self.internal_token, client_certificates=self.tls.requires_client_certificate
        )


class ServiceHost:
    """A grpc.aio server with health (NOT_SERVING until `set_serving`), reflection, and a
    Prometheus registry that its metrics port serves. `callers`: who may call it; by
    default the service's own tier only (ServerConfig.internal_callers)."""

    def __init__(
        self, config: ServerConfig, service_names: list[str], callers: CallerPolicy | None = None
    ) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.gc_pauses = GcPauses(self.registry)
        self.callers = callers if callers is not None else config.internal_callers()
        self.server = grpc.aio.server(
            # The frame is outermost, so that refused calls are counted too.
            interceptors=[CallInterceptor(self.registry), AuthInterceptor(self.callers)],
            options=[
                ("grpc.so_reuseport", int(config.reuse_port)),
                *message_size_options(config.max_receive_message_bytes),
                *SERVER_KEEPALIVE_OPTIONS,
                *SERVER_ERROR_TARPIT_OPTIONS,
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
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls.enabled:
            self.port = self.server.add_secure_port(address, server_credentials(self.config.tls))
        else:
            self.port = self.server.add_insecure_port(address)
        if self.callers.is_open:
            log.warning("port %d answers any caller: no API key, internal token or client CA", self.port)
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

    async def _follow_readiness(self, ready: Callable[[], bool]) -> None:
        """Keeps readiness equal to `ready()`: what the service needs may go and come back."""
        serving = True
        while True:
            await asyncio.sleep(_READINESS_POLL_S)
            if ready() != serving:
                serving = not serving
                log.warning("readiness: %s", "serving" if serving else "not serving")
                await (self.set_serving() if serving else self.set_not_serving())

    async def run(
        self,
        prepare: Callable[[], Coroutine[Any, Any, None]],
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        """Runs `prepare` (load a model, wait for a peer) while health says NOT_SERVING,
        then serves until SIGTERM or SIGINT. A signal during `prepare` ends it too. On the
        way out: stop admitting, let calls in flight finish within the grace period.
        ready: once serving, readiness follows it (liveness stays SERVING)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        preparing = asyncio.create_task(prepare())
        stopping = asyncio.create_task(stop.wait())
        watchdog: LoopWatchdog | None = None
        following: asyncio.Task[None] | None = None
        try:
            await asyncio.wait({preparing, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if preparing.done():
                preparing.result()
                # What start-up made (modules, a model, captured graphs) lives as long as the
                # process: out of the collector's generations, no collection walks it again,
                # and the pauses that stall the steps in flight stay short.
                gc.freeze()
                self.gc_pauses.install()
                await self.set_serving()
                if self.config.watchdog_timeout_s > 0:
                    watchdog = LoopWatchdog(self.config.watchdog_timeout_s)
                    watchdog.start()
                if ready is not None:
                    following = asyncio.create_task(self._follow_readiness(ready))
                await stopping
            if following is not None:
                following.cancel()
            log.info("shutting down: draining for up to %.0fs", self.config.shutdown_grace_s)
            await self.health.enter_graceful_shutdown()
            if on_shutdown is not None:
                await on_shutdown()
        finally:
            preparing.cancel()
            stopping.cancel()
            self.gc_pauses.uninstall()
            if watchdog is not None:
                watchdog.stop()
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
