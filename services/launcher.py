"""`pagedserve serve`: the three services as separate processes on this machine, the
worker and scheduler on loopback ports, the public API on --port."""

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def is_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    serving: bool = reply.status == health_pb2.HealthCheckResponse.SERVING
    return serving


def wait_until_serving(
    processes: Mapping[str, subprocess.Popen[bytes]],
    addresses: Mapping[str, str],
    log_dir: Path,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> None:
    """Waits until every service in `addresses` reports SERVING; raises, with the end of
    its log (`log_dir/NAME.log`), as soon as one of `processes` exits."""
    deadline = time.monotonic() + timeout_s
    pending = set(addresses)
    while pending:
        for name, process in processes.items():
            if process.poll() is not None:
                log_text = (log_dir / f"{name}.log").read_text()
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_text[-4000:]}")
        pending = {name for name in pending if not is_serving(addresses[name])}
        if time.monotonic() > deadline:
            raise TimeoutError(f"not serving after {timeout_s:.0f}s: {sorted(pending)}")
        time.sleep(0.2)


def _optional(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


def service_commands(
    args: argparse.Namespace, model_dir: Path, worker_port: int, scheduler_port: int
) -> dict[str, list[str]]:
    """Each service's command line for `pagedserve serve` options `args`: every option
    goes to the services it concerns; the worker and scheduler listen on loopback."""
    cli = [sys.executable, "-m", "services.cli", "--log-level", args.log_level]
    grace = ["--shutdown-grace", str(args.shutdown_grace)]
    kv_cap = _optional("--num-kv-blocks", args.num_kv_blocks)

    def metrics(offset: int) -> list[str]:
        # --metrics-port P: the tokenizer's /metrics on P, the scheduler's on P+1, the
        # worker's on P+2.
        return [] if args.metrics_port is None else ["--metrics-port", str(args.metrics_port + offset)]

    return {
        "worker": [
            *cli,
            "worker",
            "--host",
            "127.0.0.1",
            "--port",
            str(worker_port),
            *grace,
            "--model",
            str(model_dir),
            "--device",
            args.device,
            "--block-size",
            str(args.block_size),
            *_optional("--dtype", args.dtype),
            *_optional("--max-model-len", args.max_model_len),
            *kv_cap,
            "--gpu-memory-utilization",
            str(args.gpu_memory_utilization),
            *(["--enforce-eager"] if args.enforce_eager else []),
            "--swap-space",
            str(args.swap_space),
            # The worker is built for steps this large; the scheduler adopts its limits.
            "--max-num-seqs",
            str(args.max_num_seqs),
            "--max-num-batched-tokens",
            str(args.max_num_batched_tokens),
            *metrics(2),
        ],
        "scheduler": [
            *cli,
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(scheduler_port),
            *grace,
            "--worker",
            f"127.0.0.1:{worker_port}",
            *kv_cap,
            "--preemption-mode",
            args.preemption_mode,
            *_optional("--max-waiting-requests", args.max_waiting_requests),
            *([] if args.enable_prefix_caching else ["--no-prefix-caching"]),
            *([] if args.overlap_scheduling else ["--no-overlap-scheduling"]),
            *_optional("--max-steps-in-flight", args.max_steps_in_flight),
            "--max-stream-messages-per-step",
            str(args.max_stream_messages_per_step),
            *metrics(1),
        ],
        "tokenizer": [
            *cli,
            "tokenizer",
            "--host",
            args.host,
            "--port",
            str(args.port),
            *grace,
            "--model",
            str(model_dir),
            "--scheduler",
            f"127.0.0.1:{scheduler_port}",
            *metrics(0),
            *_optional("--http-port", args.http_port),
            *_optional("--served-model-name", args.served_model_name),
            *_optional("--api-key", args.api_key),
        ],
    }


# Front door first, so that no new work arrives while the others drain.
STOP_ORDER = ("tokenizer", "scheduler", "worker")


def loopback_service_commands(
    model_dir: Path, ports: Mapping[str, int], serve_flags: list[str]
) -> dict[str, list[str]]:
    """The command lines `pagedserve serve SERVE_FLAGS` runs with every service on loopback
    at `ports` (by service name), for stacks that tests and benchmarks start themselves."""
    from services.cli import build_parser

    prefix = ["--log-level", "WARNING", "serve", "--host", "127.0.0.1", "--port", str(ports["tokenizer"])]
    args = build_parser().parse_args([*prefix, "--shutdown-grace", "5", *serve_flags])
    return service_commands(args, model_dir, ports["worker"], ports["scheduler"])


def stop_services(processes: Mapping[str, subprocess.Popen[bytes]], timeout_s: float) -> None:
    """Stops the services one after another in STOP_ORDER (any others after them): SIGTERM,
    up to timeout_s for it to drain and exit, then SIGKILL."""
    order = {name: index for index, name in enumerate(STOP_ORDER)}
    for name in sorted(processes, key=lambda name: order.get(name, len(order))):
        process = processes[name]
        if process.poll() is not None:
            continue
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_services(
    commands: Mapping[str, list[str]],
    addresses: Mapping[str, str],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    stop_timeout_s: float = 30.0,
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Starts each command (by service name) with its output in `log_dir/NAME.log` and `env`
    added to this process's environment, waits until every service in `addresses` is
    serving, yields the processes, and stops them (stop_services) however the block ends."""
    log_dir.mkdir(parents=True, exist_ok=True)
    # Unbuffered, so that a service's log is whole when it is read after a failure.
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, command in commands.items():
            # The child keeps its own descriptor of the log; ours can close at once.
            with open(log_dir / f"{name}.log", "w") as log:
                processes[name] = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=child_env
                )
        wait_until_serving(processes, addresses, log_dir, startup_timeout_s)
        yield processes
    finally:
        stop_services(processes, stop_timeout_s)


def serve_all(args: argparse.Namespace, model_dir: Path) -> int:
    worker_port, scheduler_port = free_port(), free_port()
    commands = service_commands(args, model_dir, worker_port, scheduler_port)
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # Children ignore the terminal's Ctrl-C (own process group); the launcher stops them
    # in order instead.
    processes = {name: subprocess.Popen(cmd, start_new_session=True) for name, cmd in commands.items()}
    addresses = {
        "worker": f"127.0.0.1:{worker_port}",
        "scheduler": f"127.0.0.1:{scheduler_port}",
        "tokenizer": f"127.0.0.1:{args.port}",
    }
    ready: set[str] = set()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    exit_code = 0
    try:
        while not stop_requested:
            dead = {name: p.returncode for name, p in processes.items() if p.poll() is not None}
            if dead:
                log.error("service exited: %s", dead)
                exit_code = 1
                break
            for name in addresses.keys() - ready:
                if is_serving(addresses[name]):
                    ready.add(name)
                    if len(ready) == len(addresses):
                        print(f"pagedserve serving on port {args.port}", flush=True)
            if len(ready) < len(addresses) and time.monotonic() > deadline:
                log.error("services not ready after %.0fs: %s", STARTUP_TIMEOUT_S, addresses.keys() - ready)
                exit_code = 1
                break
            time.sleep(0.25)
    finally:
        stop_services(processes, args.shutdown_grace + 5)
    return exit_code
