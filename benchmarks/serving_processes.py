"""The serving benchmark's load from several client processes: one Python process parsing
every streamed message can be what limits a run at tens of thousands of tokens a second
(an HTTP client more than a gRPC one), which would then be charged to the server.

Request i goes to process i mod N with its own arrival offset; the processes start their
clocks together, past a barrier (time.perf_counter is CLOCK_MONOTONIC on Linux, shared by
every process of the machine), so that the merged records read as one open-loop run.

One process is a process too, and the warm-up a run of its own, so that runs share no
client state: grpc.aio keeps state per event loop, and `--serve` runs on the H200 machine
(Python 3.12, grpcio 1.85), which reused one process for several loops, ended in "Event
loop is closed" errors whose cause was not isolated."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from benchmarks.serving_datasets import ServingRequest
from benchmarks.serving_metrics import RequestRecord

# (api, target, requests, offsets) -> (records, duration): the run of one process.
RunRate = Callable[[str, str, Sequence[ServingRequest], list[float]], Awaitable[tuple]]


def run_in_processes(
    run_rate: RunRate,
    api: str,
    target: str,
    requests: Sequence[ServingRequest],
    offsets: list[float],
    num_processes: int,
) -> tuple[list[RequestRecord], float]:
    num_processes = max(1, num_processes)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(num_processes)
    results = context.Queue()
    processes = [
        context.Process(
            target=_part,
            args=(
                run_rate,
                api,
                target,
                requests[i::num_processes],
                offsets[i::num_processes],
                barrier,
                results,
                i,
            ),
        )
        for i in range(num_processes)
    ]
    for process in processes:
        process.start()
    parts: dict[int, tuple[list[RequestRecord], float, float]] = {}
    for _ in processes:
        index, part = results.get()
        parts[index] = part
    for process in processes:
        process.join()
    records: list[RequestRecord] = [None] * len(requests)  # type: ignore[list-item]
    for index, (part_records, _, _) in parts.items():
        records[index::num_processes] = part_records
    start = min(started for _, started, _ in parts.values())
    end = max(started + duration for _, started, duration in parts.values())
    return records, end - start


def _part(
    run_rate: RunRate,
    api: str,
    target: str,
    requests: Sequence[ServingRequest],
    offsets: list[float],
    barrier: Any,
    results: Any,
    index: int,
) -> None:
    async def run() -> tuple:
        barrier.wait()
        started = time.perf_counter()
        records, duration = await run_rate(api, target, requests, offsets)
        return records, started, duration

    results.put((index, asyncio.run(run())))
