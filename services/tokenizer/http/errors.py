"""Errors as the OpenAI API shapes them, `{"error": {message, type, param, code}}`, with
the HTTP status that says what went wrong: the same domain errors that the gRPC frame
maps to status codes (services/common/call_frame.py) map to HTTP statuses here."""

from __future__ import annotations

import logging

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import (
    InvalidArgumentError,
    RateLimitedError,
    RemoteError,
    ResourceExhaustedError,
    UnavailableError,
)
from services.tokenizer.http.convert import openai_param

log = logging.getLogger(__name__)

_HTTP_STATUS_OF_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT.value[0]: 400,
    grpc.StatusCode.NOT_FOUND.value[0]: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]: 429,
    grpc.StatusCode.UNAVAILABLE.value[0]: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED.value[0]: 504,
}

_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class HttpApiError(Exception):
    """A refusal with its HTTP status, OpenAI error `code` and the parameter it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = {
        "message": message,
        "type": _TYPE_OF_STATUS.get(status, "server_error"),
        "param": param,
        "code": code,
    }
    return JSONResponse({"error": body}, status_code=status)


def http_error_of(error: Exception) -> HttpApiError:
    """The HTTP refusal a domain error, or a peer's, stands for."""
    if isinstance(error, HttpApiError):
        return error
    if isinstance(error, InvalidArgumentError):
        param = openai_param(error.field)
        return HttpApiError(400, param + str(error).removeprefix(error.field), param)
    if isinstance(error, ResourceExhaustedError):
        return HttpApiError(429, str(error), code="rate_limit_exceeded")
    if isinstance(error, UnavailableError):
        return HttpApiError(503, str(error))
    if isinstance(error, RemoteError):
        return HttpApiError(_HTTP_STATUS_OF_GRPC.get(error.code, 500), str(error))
    log.exception("unhandled error in HTTP handler", exc_info=error)
    return HttpApiError(500, f"internal error: {error}")


def _validation_param(location: tuple[int | str, ...]) -> str:
    """`("body", "messages", 0, "role")` → `messages[0].role`."""
    param = ""
    for part in location[1:] if location[:1] == ("body",) else location:
        param += f"[{part}]" if isinstance(part, int) else f".{part}" if param else str(part)
    return param


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, error: Exception) -> JSONResponse:
        refusal = http_error_of(error)
        response = error_response(refusal.status, str(refusal), refusal.param, refusal.code)
        if isinstance(error, RateLimitedError):
            response.headers["Retry-After"] = error.retry_after_header
        return response

    async def on_validation_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        param = _validation_param(tuple(first.get("loc", ())))
        return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param or None)

    async def on_http_exception(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        return error_response(error.status_code, str(error.detail))

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    for error_type in (
        HttpApiError,
        InvalidArgumentError,
        ResourceExhaustedError,
        UnavailableError,
        RemoteError,
    ):
        app.add_exception_handler(error_type, on_api_error)
