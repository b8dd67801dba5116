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
    ChatLogprobs,
    finish_reason_name,
)
from services.tokenizer.http.runner import RequestRun


async def chat_complete(run: RequestRun, header: ResponseHeader) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=index,
            message=AssistantMessage(content=""),
            logprobs=None if header.logprobs is None else ChatLogprobs(content=[]),
        )
        for index in range(header.num_choices)
    ]
    async for index, message in run.messages():
        choice = choices[index]
        choice.message.content = (choice.message.content or "") + message.text
        choice.finish_reason = finish_reason_name(message.finish_reason) or choice.finish_reason
        if header.logprobs is not None and choice.logprobs is not None:
            choice.logprobs.content += header.logprobs.chat(message.token_ids, message.logprobs)
    return ChatCompletionResponse(
        id=header.id, created=header.created, model=header.model, choices=choices, usage=run.tally.usage()
    )


async def chat_chunks(
    run: RequestRun, header: ResponseHeader, include_usage: bool
) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        # Built from values this service made, so not validated again: one chunk per
        # message makes this the API's hottest path.
        return ChatCompletionChunk.model_construct(
            id=header.id, created=header.created, model=header.model, choices=choices
        )

    yield chunk(
        [
            ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
            for index in range(header.num_choices)
        ]
    )
    async for index, message in run.messages():
        reason = finish_reason_name(message.finish_reason)
        if not message.text and reason is None and not message.logprobs:
            continue
        delta = ChatDelta.model_construct(content=message.text or None)
        logprobs = None
        if header.logprobs is not None:
            logprobs = ChatLogprobs(content=header.logprobs.chat(message.token_ids, message.logprobs))
        choice = ChatChunkChoice.model_construct(
            index=index, delta=delta, finish_reason=reason, logprobs=logprobs
        )
        yield chunk([choice])
    if include_usage:
        final = chunk([])
        final.usage = run.tally.usage()
        yield final
