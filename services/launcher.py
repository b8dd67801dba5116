"""`pagedserve serve`: the three services as separate processes on this machine (one
worker per rank of a parallel engine), the workers and scheduler on loopback ports, the
public API on --port."""

import argparse
import logging
import os
import random
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

from services.worker_flags import forwarded_weight_flags

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0


def free_port() -> int:
    """A loopback port free now, chosen below the kernel's ephemeral range: a port from that
    range can be taken by any outgoing connection (gloo opens many between the ranks of a
    parallel engine) before the service that was given it binds it."""
    lowest_ephemeral = _lowest_ephemeral_port()
    for _ in range(64):
        port = random.randrange(10_000, lowest_ephemeral) if lowest_ephemeral > 11_000 else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            bound: int = sock.getsockname()[1]
            return bound
    raise RuntimeError("no free loopback port found")


def _lowest_ephemeral_port() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


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


def worker_name(rank: int) -> str:
    """A worker's service name: "worker" for rank 0 (the only one of most engines), then
    "worker1", "worker2", ..."""
    return "worker" if rank == 0 else f"worker{rank}"


def service_commands(
    args: argparse.Namespace, model_dir: Path, ports: dict[str, int]
) -> dict[str, list[str]]:
    """Each service's command line for `pagedserve serve` options `args`: every option
    goes to the services it concerns; the workers and scheduler listen on loopback.

    ports: by service name, "worker" and "scheduler" at least. The workers of ranks past 0
    and the ranks' rendezvous ("rendezvous") get free ports where `ports` has none, and are
    added to it."""
    world_size = args.tensor_parallel_size * args.pipeline_parallel_size
    workers = [worker_name(rank) for rank in range(world_size)]
    for name in [*workers[1:], *(["rendezvous"] if world_size > 1 else [])]:
        ports.setdefault(name, free_port())
    commands = _worker_commands(args, model_dir, ports, workers)
    commands["scheduler"] = [
        *_service(args, "scheduler", "127.0.0.1", ports["scheduler"], metrics_offset=1),
        *(flag for name in workers for flag in ("--worker", f"127.0.0.1:{ports[name]}")),
        *_optional("--num-kv-blocks", args.num_kv_blocks),
        "--preemption-mode",
        args.preemption_mode,
        *_optional("--max-waiting-requests", args.max_waiting_requests),
        *([] if args.enable_prefix_caching else ["--no-prefix-caching"]),
        *([] if args.overlap_scheduling else ["--no-overlap-scheduling"]),
        *_optional("--max-steps-in-flight", args.max_steps_in_flight),
        "--max-stream-messages-per-step",
        str(args.max_stream_messages_per_step),
    ]
    commands["tokenizer"] = [
        *_service(args, "tokenizer", args.host, args.port, metrics_offset=0),
        "--model",
        str(model_dir),
        "--scheduler",
        f"127.0.0.1:{ports['scheduler']}",
        *_optional("--http-port", args.http_port),
        *_optional("--served-model-name", args.served_model_name),
        *_optional("--api-key", args.api_key),
    ]
    return commands


def _service(args: argparse.Namespace, command: str, host: str, port: int, metrics_offset: int) -> list[str]:
    """The start of a service's command line. --metrics-port P: the tokenizer's /metrics on
    P, the scheduler's on P+1, worker rank r's on P+2+r."""
    metrics = [] if args.metrics_port is None else ["--metrics-port", str(args.metrics_port + metrics_offset)]
    return [
        *(sys.executable, "-m", "services.cli", "--log-level", args.log_level, command),
        *("--host", host, "--port", str(port), "--shutdown-grace", str(args.shutdown_grace)),
        *metrics,
    ]


def _worker_commands(
    args: argparse.Namespace, model_dir: Path, ports: dict[str, int], workers: list[str]
) -> dict[str, list[str]]:
    flags = [
        "--model",
        str(model_dir),
        # Each rank of a group on "cuda" takes the GPU of its rank (WorkerConfig.resolve_device).
        "--device",
        args.device,
        "--block-size",
        str(args.block_size),
        *_optional("--dtype", args.dtype),
        *_optional("--max-model-len", args.max_model_len),
        *_optional("--num-kv-blocks", args.num_kv_blocks),
        *forwarded_weight_flags(args),
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
    ]
    if len(workers) > 1:
        flags += [
            "--tensor-parallel-size",
            str(args.tensor_parallel_size),
            "--pipeline-parallel-size",
            str(args.pipeline_parallel_size),
            "--dist-init-addr",
            f"127.0.0.1:{ports['rendezvous']}",
        ]
    return {
        name: [
            *_service(args, "worker", "127.0.0.1", ports[name], metrics_offset=2 + rank),
            *flags,
            *(["--rank", str(rank)] if len(workers) > 1 else []),
        ]
        for rank, name in enumerate(workers)
    }


# Front door first, so that no new work arrives while the others drain.
STOP_ORDER = ("tokenizer", "scheduler", "worker")


def loopback_service_commands(
    model_dir: Path, ports: dict[str, int], serve_flags: list[str]
) -> dict[str, list[str]]:
    """The command lines `pagedserve serve SERVE_FLAGS` runs with every service on loopback
    at `ports` (by service name; see service_commands), for stacks that tests and
    benchmarks start themselves."""
    from services.cli import build_parser

    prefix = ["--log-level", "WARNING", "serve", "--host", "127.0.0.1", "--port", str(ports["tokenizer"])]
    args = build_parser().parse_args([*prefix, "--shutdown-grace", "5", *serve_flags])
    return service_commands(args, model_dir, ports)


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
    ports = {"worker": free_port(), "scheduler": free_port(), "tokenizer": args.port}
    commands = service_commands(args, model_dir, ports)
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # Children ignore the terminal's Ctrl-C (own process group); the launcher stops them
    # in order instead.
    processes = {name: subprocess.Popen(cmd, start_new_session=True) for name, cmd in commands.items()}
    addresses = {name: f"127.0.0.1:{ports[name]}" for name in commands}
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
