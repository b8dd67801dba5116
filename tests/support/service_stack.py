"""Starts the three services as separate processes talking gRPC on loopback, the way
`pagedserve serve` and docker-compose do, each from its own CLI command."""

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from pagedserve.v1 import generation_pb2_grpc, scheduler_pb2_grpc

from services.common.tls import TlsConfig, channel_credentials
from services.launcher import free_port, loopback_service_commands, running_services

STARTUP_TIMEOUT_S = 180.0


@dataclass
class Stack:
    public_address: str
    scheduler_address: str
    worker_address: str
    generation: generation_pb2_grpc.GenerationStub
    scheduler: scheduler_pb2_grpc.SchedulerStub
    log_dir: Path
    # Each service's process, by name.
    processes: dict[str, subprocess.Popen]
    # Base URL of the OpenAI-compatible HTTP API (".../v1"), when the stack serves it.
    http_url: str | None = None
    # Every engine's scheduler address (--engines N), engine 0's first.
    scheduler_addresses: list[str] = field(default_factory=list)


@contextmanager
def service_stack(
    model_dir: Path,
    log_dir: Path,
    worker_args: list[str] = (),
    scheduler_args: list[str] = (),
    tokenizer_args: list[str] = (),
    env: dict[str, str] | None = None,
    http_api: bool = False,
    serve_flags: list[str] = (),
    tls: TlsConfig | None = None,
) -> Iterator[Stack]:
    """http_api: the tokenizer serves the OpenAI-compatible HTTP API too, on a free port.
    serve_flags: `pagedserve serve` options (such as --tensor-parallel-size); worker_args go
    to every worker rank. tls: the stack serves TLS (serve_flags name the same files); the
    stack's stubs and health probes use these files as the client's."""
    ports = {name: free_port() for name in ("worker", "scheduler", "tokenizer")}
    http_port = free_port() if http_api else None
    # The worker touches its pools at start-up; a small swap pool keeps the many stacks of
    # a test run light (a test that swaps sets its own).
    serve_flags = [
        *("--device", "cpu", "--swap-space", "0.25"),
        *(["--http-port", str(http_port)] if http_port else []),
        *serve_flags,
    ]
    # The command lines `pagedserve serve` would run, each service's own options after.
    commands = loopback_service_commands(model_dir, ports, serve_flags)
    addresses = {name: f"127.0.0.1:{ports[name]}" for name in commands}
    for name in commands:
        kind = "scheduler" if name.endswith("scheduler") else "tokenizer" if "tokenizer" in name else "worker"
        commands[name] += {"scheduler": scheduler_args, "tokenizer": tokenizer_args}.get(kind, worker_args)
    with (
        running_services(
            commands, addresses, log_dir, env, startup_timeout_s=STARTUP_TIMEOUT_S, stop_timeout_s=30, tls=tls
        ) as processes,
        _channel(addresses["tokenizer"], tls) as public,
        _channel(addresses["scheduler"], tls) as scheduler,
    ):
        yield Stack(
            public_address=addresses["tokenizer"],
            scheduler_address=addresses["scheduler"],
            worker_address=addresses["worker"],
            generation=generation_pb2_grpc.GenerationStub(public),
            scheduler=scheduler_pb2_grpc.SchedulerStub(scheduler),
            log_dir=log_dir,
            processes=processes,
            http_url=None if http_port is None else f"http://127.0.0.1:{http_port}/v1",
            scheduler_addresses=[addresses[name] for name in commands if name.endswith("scheduler")],
        )


def _channel(address: str, tls: TlsConfig | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, channel_credentials(tls))
