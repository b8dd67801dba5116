"""What every generation route does around its own conversion: admit the request (not
draining, ready, the served model), start its Generate requests, and answer whole or as
a stream, counting it in flight until the answer ends. A client that disconnects cancels
the work it waits for, which aborts its requests at the scheduler."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request, Response
from pagedserve.v1 import generation_pb2
from pydantic import BaseModel

from services.tokenizer.generation import GenerationCore
from services.tokenizer.http.completions import ResponseHeader
from services.tokenizer.http.errors import HttpApiError
from services.tokenizer.http.logprobs import LogprobsFormatter
from services.tokenizer.http.protocol import SamplingFields
from services.tokenizer.http.runner import RequestRun
from services.tokenizer.http.state import HttpApiConfig, ServingState
from services.tokenizer.http.streaming import event_stream
from services.tokenizer.key_gate import KeyGate

T = TypeVar("T")

# How a route answers a started run: whole, or as stream chunks (with usage at the end or not).
WholeAnswer = Callable[[RequestRun, ResponseHeader], Awaitable[BaseModel]]
ChunkAnswer = Callable[[RequestRun, ResponseHeader, bool], AsyncIterator[BaseModel]]


class Answering:
    def __init__(
        self, core: GenerationCore, config: HttpApiConfig, state: ServingState, gate: KeyGate
    ) -> None:
        self._core = core
        self._gate = gate
        self._config = config
        self._state = state

    def admit(self, body: SamplingFields) -> None:
        if self._state.draining:
            raise HttpApiError(503, "the server is shutting down; retry on another replica")
        self._core.ready_frontend  # noqa: B018 - raises UnavailableError until the scheduler reported its model
        served = self._config.served_model_name
        if body.model != served:
            raise HttpApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )

    def echoed_prompts(self, requests: list[generation_pb2.GenerateRequest]) -> list[tuple[str, list[int]]]:
        """Each request's prompt as text and as the token ids it is tokenized into."""
        tokenizer = self._core.ready_frontend.tokenizer
        echoed = []
        for request in requests:
            if request.prompt:
                echoed.append((request.prompt, tokenizer.encode(request.prompt)))
            else:
                token_ids = list(request.prompt_token_ids)
                echoed.append((tokenizer.decode(token_ids, skip_special_tokens=False), token_ids))
        return echoed

    def logprobs_formatter(self, num_top: int | None) -> LogprobsFormatter | None:
        return None if num_top is None else LogprobsFormatter(self._core.ready_frontend.tokenizer, num_top)

    async def respond(
        self,
        request: Request,
        body: SamplingFields,
        generate_requests: list[generation_pb2.GenerateRequest],
        header: ResponseHeader,
        whole: WholeAnswer,
        chunks: ChunkAnswer,
    ) -> BaseModel | Response:
        state = self._state
        state.in_flight += 1
        streaming = False
        try:
            # The caller's key, as the API-key check found it (app.py).
            caller = getattr(request.state, "caller", None)
            start = RequestRun.start(
                lambda one: self._gate.generate(caller, one, self._core.generate), generate_requests, body.n
            )
            run = await _unless_disconnected(request, start)
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


async def _counted(state: ServingState, chunks: AsyncIterator[T]) -> AsyncIterator[T]:
    """The chunks, with the request counted in flight until the stream ends."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        state.in_flight -= 1


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it if the client disconnects first."""
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
