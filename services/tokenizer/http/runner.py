"""Runs an HTTP request's Generate requests (one per prompt) on the generation core: each
is started and its first message awaited before the response begins, so that a refusal
(bad input, a full queue) becomes an HTTP status rather than a broken stream; then their
messages are merged, each tagged with its choice index (prompt i, completion j: i*n+j)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field

from pagedserve.v1 import common_pb2, generation_pb2

from services.tokenizer.http.responses import PromptTokensDetails, Usage
from services.tokenizer.key_gate import Generate

Message = generation_pb2.GenerateResponse


@dataclass
class UsageTally:
    """The request's usage, from the last message of each of its completions: each
    prompt's tokens count once, however many completions it has."""

    prompt_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def add(self, prompt_index: int, message: Message) -> None:
        if message.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
            return
        self.prompt_tokens[prompt_index] = message.usage.prompt_tokens
        self.cached_tokens[prompt_index] = message.usage.cached_tokens
        self.completion_tokens += message.usage.completion_tokens

    def usage(self) -> Usage:
        prompt_tokens = sum(self.prompt_tokens.values())
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())),
        )


class RequestRun:
    """The started Generate requests of one HTTP request."""

    def __init__(self, streams: list[AsyncIterator[Message]], n: int) -> None:
        self._streams = streams
        self._n = n
        self.tally = UsageTally()

    @classmethod
    async def start(
        cls, generate: Generate, requests: Sequence[generation_pb2.GenerateRequest], n: int
    ) -> RequestRun:
        """Starts every request with `generate` (the core's, behind the caller's key policy);
        raises what any of them was refused with (and aborts the
        others)."""
        streams: list[AsyncIterator[Message]] = []
        try:
            for request in requests:
                generator = generate(request)
                first = await anext(generator)
                streams.append(_prepend(first, generator))
        except BaseException:
            for stream in streams:
                await stream.aclose()  # type: ignore[attr-defined]
            raise
        return cls(streams, n)

    async def messages(self) -> AsyncIterator[tuple[int, Message]]:
        """(choice index, message) for every message of every prompt, as they come."""
        if len(self._streams) == 1:
            async for message in self._streams[0]:
                self.tally.add(0, message)
                yield message.index, message
            return
        async for prompt_index, message in _merge(self._streams):
            self.tally.add(prompt_index, message)
            yield prompt_index * self._n + message.index, message

    async def close(self) -> None:
        for stream in self._streams:
            await stream.aclose()  # type: ignore[attr-defined]


async def _prepend(first: Message, rest: AsyncIterator[Message]) -> AsyncIterator[Message]:
    try:
        yield first
        async for message in rest:
            yield message
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


_DONE = object()


async def _merge(streams: list[AsyncIterator[Message]]) -> AsyncIterator[tuple[int, Message]]:
    """Interleaves the streams' messages as they arrive, each with its stream's index."""
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Message]) -> None:
        try:
            async for message in stream:
                await queue.put((index, message))
            await queue.put((index, _DONE))
        except Exception as error:
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                assert isinstance(item, Message)
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task
