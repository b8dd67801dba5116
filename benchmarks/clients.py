"""The benchmark's clients of the public gRPC API: each request streamed on its own call,
from client processes that start sending together."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from multiprocessing.synchronize import Barrier

import grpc
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from services.launcher import STARTUP_TIMEOUT_S

# (request id, prompt token ids, output tokens)
Request = tuple[str, list[int], int]


def greedy_sampling(max_tokens: int) -> common_pb2.SamplingParams:
    """Every benchmark request's: greedy, exactly max_tokens tokens (EOS ignored)."""
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, seed=0)


def run_clients(
    address: str, requests: list[Request], num_clients: int
) -> tuple[dict[str, list[int]], float, float]:
    """Sends the requests from num_clients processes that start together once every one
    of them has connected, as an in-process run has every request at once; returns each
    request's tokens, that start and the last token's arrival. Times are time.perf_counter:
    on Linux CLOCK_MONOTONIC, one clock for every process (the clients', the worker's)."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(num_clients + 1)
    shares = [requests[i::num_clients] for i in range(num_clients)]
    with context.Pool(num_clients, initializer=_keep_start_barrier, initargs=(barrier,)) as pool:
        pending = pool.starmap_async(_client_process, [(address, share) for share in shares])
        barrier.wait(timeout=STARTUP_TIMEOUT_S)
        started = time.perf_counter()
        results = pending.get()
    outputs: dict[str, list[int]] = {}
    for share_outputs, _ in results:
        outputs.update(share_outputs)
    return outputs, started, max(finish for _, finish in results)


# Each client process's copy of the barrier they all start at.
_start_barrier: Barrier | None = None


def _keep_start_barrier(barrier: Barrier) -> None:
    global _start_barrier
    _start_barrier = barrier


def _client_process(address: str, requests: list[Request]) -> tuple[dict[str, list[int]], float]:
    outputs = asyncio.run(generate_all(address, requests, _start_barrier))
    return outputs, time.perf_counter()


async def generate_all(
    address: str, requests: list[Request], start_barrier: Barrier | None = None
) -> dict[str, list[int]]:
    """Streams every request at once over one channel, once connected and past
    start_barrier (if any); returns each request's tokens."""
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        await channel.channel_ready()
        if start_barrier is not None:
            await asyncio.get_running_loop().run_in_executor(None, start_barrier.wait)

        async def generate(request_id: str, prompt: list[int], num_out: int) -> tuple[str, list[int]]:
            request = generation_pb2.GenerateRequest(
                request_id=request_id, prompt_token_ids=prompt, sampling=greedy_sampling(num_out)
            )
            tokens: list[int] = []
            async for response in stub.Generate(request):
                tokens.extend(response.token_ids)
            return request_id, tokens

        pairs = await asyncio.gather(*(generate(*r) for r in requests))
    return dict(pairs)
