"""How the scheduler tells that its workers are gone: a step stream that breaks says so at
once, but a worker that stops answering (a stopped process, a hung host, a lost network)
breaks nothing. Each rank's health is asked all the time, on the channel the steps use;
a rank that has not answered SERVING for `timeout_s` is taken for dead, whatever its
stream says. A worker busy with a long step still answers: steps run on a thread of their
own, its event loop stays free."""

import asyncio
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import UnavailableError


@dataclass(frozen=True)
class WorkerWatchConfig:
    # Seconds a worker rank may go without answering its health check SERVING before its
    # engine takes it for dead (and its requests wait to be recomputed).
    timeout_s: float = 5.0
    # Seconds requests wait for the workers to serve again before they fail with
    # UNAVAILABLE (a tokenizer then moves them to another engine).
    recovery_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"worker timeout must be > 0 seconds, got {self.timeout_s}")
        if self.recovery_timeout_s <= 0:
            raise ValueError(f"worker recovery timeout must be > 0 seconds, got {self.recovery_timeout_s}")


async def watch_rank(channel: grpc.aio.Channel, name: str, timeout_s: float) -> None:
    """Returns never; raises UnavailableError once the worker behind `channel` (`name`
    says which) has not answered SERVING for timeout_s."""
    stub = health_pb2_grpc.HealthStub(channel)
    loop = asyncio.get_running_loop()
    interval_s = timeout_s / 4
    last_serving = loop.time()
    while True:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            problem = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                last_serving = loop.time()
        except grpc.aio.AioRpcError as error:
            problem = error.code().name
        silent_s = loop.time() - last_serving
        if silent_s >= timeout_s:
            raise UnavailableError(
                f"{name} has not answered SERVING for {silent_s:.1f}s (the worker timeout is "
                f"{timeout_s:g}s; last answer: {problem})"
            )
        await asyncio.sleep(interval_s)
