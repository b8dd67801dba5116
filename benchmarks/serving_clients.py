"""The serving benchmark's clients: each request streamed on its own call, sent at its
arrival time whatever the server's state (open loop), its messages timed as they come.

Both APIs ask for exactly `output_len` greedy tokens (EOS ignored), so that a run's token
counts are the dataset's on every server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
import httpx
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from benchmarks.serving_datasets import ServingRequest
from benchmarks.serving_metrics import RequestRecord

SendOne = Callable[[ServingRequest, RequestRecord], Awaitable[None]]


async def run_open_loop(
    requests: Sequence[ServingRequest], arrival_offsets: Sequence[float], send_one: SendOne
) -> tuple[list[RequestRecord], float]:
    """Sends request i at arrival_offsets[i] seconds after the start; returns every
    request's record (in request order) and the run's duration, from the start to the
    last request's end."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    records: list[RequestRecord] = []
    tasks = []
    for request, offset in zip(requests, arrival_offsets, strict=True):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record = RequestRecord(prompt_len=len(request.prompt_token_ids), sent_at=time.perf_counter())
        records.append(record)
        tasks.append(loop.create_task(_recorded(send_one, request, record)))
    await asyncio.gather(*tasks)
    end = max((r.token_times[-1] for r in records if r.token_times), default=time.perf_counter())
    return records, end - start


async def _recorded(send_one: SendOne, request: ServingRequest, record: RequestRecord) -> None:
    try:
        await send_one(request, record)
    except grpc.aio.AioRpcError as error:
        record.error = error.code().name
    except httpx.HTTPError as error:
        record.error = type(error).__name__


def grpc_sender(channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]] = ()) -> SendOne:
    stub = generation_pb2_grpc.GenerationStub(channel)

    async def send_one(request: ServingRequest, record: RequestRecord) -> None:
        message = generation_pb2.GenerateRequest(
            prompt_token_ids=request.prompt_token_ids,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=request.output_len, ignore_eos=True),
        )
        async for response in stub.Generate(message, metadata=tuple(metadata)):
            if response.token_ids:
                record.token_times.append(time.perf_counter())
                record.output_tokens += len(response.token_ids)

    return send_one


def http_sender(client: httpx.AsyncClient, model: str) -> SendOne:
    """Streams /v1/completions with token-id prompts; the token count comes from the
    final usage chunk."""

    async def send_one(request: ServingRequest, record: RequestRecord) -> None:
        body = {
            "model": model,
            "prompt": request.prompt_token_ids,
            "max_tokens": request.output_len,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    record.token_times.append(time.perf_counter())
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]

    return send_one


async def served_model_name(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]
