"""The FastAPI application: routes, the API-key check, readiness and metrics. Each
generation route converts its body to Generate requests and hands them to Answering."""

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel

from services.tokenizer.generation import GenerationCore
from services.tokenizer.http.answering import Answering
from services.tokenizer.http.body_limit import BodySizeLimit
from services.tokenizer.http.chat import chat_chunks, chat_complete
from services.tokenizer.http.completions import ResponseHeader, complete, completion_chunks
from services.tokenizer.http.convert import chat_request, completion_requests
from services.tokenizer.http.errors import HttpApiError, install_error_handlers
from services.tokenizer.http.metrics import RequestCounter
from services.tokenizer.http.protocol import ChatCompletionRequest, CompletionRequest
from services.tokenizer.http.responses import ModelCard, ModelList
from services.tokenizer.http.state import HttpApiConfig, ServingState
from services.tokenizer.key_gate import KeyGate

__all__ = ["HttpApiConfig", "ServingState", "build_app"]


def build_app(
    core: GenerationCore,
    config: HttpApiConfig,
    registry: CollectorRegistry,
    state: ServingState,
    gate: KeyGate | None = None,
) -> FastAPI:
    app = FastAPI(title="pagedserve", description="OpenAI-compatible API of pagedserve")
    install_error_handlers(app)
    gate = gate or KeyGate(None)
    answering = Answering(core, config, state, gate)
    authorized = [Depends(_api_key_check(gate))]

    @app.get("/health")
    async def health() -> Response:
        ready = core.frontend is not None and not state.draining
        return Response(status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> ModelList:
        max_model_len = core.model.max_model_len
        card = ModelCard(id=config.served_model_name, created=state.created, max_model_len=max_model_len)
        return ModelList(data=[card])

    @app.post("/v1/completions", dependencies=authorized, response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> BaseModel | Response:
        answering.admit(body)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        generate_requests = completion_requests(body, response_id)
        header = ResponseHeader(
            response_id,
            int(time.time()),
            config.served_model_name,
            len(generate_requests) * body.n,
            answering.logprobs_formatter(body.logprobs),
            answering.echoed_prompts(generate_requests) if body.echo else None,
        )
        return await answering.respond(request, body, generate_requests, header, complete, completion_chunks)

    @app.post("/v1/chat/completions", dependencies=authorized, response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> BaseModel | Response:
        answering.admit(body)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        generate_requests = [chat_request(body, response_id)]
        header = ResponseHeader(
            response_id,
            int(time.time()),
            config.served_model_name,
            body.n,
            answering.logprobs_formatter(body.num_logprobs()),
        )
        return await answering.respond(request, body, generate_requests, header, chat_complete, chat_chunks)

    routes = [route.path for route in app.routes if hasattr(route, "path")]
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestCounter, registry=registry, routes=routes)
    return app


_BEARER = HTTPBearer(auto_error=False)


def _api_key_check(gate: KeyGate) -> Callable[..., Awaitable[None]]:
    """A dependency that refuses a request without `Authorization: Bearer API_KEY` when the
    API has keys, and leaves the caller's key policy on `request.state.caller`."""

    async def check_api_key(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if gate.keys is None:
            return
        caller = gate.caller(credentials.credentials if credentials is not None else None)
        if caller is None:
            raise HttpApiError(
                401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )
        request.state.caller = caller

    return check_api_key
