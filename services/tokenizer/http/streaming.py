"""Server-sent events as OpenAI streams them: one `data: {json}` event per chunk, then
`data: [DONE]`. A failure after the stream began (a peer lost) can no longer change the
status, so it becomes an error event, as OpenAI's own streams carry errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel

from services.tokenizer.http.errors import http_error_of
from services.tokenizer.http.runner import RequestRun

DONE_EVENT = format_sse_event(data_str="[DONE]")


def event_of(chunk: BaseModel) -> bytes:
    # JSON escapes every line break, so the chunk is one `data:` line.
    return b"data: " + chunk.model_dump_json().encode() + b"\n\n"


async def _events(run: RequestRun, chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield event_of(chunk)
    except Exception as error:
        refusal = http_error_of(error)
        body = {
            "error": {"message": str(refusal), "type": "server_error", "param": refusal.param, "code": None}
        }
        yield format_sse_event(data_str=json.dumps(body))
    finally:
        # Ends the requests a client that went away leaves behind: the scheduler aborts them.
        await run.close()
    yield DONE_EVENT


def event_stream(run: RequestRun, chunks: AsyncIterator[BaseModel]) -> EventSourceResponse:
    return EventSourceResponse(_events(run, chunks), headers={"Cache-Control": "no-cache"})
