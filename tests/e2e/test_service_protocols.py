"""What every service speaks besides its own API: health, reflection, graceful shutdown,
and UNAVAILABLE while a peer is missing."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pagedserve.v1 import generation_pb2

from services.launcher import free_port
from tests.support.service_stack import Stack


def _list_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        return {service.name for reply in replies for service in reply.list_services_response.service}


def test_reflection_lists_each_service(stack: Stack) -> None:
    assert "pagedserve.v1.Generation" in _list_services(stack.public_address)
    assert "pagedserve.v1.Scheduler" in _list_services(stack.scheduler_address)
    assert "pagedserve.v1.Worker" in _list_services(stack.worker_address)
    assert "grpc.health.v1.Health" in _list_services(stack.worker_address)


def test_health_is_serving_per_service(stack: Stack) -> None:
    for address, name in [
        (stack.public_address, "pagedserve.v1.Generation"),
        (stack.scheduler_address, "pagedserve.v1.Scheduler"),
        (stack.worker_address, "pagedserve.v1.Worker"),
    ]:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", name):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_front_door_waits_not_serving_then_drains(embedded_model_dir: Path) -> None:
    """With no scheduler behind it the tokenizer answers health NOT_SERVING and requests
    UNAVAILABLE; SIGTERM stops it cleanly."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "tokenizer",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            str(embedded_model_dir),
            "--scheduler",
            f"127.0.0.1:{free_port()}",
            "--shutdown-grace",
            "2",
        ]
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=30, wait_for_ready=True)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            alive = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
            assert alive.status == health_pb2.HealthCheckResponse.SERVING
            generation = generation_pb2_grpc_stub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                list(generation.Generate(generation_pb2.GenerateRequest(prompt="hi"), timeout=10))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - started < 10
    finally:
        process.kill()


def generation_pb2_grpc_stub(channel: grpc.Channel):
    from pagedserve.v1 import generation_pb2_grpc

    return generation_pb2_grpc.GenerationStub(channel)
