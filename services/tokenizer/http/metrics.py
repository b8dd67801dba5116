"""Counts the HTTP API's requests by route and status, as the gRPC frame counts calls
(services/common/call_frame.py), on the tokenizer's own Prometheus registry."""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.metrics import PREFIX


class RequestCounter:
    """Pure ASGI middleware: it sees the response's status without buffering its body,
    so streams pass through untouched."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry, routes: Collection[str]) -> None:
        self._app = app
        # Paths outside the API's own share one label, so that clients cannot grow the
        # label set.
        self._routes = frozenset(routes)
        self._handled = Counter(
            PREFIX + "http_requests",
            "HTTP API requests answered, by route and status.",
            ["route", "status"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = 500

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_counting)
        finally:
            route = scope["path"] if scope["path"] in self._routes else "other"
            self._handled.labels(route, str(status)).inc()
