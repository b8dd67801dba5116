"""POST /v1/completions: the choices of a started run, whole or as stream chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from pagedserve.v1 import common_pb2

from services.tokenizer.http.logprobs import LogprobsFormatter
from services.tokenizer.http.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    finish_reason_name,
)
from services.tokenizer.http.runner import RequestRun


@dataclass(frozen=True)
class ResponseHeader:
    """What every body and chunk of one response repeats, and how it shows logprobs."""

    id: str
    created: int
    model: str
    num_choices: int
    # Set when the request asked for logprobs.
    logprobs: LogprobsFormatter | None = None
    # With echo: each prompt's (text, token ids), in prompt order.
    echo: list[tuple[str, list[int]]] | None = None


async def complete(run: RequestRun, header: ResponseHeader) -> CompletionResponse:
    choices = [CompletionChoice(index=index, text="") for index in range(header.num_choices)]
    if header.logprobs is not None:
        for choice in choices:
            choice.logprobs = CompletionLogprobs()
    # Each prompt's logprobs, which come with one of its choices' messages.
    prompt_logprobs: dict[int, Sequence[common_pb2.TokenLogprobs]] = {}
    choices_per_prompt = header.num_choices // len(header.echo) if header.echo else 1
    async for index, message in run.messages():
        choice = choices[index]
        choice.text += message.text
        choice.finish_reason = finish_reason_name(message.finish_reason) or choice.finish_reason
        if header.logprobs is not None and choice.logprobs is not None:
            header.logprobs.add_completion(choice.logprobs, message.token_ids, message.logprobs)
        if message.prompt_logprobs:
            prompt_logprobs[index // choices_per_prompt] = message.prompt_logprobs
    if header.echo:
        for choice in choices:
            text, token_ids = header.echo[choice.index // choices_per_prompt]
            choice.text = text + choice.text
            if header.logprobs is not None and choice.logprobs is not None:
                scored = prompt_logprobs.get(choice.index // choices_per_prompt, [])
                choice.logprobs = header.logprobs.with_prompt(choice.logprobs, token_ids, scored)
    return CompletionResponse(
        id=header.id, created=header.created, model=header.model, choices=choices, usage=run.tally.usage()
    )


async def completion_chunks(
    run: RequestRun, header: ResponseHeader, include_usage: bool
) -> AsyncIterator[CompletionResponse]:
    async for index, message in run.messages():
        reason = finish_reason_name(message.finish_reason)
        if not message.text and reason is None and not message.logprobs:
            continue
        # Built from values this service made, so not validated again: one chunk per
        # message makes this the API's hottest path.
        choice = CompletionChoice.model_construct(index=index, text=message.text, finish_reason=reason)
        if header.logprobs is not None:
            choice.logprobs = CompletionLogprobs()
            header.logprobs.add_completion(choice.logprobs, message.token_ids, message.logprobs)
        yield CompletionResponse.model_construct(
            id=header.id, created=header.created, model=header.model, choices=[choice]
        )
    if include_usage:
        yield CompletionResponse(
            id=header.id, created=header.created, model=header.model, choices=[], usage=run.tally.usage()
        )
