"""What every pagedserve service does the same way: health, reflection, one place that
maps domain errors to status codes, and graceful shutdown on SIGTERM / SIGINT."""

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection

from services.common.channels import MESSAGE_SIZE_OPTIONS, SERVER_KEEPALIVE_OPTIONS
from services.common.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from services.common.wire import find_invalid_utf8_field

log = logging.getLogger(__name__)

_STATUS_OF: list[tuple[type[Exception], grpc.StatusCode]] = [
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
]


def status_of(error: Exception) -> grpc.StatusCode:
    for error_type, code in _STATUS_OF:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort_with(context: grpc.aio.ServicerContext, error: Exception) -> None:
    if isinstance(error, grpc.aio.AioRpcError):
        # A peer's answer passes through unchanged: its code and message already say what
        # went wrong (a bad field, a full queue, a deadline).
        await context.abort(error.code(), error.details() or "")
    code = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in handler", exc_info=error)
    await context.abort(code, str(error))


@dataclass(frozen=True)
class _UndecodableRequest:
    error: InvalidArgumentError


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that hands an undecodable request to the handler wrapper instead of
    failing inside gRPC, where the client would only see INTERNAL."""
    if deserializer is None:
        return None
    message_type = getattr(deserializer, "__self__", None)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            field = None
            if message_type is not None:
                field = find_invalid_utf8_field(message_type.DESCRIPTOR, data)
            if field is not None:
                return _UndecodableRequest(InvalidArgumentError(field, "must be valid UTF-8"))
            return _UndecodableRequest(InvalidArgumentError("request", "could not be parsed"))

    return deserialize


def _wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _UndecodableRequest):
                raise request.error
            return await behavior(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status code
            await _abort_with(context, error)

    return wrapper


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if isinstance(request, _UndecodableRequest):
                raise request.error
            async for response in behavior(request, context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status code
            await _abort_with(context, error)

    return wrapper


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain errors raised by handlers into gRPC status codes, so that servicers
    stay thin: they raise, this answers."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary or handler.unary_stream:
            codec["request_deserializer"] = _lenient(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(handler.unary_stream), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(handler.stream_unary), **codec)
        return grpc.stream_stream_rpc_method_handler(_wrap_stream(handler.stream_stream), **codec)


LIVENESS_SERVICE = "liveness"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 0
    # Seconds that in-flight calls get to finish once shutdown begins.
    shutdown_grace_s: float = 30.0


class ServiceHost:
    """A grpc.aio server with health (NOT_SERVING until `set_serving`) and reflection."""

    def __init__(self, config: ServerConfig, service_names: list[str]) -> None:
        self.config = config
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor()],
            options=[("grpc.so_reuseport", 0), *MESSAGE_SIZE_OPTIONS, *SERVER_KEEPALIVE_OPTIONS],
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
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        # Liveness: the process answers. Readiness ("" and each service) waits for the
        # model or the peers.
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def set_serving(self) -> None:
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)

    async def _set_status(self, status: "health_pb2.HealthCheckResponse.ServingStatus") -> None:
        # "" is the whole server, as Kubernetes' grpc probes ask by default.
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def run(self, prepare: Callable[[], Awaitable[None]],
                  on_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
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
