"""Who may call a service. The public port asks for an API key (`authorization: Bearer
KEY`); the internal ports (scheduler, worker) answer only their own tier: a caller that
showed a certificate signed by the CA (mTLS, checked in the handshake) or that sends the
internal token as its bearer. Health stays open for probes; reflection is behind the
same check as the API. Presented secrets are compared in constant time and never
logged."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common.api_keys import ApiKeys

log = logging.getLogger(__name__)

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)

AUTHORIZATION = "authorization"
_BEARER = "bearer "


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer TOKEN` entry, None without one."""
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
            return value[len(_BEARER) :].strip()
    return None


@dataclass(frozen=True)
class CallerPolicy:
    # The public port: every call needs one of these keys.
    api_keys: ApiKeys | None = None
    # Internal ports: a caller sending this token as its bearer is one of ours.
    internal_token: str | None = field(default=None, repr=False)
    # Internal ports: the TLS handshake required a client certificate signed by our CA,
    # so every caller that got this far is one of ours.
    client_certificates: bool = False

    @property
    def is_open(self) -> bool:
        return self.api_keys is None and self.internal_token is None and not self.client_certificates

    def refusal(self, token: str | None) -> str | None:
        """Why a call presenting `token` is refused; None when it may proceed."""
        if self.api_keys is not None:
            if token is None or self.api_keys.identify(token) is None:
                return "invalid or missing API key (authorization: Bearer KEY)"
            return None
        if self.client_certificates or self.internal_token is None:
            return None
        if token is not None and hmac.compare_digest(token.encode(), self.internal_token.encode()):
            return None
        return "this service answers only pagedserve's own services (internal token or client certificate)"


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED without reading
    the request."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached: a generator, as streaming handlers are

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse_stream)


# grpc ships no type hints, so its base class is Any to the checker.
class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, policy: CallerPolicy) -> None:
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        refusal = self._policy.refusal(bearer_token(handler_call_details.invocation_metadata))
        return handler if refusal is None else _refusing(handler, refusal)
