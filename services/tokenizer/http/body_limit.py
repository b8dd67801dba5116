"""A bound on the size of HTTP request bodies: a body that announces more than the limit
is answered 413 before any of it is read; one sent in chunks without a length is cut off
as soon as it passes the limit. Either way no more than the limit is held in memory."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.tokenizer.http.errors import error_response


def _too_large(max_bytes: int, size: str) -> str:
    return f"request body: {size} exceeds the limit of {max_bytes} bytes (--max-request-bytes)"


class BodySizeLimit:
    """Pure ASGI middleware, so that streamed responses pass through untouched."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        announced = dict(scope["headers"]).get(b"content-length")
        if announced is not None and announced.isdigit() and int(announced) > self._max_bytes:
            message = _too_large(self._max_bytes, f"{int(announced)} bytes")
            await error_response(413, message, code="request_too_large")(scope, receive, send)
            return
        received = 0

        async def receive_bounded() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_bytes:
                    # Raised inside the route's body parsing, where the app's handlers
                    # answer it in the API's error shape.
                    raise HTTPException(413, _too_large(self._max_bytes, f"at least {received} bytes"))
            return message

        await self._app(scope, receive_bounded, send)
