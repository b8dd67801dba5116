"""POST /v1/completions: the choices of a started run, whole or as stream chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.tokenizer.http.responses import CompletionChoice, CompletionResponse, finish_reason_name
from services.tokenizer.http.runner import RequestRun


@dataclass(frozen=True)
class ResponseHeader:
    """What every body and chunk of one response repeats."""

    id: str
    created: int
    model: str
    num_choices: int


async def complete(run: RequestRun, header: ResponseHeader) -> CompletionResponse:
    texts = [""] * header.num_choices
    reasons: list[str | None] = [None] * header.num_choices
    async for index, message in run.messages():
        texts[index] += message.text
        reasons[index] = finish_reason_name(message.finish_reason) or reasons[index]
    choices = [
        CompletionChoice(index=index, text=text, finish_reason=reason)
        for index, (text, reason) in enumerate(zip(texts, reasons))
    ]
    return CompletionResponse(
        id=header.id, created=header.created, model=header.model, choices=choices, usage=run.tally.usage()
    )


async def completion_chunks(
    run: RequestRun, header: ResponseHeader, include_usage: bool
) -> AsyncIterator[CompletionResponse]:
    async for index, message in run.messages():
        reason = finish_reason_name(message.finish_reason)
        if not message.text and reason is None:
            continue
        choice = CompletionChoice(index=index, text=message.text, finish_reason=reason)
        yield CompletionResponse(id=header.id, created=header.created, model=header.model, choices=[choice])
    if include_usage:
        yield CompletionResponse(
            id=header.id, created=header.created, model=header.model, choices=[], usage=run.tally.usage()
        )
