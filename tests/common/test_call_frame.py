"""A stream the caller leaves is counted as CANCELLED however the server learns of it.

A real gRPC server with the call interceptor streams to a real client that reads a few
messages and cancels. The handler never awaits, so the cancel reaches the server while
it is writing: the handler's generator is then closed at a yield (GeneratorExit), not
cancelled inside an await, and must still count as CANCELLED."""

import asyncio
from collections.abc import AsyncIterator

import grpc
from prometheus_client import CollectorRegistry

from services.common.call_frame import CallInterceptor

METHOD = "/test.Endless/Stream"


async def _endless(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    while True:
        yield b"x" * 65536


def _count(registry: CollectorRegistry, code: str) -> float:
    value = registry.get_sample_value(
        "pagedserve:grpc_server_handled_total", {"method": "Stream", "code": code}
    )
    return value or 0.0


async def _cancel_mid_stream(registry: CollectorRegistry) -> None:
    server = grpc.aio.server(interceptors=[CallInterceptor(registry)])
    handler = grpc.unary_stream_rpc_method_handler(_endless)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Endless", {"Stream": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream(METHOD)(b"")
            for _ in range(3):
                await call.read()
            call.cancel()
        for _ in range(200):
            if _count(registry, "CANCELLED") + _count(registry, "OK") > 0:
                break
            await asyncio.sleep(0.05)
    finally:
        await server.stop(grace=None)


def test_a_stream_left_mid_write_is_counted_cancelled() -> None:
    registry = CollectorRegistry()
    asyncio.run(_cancel_mid_stream(registry))
    assert (_count(registry, "CANCELLED"), _count(registry, "OK")) == (1.0, 0.0)
