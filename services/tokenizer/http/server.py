"""The HTTP API's server: uvicorn inside the tokenizer's own event loop, so that HTTP
requests reach the scheduler session without another hop. The tokenizer process owns
the signals (services/common/grpc_server.py); on shutdown the HTTP API first answers new
requests with 503, lets those in flight finish within the grace period, then closes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from prometheus_client import CollectorRegistry

from services.common.tls import CertificateFiles, TlsConfig, reload_if_changed
from services.tokenizer.generation import GenerationCore
from services.tokenizer.http.app import HttpApiConfig, ServingState, build_app
from services.tokenizer.key_gate import KeyGate

log = logging.getLogger(__name__)

# How often the certificate files are checked for a rotation.
_CERTIFICATE_CHECK_S = 1.0


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The host process handles SIGTERM and SIGINT and drains both APIs itself.
        yield


class HttpApiServer:
    def __init__(
        self,
        core: GenerationCore,
        config: HttpApiConfig,
        registry: CollectorRegistry,
        host: str,
        port: int,
        gate: KeyGate | None = None,
        tls: TlsConfig | None = None,
        reuse_port: bool = False,
    ) -> None:
        """reuse_port: share the port with other tokenizer processes (SO_REUSEPORT), the
        kernel spreading new connections over them, as their gRPC port is shared."""
        self.state = ServingState()
        self._reuse_port = reuse_port
        app = build_app(core, config, registry, self.state, gate)
        tls = tls or TlsConfig()
        ca = tls.ca_certs
        self._server = _EmbeddedServer(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                lifespan="off",
                http="httptools",
                log_level="warning",
                access_log=False,
                ssl_certfile=tls.certfile,
                ssl_keyfile=tls.keyfile,
                ssl_ca_certs=None if ca is None else str(ca),
                ssl_cert_reqs=int(ssl.CERT_NONE if ca is None else ssl.CERT_REQUIRED),
            )
        )
        self._certificates = CertificateFiles(tls) if tls.enabled else None
        self._task: asyncio.Task[None] | None = None
        self._reloads: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Returns once the port accepts connections; raises if it cannot be bound."""
        sockets = None
        if self._reuse_port:
            config = self._server.config
            family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
            sockets = [socket.create_server((config.host, config.port), family=family, reuse_port=True)]
        self._task = asyncio.create_task(self._server.serve(sockets))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP API server exited while starting")
            await asyncio.sleep(0.05)
        log.info("HTTP API listening on port %d", self._server.config.port)
        if self._certificates is not None:
            self._certificates.read()
            self._reloads = asyncio.create_task(self._reload_certificates())

    async def _reload_certificates(self) -> None:
        assert self._certificates is not None
        while True:
            await asyncio.sleep(_CERTIFICATE_CHECK_S)
            context = self._server.config.ssl
            if context is not None:
                reload_if_changed(context, self._certificates)

    def begin_draining(self) -> None:
        self.state.draining = True

    async def stop(self, grace_s: float) -> None:
        """Refuses new requests, waits up to grace_s for those in flight, then closes."""
        self.begin_draining()
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.state.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        left_s = deadline - asyncio.get_running_loop().time()
        self._server.config.timeout_graceful_shutdown = max(1, math.ceil(left_s))
        self._server.should_exit = True
        if self._reloads is not None:
            self._reloads.cancel()
        if self._task is not None:
            await self._task
