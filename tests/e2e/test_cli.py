"""`pagedserve serve` starts the three services as processes and stops them on SIGTERM;
`pagedserve generate` streams from it."""

import signal
import subprocess
import sys
from pathlib import Path

import grpc
from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.launcher import free_port

CLI = [sys.executable, "-m", "services.cli", "--log-level", "WARNING"]


def _children(pid: int) -> list[int]:
    listing = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(line) for line in listing.stdout.split()]


def test_serve_generate_and_stop(embedded_model_dir: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--port",
            str(port),
            "--model",
            str(embedded_model_dir),
            "--device",
            "cpu",
            "--num-kv-blocks",
            "64",
            "--shutdown-grace",
            "5",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == f"pagedserve serving on port {port}"
        services = _children(server.pid)
        assert len(services) == 3
        _assert_internal_ports_want_the_token(services)
        generated = subprocess.run(
            [
                *CLI,
                "generate",
                "--address",
                f"127.0.0.1:{port}",
                "--max-tokens",
                "8",
                "--temperature",
                "0",
                "The capital of France is",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert generated.returncode == 0, generated.stderr
        assert "Paris" in generated.stdout
        assert "FINISH_REASON_LENGTH" in generated.stderr
        assert "completion 8 tokens" in generated.stderr

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in services)
    finally:
        server.kill()


def _assert_internal_ports_want_the_token(services: list[int]) -> None:
    """serve made up an internal token and gave it to its children in their environment:
    it is on no command line, and the scheduler refuses a caller without it."""
    for pid in services:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--internal-token" not in command_line
        if b"scheduler" in command_line:
            port = command_line[command_line.index(b"--port") + 1].decode()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)
            raise AssertionError("the scheduler answered a caller without the internal token")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_generate_reports_an_unreachable_server() -> None:
    result = subprocess.run(
        [*CLI, "generate", "--address", f"127.0.0.1:{free_port()}", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
