"""POST /v1/chat/completions: the choices of a started run as assistant messages, whole
or as stream chunks (a first chunk per choice with the role, then content deltas)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.tokenizer.http.completions import ResponseHeader
from services.tokenizer.http.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    finish_reason_name,
)
from services.tokenizer.http.runner import RequestRun


async def chat_complete(run: RequestRun, header: ResponseHeader) -> ChatCompletionResponse:
    texts = [""] * header.num_choices
    reasons: list[str | None] = [None] * header.num_choices
    async for index, message in run.messages():
        texts[index] += message.text
        reasons[index] = finish_reason_name(message.finish_reason) or reasons[index]
    choices = [
        ChatChoice(index=index, message=AssistantMessage(content=text), finish_reason=reason)
        for index, (text, reason) in enumerate(zip(texts, reasons))
    ]
    return ChatCompletionResponse(
        id=header.id, created=header.created, model=header.model, choices=choices, usage=run.tally.usage()
    )


async def chat_chunks(
    run: RequestRun, header: ResponseHeader, include_usage: bool
) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=header.id, created=header.created, model=header.model, choices=choices)

    yield chunk(
        [
            ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
            for index in range(header.num_choices)
        ]
    )
    async for index, message in run.messages():
        reason = finish_reason_name(message.finish_reason)
        if not message.text and reason is None:
            continue
        delta = ChatDelta(content=message.text) if message.text else ChatDelta()
        yield chunk([ChatChunkChoice(index=index, delta=delta, finish_reason=reason)])
    if include_usage:
        final = chunk([])
        final.usage = run.tally.usage()
        yield final
