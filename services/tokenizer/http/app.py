"""The FastAPI application: routes, API-key check, readiness and draining. Each route
checks, converts the body to Generate requests, starts them on the generation core, and
answers whole or as a stream."""

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pagedserve.v1 import generation_pb2
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel

from services.tokenizer.generation import GenerationCore
from services.tokenizer.http.chat import chat_chunks, chat_complete
from services.tokenizer.http.completions import ResponseHeader, complete, completion_chunks
from services.tokenizer.http.convert import chat_request, completion_requests
from services.tokenizer.http.errors import HttpApiError, install_error_handlers
from services.tokenizer.http.logprobs import LogprobsFormatter
from services.tokenizer.http.metrics import RequestCounter
from services.tokenizer.http.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from services.tokenizer.http.responses import ModelCard, ModelList
from services.tokenizer.http.runner import RequestRun
from services.tokenizer.http.streaming import event_stream

T = TypeVar("T")

# How a route answers a started run: whole, or as stream chunks (with usage at the end or not).
WholeAnswer = Callable[[RequestRun, ResponseHeader], Awaitable[BaseModel]]
ChunkAnswer = Callable[[RequestRun, ResponseHeader, bool], AsyncIterator[BaseModel]]


@dataclass(frozen=True)
class HttpApiConfig:
    # The model's id in requests and responses.
    served_model_name: str
    # Required as `Authorization: Bearer KEY` on /v1/ routes; None: no check.
    api_key: str | None = None


class ServingState:
    """Whether new requests are admitted, and how many are in flight (draining waits for
    them)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.created = int(time.time())


def build_app(
    core: GenerationCore, config: HttpApiConfig, registry: CollectorRegistry, state: ServingState
) -> FastAPI:
    app = FastAPI(title="pagedserve", description="OpenAI-compatible API of pagedserve")
    install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False)

    async def check_api_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if config.api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), config.api_key.encode()):
            raise HttpApiError(
                401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )

    def admit(body: SamplingFields) -> None:
        if state.draining:
            raise HttpApiError(503, "the server is shutting down; retry on another replica")
        core.ready_frontend  # noqa: B018 - raises UnavailableError until the scheduler reported its model
        if body.model != config.served_model_name:
            raise HttpApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {config.served_model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def respond(
        request: Request,
        body: SamplingFields,
        generate_requests: list[generation_pb2.GenerateRequest],
        header: ResponseHeader,
        whole: WholeAnswer,
        chunks: ChunkAnswer,
    ) -> BaseModel | Response:
        state.in_flight += 1
        streaming = False
        try:
            run = await _unless_disconnected(request, RequestRun.start(core, generate_requests, body.n))
            if not body.stream:
                try:
                    return await _unless_disconnected(request, whole(run, header))
                finally:
                    await run.close()
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            streaming = True
            return event_stream(run, _counted(state, chunks(run, header, include_usage)))
        finally:
            if not streaming:
                state.in_flight -= 1

    def logprobs_formatter(num_top: int | None) -> LogprobsFormatter | None:
        return None if num_top is None else LogprobsFormatter(core.ready_frontend.tokenizer, num_top)

    @app.get("/health")
    async def health() -> Response:
        ready = core.frontend is not None and not state.draining
        return Response(status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def models() -> ModelList:
        max_model_len = core.model.max_model_len
        card = ModelCard(id=config.served_model_name, created=state.created, max_model_len=max_model_len)
        return ModelList(data=[card])

    @app.post("/v1/completions", dependencies=[Depends(check_api_key)], response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> BaseModel | Response:
        admit(body)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        generate_requests = completion_requests(body, response_id)
        header = ResponseHeader(
            response_id,
            int(time.time()),
            config.served_model_name,
            len(generate_requests) * body.n,
            logprobs_formatter(body.logprobs),
        )
        return await respond(request, body, generate_requests, header, complete, completion_chunks)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)], response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> BaseModel | Response:
        admit(body)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        generate_requests = [chat_request(body, response_id)]
        header = ResponseHeader(
            response_id,
            int(time.time()),
            config.served_model_name,
            body.n,
            logprobs_formatter(body.num_logprobs()),
        )
        return await respond(request, body, generate_requests, header, chat_complete, chat_chunks)

    routes = [route.path for route in app.routes if hasattr(route, "path")]
    app.add_middleware(RequestCounter, registry=registry, routes=routes)
    return app


async def _counted(state: ServingState, chunks: AsyncIterator[T]) -> AsyncIterator[T]:
    """The chunks, with the request counted in flight until the stream ends."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        state.in_flight -= 1


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it if the client disconnects first: a request no one
    waits for is aborted at the scheduler and frees its KV blocks."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    finally:
        watcher.cancel()
