"""The frame around every call a service answers: a server span continuing the caller's
trace, domain errors turned into status codes, and a count of calls by method and code.
Servicers stay thin: they raise, this answers."""

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter

from services.common.errors import (
    InvalidArgumentError,
    RateLimitedError,
    RemoteError,
    ResourceExhaustedError,
    UnavailableError,
)
from services.common.metrics import PREFIX
from services.common.telemetry import context_from_metadata, tracer
from services.common.wire import find_invalid_utf8_field

log = logging.getLogger(__name__)

_STATUS_OF: list[tuple[type[Exception], grpc.StatusCode]] = [
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
]

_CODE_OF_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, grpc.aio.AioRpcError):
        # A peer's answer passes through unchanged: its code and message already say what
        # went wrong (a bad field, a full queue, a deadline).
        return error.code(), error.details() or ""
    if isinstance(error, RemoteError):
        return _CODE_OF_NUMBER.get(error.code, grpc.StatusCode.UNKNOWN), str(error)
    for error_type, code in _STATUS_OF:
        if isinstance(error, error_type):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, str(error)


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


class _Call:
    """One call's outcome, filled in as the handler ends."""

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.code = grpc.StatusCode.OK

    async def fail(self, error: Exception, context: grpc.aio.ServicerContext) -> None:
        """Answers the call with the status `error` maps to (always raises)."""
        if isinstance(error, grpc.aio.AbortError):
            # The handler aborted by itself; the code is already set on the context.
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            raise error
        self.code, message = status_of(error)
        if self.code == grpc.StatusCode.INTERNAL:
            log.exception("unhandled error in handler", exc_info=error)
        self.span.set_status(Status(StatusCode.ERROR, f"{self.code.name}: {message}"))
        # A caller over its rate limit learns when to come back.
        retry = (("retry-after", error.retry_after_header),) if isinstance(error, RateLimitedError) else ()
        await context.abort(self.code, message, trailing_metadata=retry)


def _current(call: _Call) -> AbstractContextManager[trace.Span]:
    """The call's span as the current one, for one step of its handler within one task."""
    return trace.use_span(call.span, end_on_exit=False, record_exception=False, set_status_on_exception=False)


# The caller's deadline passes first on its side, which then resets the stream: the
# server sees a cancel while its own copy of the deadline, taken as the call arrived, has
# about the way back still to run.
_DEADLINE_SLACK_S = 0.5


def _cancellation_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """A handler cancelled as its deadline passed ended in DEADLINE_EXCEEDED (what the
    caller sees); otherwise the caller cancelled it."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= _DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


# grpc ships no type hints, so its base class is Any to the checker.
class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, registry: CollectorRegistry) -> None:
        self._handled = Counter(
            PREFIX + "grpc_server_handled",
            "Calls answered, by method and status code.",
            ["method", "code"],
            registry=registry,
        )

    @contextmanager
    def _frame(self, method: str, context: grpc.aio.ServicerContext, traced: bool) -> Iterator[_Call]:
        """The call's span, started but not made current: a stream's handler may be closed
        by another task than the one that began it (a cancelled stream's generator is
        finalized later), and a context attached in one task cannot be detached in
        another. The handler's steps run inside `_current(call)` instead."""
        service, _, name = method.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        parent = context_from_metadata(context.invocation_metadata())
        span = (
            tracer().start_span(
                method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes=attributes
            )
            if traced
            else trace.INVALID_SPAN
        )
        call = _Call(span)
        try:
            yield call
        except (asyncio.CancelledError, GeneratorExit):
            # A stream closed while suspended at a yield sees GeneratorExit rather than
            # CancelledError; either way the caller stopped listening.
            call.code = _cancellation_code(context)
            raise
        finally:
            span.set_attribute("rpc.grpc.status_code", call.code.value[0])
            span.end()
            self._handled.labels(name, call.code.name).inc()

    def _unary(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._frame(method, context, traced=True) as call:
                try:
                    if isinstance(request, _UndecodableRequest):
                        raise request.error
                    with _current(call):
                        return await behavior(request, context)
                except Exception as error:
                    await call.fail(error, context)

        return wrapper

    def _stream(
        self, method: str, behavior: Callable[..., AsyncGenerator[Any, None]], traced: bool = True
    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with self._frame(method, context, traced) as call:
                responses = behavior(request, context)
                try:
                    if isinstance(request, _UndecodableRequest):
                        raise request.error
                    while True:
                        with _current(call):
                            try:
                                response = await anext(responses)
                            except StopAsyncIteration:
                                break
                        yield response
                except Exception as error:
                    await call.fail(error, context)
                finally:
                    # Whichever task closes this generator closes the handler's at once,
                    # so that its cleanup (aborting the request) does not wait for the
                    # collector.
                    await responses.aclose()

        return wrapper

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # Health checks and reflection are probes, not work: no span, no count.
        if handler is None or method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary or handler.unary_stream:
            codec["request_deserializer"] = _lenient(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._stream(method, handler.unary_stream), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(method, handler.stream_unary), **codec)
        # A bidirectional stream (the worker's steps) lives as long as the scheduler: the
        # spans worth having are per step, made by the servicer.
        return grpc.stream_stream_rpc_method_handler(
            self._stream(method, handler.stream_stream, traced=False), **codec
        )
