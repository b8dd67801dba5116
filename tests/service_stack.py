"""Starts the three services as separate processes talking gRPC on loopback, the way
`pagedserve serve` and docker-compose do, each from its own CLI command."""

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from pagedserve.v1 import generation_pb2_grpc, scheduler_pb2_grpc
from services.launcher import free_port, wait_until_serving

STARTUP_TIMEOUT_S = 180.0


@dataclass
class Stack:
    public_address: str
    scheduler_address: str
    worker_address: str
    generation: generation_pb2_grpc.GenerationStub
    scheduler: scheduler_pb2_grpc.SchedulerStub
    log_dir: Path


@contextmanager
def service_stack(model_dir: Path, log_dir: Path, worker_args: list[str] = (),
                  scheduler_args: list[str] = (), tokenizer_args: list[str] = (),
                  env: dict[str, str] | None = None) -> Iterator[Stack]:
    ports = {name: free_port() for name in ("worker", "scheduler", "tokenizer")}
    addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    cli = [sys.executable, "-m", "services.cli", "--log-level", "WARNING"]
    common = ["--host", "127.0.0.1", "--shutdown-grace", "5"]
    commands = {
        "worker": [*cli, "worker", *common, "--port", str(ports["worker"]), "--model", str(model_dir),
                   "--device", "cpu", *worker_args],
        "scheduler": [*cli, "scheduler", *common, "--port", str(ports["scheduler"]),
                      "--worker", addresses["worker"], *scheduler_args],
        "tokenizer": [*cli, "tokenizer", *common, "--port", str(ports["tokenizer"]), "--model", str(model_dir),
                      "--scheduler", addresses["scheduler"], *tokenizer_args],
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    processes: dict[str, subprocess.Popen] = {}
    channels: list[grpc.Channel] = []
    try:
        for name, command in commands.items():
            log = open(log_dir / f"{name}.log", "w")
            processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_until_serving(processes, addresses, log_dir, STARTUP_TIMEOUT_S)
        public = grpc.insecure_channel(addresses["tokenizer"])
        scheduler = grpc.insecure_channel(addresses["scheduler"])
        channels = [public, scheduler]
        yield Stack(
            public_address=addresses["tokenizer"],
            scheduler_address=addresses["scheduler"],
            worker_address=addresses["worker"],
            generation=generation_pb2_grpc.GenerationStub(public),
            scheduler=scheduler_pb2_grpc.SchedulerStub(scheduler),
            log_dir=log_dir,
        )
    finally:
        for channel in channels:
            channel.close()
        for name in ("tokenizer", "scheduler", "worker"):
            process = processes.get(name)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
