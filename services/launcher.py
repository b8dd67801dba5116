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
from functools import partial
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from services.common.grpc_server import LIVENESS_SERVICE
from services.common.metrics import serve_metrics
from services.common.tls import TlsConfig, channel_credentials
from services.reliability_args import supervisor_config
from services.security_args import service_env, tls_config
from services.serve_layout import ServeLayout, loopback_addresses, stop_rank
from services.supervisor import Supervisor, stop_services
from services.worker_flags import forwarded_speculative_flags, forwarded_weight_flags

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


def _probe_channel(address: str, tls: TlsConfig | None) -> grpc.Channel:
    if tls is None or not tls.enabled:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, channel_credentials(tls))


def is_serving(address: str, tls: TlsConfig | None = None, service: str = "") -> bool:
    """Whether the service at `address` reports SERVING: ready ("", the default), or alive
    (services/common/grpc_server.py's LIVENESS_SERVICE). Health is open to any caller, but
    over TLS (and mTLS) when the service serves it."""
    with _probe_channel(address, tls) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1.0)
        except grpc.RpcError:
            return False
    serving: bool = reply.status == health_pb2.HealthCheckResponse.SERVING
    return serving


def wait_until_serving(
    processes: Mapping[str, subprocess.Popen[bytes]],
    addresses: Mapping[str, str],
    log_dir: Path,
    timeout_s: float = STARTUP_TIMEOUT_S,
    tls: TlsConfig | None = None,
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
        pending = {name for name in pending if not is_serving(addresses[name], tls)}
        if time.monotonic() > deadline:
            raise TimeoutError(f"not serving after {timeout_s:.0f}s: {sorted(pending)}")
        time.sleep(0.2)


def _optional(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


def serve_layout(args: argparse.Namespace) -> ServeLayout:
    return ServeLayout(
        num_engines=args.engines,
        num_tokenizers=args.tokenizers,
        world_size=args.tensor_parallel_size * args.pipeline_parallel_size,
    )


def service_commands(
    args: argparse.Namespace, model_dir: Path, ports: dict[str, int]
) -> dict[str, list[str]]:
    """Each service's command line for `pagedserve serve` options `args`: every option
    goes to the services it concerns; the workers and schedulers listen on loopback, the
    tokenizers (several share the port) on --host.

    ports: by service name (services/serve_layout.py), "worker" and "scheduler" at least.
    Every other engine service, and each parallel engine's rendezvous, gets a free port
    where `ports` has none, and is added to it; every tokenizer gets --port."""
    layout = serve_layout(args)
    commands: dict[str, list[str]] = {}
    for engine in range(layout.num_engines):
        extra = [layout.scheduler(engine), *layout.workers(engine)]
        extra += [layout.rendezvous(engine)] if layout.world_size > 1 else []
        for name in extra:
            ports.setdefault(name, free_port())
        commands.update(_worker_commands(args, model_dir, ports, layout, engine))
        commands[layout.scheduler(engine)] = _scheduler_command(args, ports, layout, engine)
    for name in layout.tokenizers():
        # The tokenizers share the public port: any of them answering there is enough.
        ports[name] = args.port
        commands[name] = [
            *_service(args, "tokenizer", args.host, args.port, layout.metrics_offset(name)),
            *(["--reuse-port"] if layout.num_tokenizers > 1 else []),
            "--model",
            str(model_dir),
            *(
                f
                for address in loopback_addresses(ports, layout.schedulers())
                for f in ("--scheduler", address)
            ),
            # The HTTP port is shared as the gRPC one is.
            *_optional("--http-port", args.http_port),
            *_optional("--served-model-name", args.served_model_name),
            # Plain keys travel in the environment (service_env), off the command line.
            *(f for path in args.api_key_file for f in ("--api-key-file", str(path))),
            *("--engine-wait-timeout", str(args.engine_wait_timeout)),
            *("--scheduler-timeout", str(args.scheduler_timeout)),
            "--generation-config",
            args.generation_config,
            "--max-request-bytes",
            str(args.max_request_bytes),
        ]
    return commands


def _tls_flags(args: argparse.Namespace) -> list[str]:
    """Every service serves with the same certificate, presents it to the next one, and
    trusts the same CA."""
    return [
        *_optional("--ssl-certfile", args.ssl_certfile),
        *_optional("--ssl-keyfile", args.ssl_keyfile),
        *_optional("--ssl-ca-certs", args.ssl_ca_certs),
        *_optional("--ssl-server-name", args.ssl_server_name),
    ]


def _scheduler_command(
    args: argparse.Namespace, ports: dict[str, int], layout: ServeLayout, engine: int
) -> list[str]:
    name = layout.scheduler(engine)
    return [
        *_service(args, "scheduler", "127.0.0.1", ports[name], layout.metrics_offset(name)),
        *(f for address in loopback_addresses(ports, layout.workers(engine)) for f in ("--worker", address)),
        *_optional("--num-kv-blocks", args.num_kv_blocks),
        "--preemption-mode",
        args.preemption_mode,
        *_optional("--max-waiting-requests", args.max_waiting_requests),
        *([] if args.enable_prefix_caching else ["--no-prefix-caching"]),
        *([] if args.overlap_scheduling else ["--no-overlap-scheduling"]),
        *_optional("--max-steps-in-flight", args.max_steps_in_flight),
        "--max-stream-messages-per-step",
        str(args.max_stream_messages_per_step),
        *("--worker-timeout", str(args.worker_timeout)),
        *("--worker-recovery-timeout", str(args.worker_recovery_timeout)),
        *("--speculative-max-batch-size", str(args.speculative_max_batch_size)),
        *("--speculative-min-accepted-tokens", str(args.speculative_min_accepted_tokens)),
        *("--speculative-backoff-steps", str(args.speculative_backoff_steps)),
        *("--admission-batch-tokens", str(args.admission_batch_tokens)),
        *("--admission-max-delay-steps", str(args.admission_max_delay_steps)),
        *_optional("--max-prompt-tokens-with-decodes", args.max_prompt_tokens_with_decodes),
        *("--prompt-tokens-per-decode", str(args.prompt_tokens_per_decode)),
    ]


def _service(args: argparse.Namespace, command: str, host: str, port: int, metrics_offset: int) -> list[str]:
    """The start of a service's command line. --metrics-port P: service k of the layout's
    order (services/serve_layout.py) serves /metrics on P+k: with one tokenizer and one
    engine, the tokenizer on P, the scheduler on P+1, worker rank r on P+2+r."""
    metrics = [] if args.metrics_port is None else ["--metrics-port", str(args.metrics_port + metrics_offset)]
    return [
        *(sys.executable, "-m", "services.cli", "--log-level", args.log_level, command),
        *("--host", host, "--port", str(port), "--shutdown-grace", str(args.shutdown_grace)),
        *("--watchdog-timeout", str(args.watchdog_timeout)),
        *metrics,
        *_tls_flags(args),
    ]


def _worker_flags(args: argparse.Namespace, model_dir: Path) -> list[str]:
    return [
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
        *forwarded_speculative_flags(args),
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
        *(["--enforce-eager"] if args.enforce_eager else []),
        "--prefill-graphs" if args.prefill_graphs else "--no-prefill-graphs",
        "--swap-space",
        str(args.swap_space),
        # The worker is built for steps this large; the scheduler adopts its limits.
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
    ]


def _engine_env(args: argparse.Namespace, layout: ServeLayout, engine: int) -> list[str]:
    """An `env` prefix that keeps engines apart: on CUDA each engine's ranks see only their
    own GPUs, continuing the numbering; on CPU each rank takes its share of the cores (its
    threads would otherwise all spin on every core, and steps slow down many times)."""
    if layout.num_engines < 2:
        return []
    if args.device.startswith(("cuda", "auto")):
        return [
            "env",
            f"CUDA_VISIBLE_DEVICES={layout.cuda_devices(engine, os.environ.get('CUDA_VISIBLE_DEVICES'))}",
        ]
    if args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // (layout.num_engines * layout.world_size))
        return ["env", f"OMP_NUM_THREADS={threads}"]
    return []


def _worker_commands(
    args: argparse.Namespace, model_dir: Path, ports: dict[str, int], layout: ServeLayout, engine: int
) -> dict[str, list[str]]:
    flags = _worker_flags(args, model_dir)
    workers = layout.workers(engine)
    if len(workers) > 1:
        flags += [
            "--tensor-parallel-size",
            str(args.tensor_parallel_size),
            "--pipeline-parallel-size",
            str(args.pipeline_parallel_size),
            "--dist-init-addr",
            f"127.0.0.1:{ports[layout.rendezvous(engine)]}",
        ]
    return {
        name: [
            *_engine_env(args, layout, engine),
            *_service(args, "worker", "127.0.0.1", ports[name], layout.metrics_offset(name)),
            *flags,
            *(["--rank", str(rank)] if len(workers) > 1 else []),
        ]
        for rank, name in enumerate(workers)
    }


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


@contextmanager
def running_services(
    commands: Mapping[str, list[str]],
    addresses: Mapping[str, str],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    stop_timeout_s: float = 30.0,
    tls: TlsConfig | None = None,
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
        wait_until_serving(processes, addresses, log_dir, startup_timeout_s, tls)
        yield processes
    finally:
        stop_services(processes, stop_timeout_s, stop_rank)


def serve_all(args: argparse.Namespace, model_dir: Path) -> int:
    """Runs every service until SIGTERM or SIGINT, restarting those that fail
    (services/supervisor.py); 1 when one fails more often than it may, or the stack is not
    ready within STARTUP_TIMEOUT_S."""
    ports = {"worker": free_port(), "scheduler": free_port()}
    commands = service_commands(args, model_dir, ports)
    env = {**os.environ, **service_env(args, os.environ)}
    tls = tls_config(args)
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    layout = serve_layout(args)
    addresses = {name: f"127.0.0.1:{ports[name]}" for name in commands}
    registry = CollectorRegistry()
    supervisor = Supervisor(
        commands,
        addresses,
        [layout.workers(engine) for engine in range(layout.num_engines) if layout.world_size > 1],
        supervisor_config(args),
        is_alive=partial(is_serving, tls=tls, service=LIVENESS_SERVICE),
        registry=registry,
        env=env,
    )
    if args.metrics_port is not None:
        # After every service's metrics port (services/serve_layout.py).
        serve_metrics(registry, args.metrics_port + len(commands), "127.0.0.1")
    supervisor.start_all()
    ready: set[str] = set()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    exit_code = 0
    try:
        while not stop_requested:
            if not supervisor.check(time.monotonic()):
                exit_code = 1
                break
            if len(ready) < len(addresses):
                ready |= {name for name in addresses.keys() - ready if is_serving(addresses[name], tls)}
                if len(ready) == len(addresses):
                    print(f"pagedserve serving on port {args.port}", flush=True)
                elif time.monotonic() > deadline:
                    log.error(
                        "services not ready after %.0fs: %s", STARTUP_TIMEOUT_S, addresses.keys() - ready
                    )
                    exit_code = 1
                    break
            time.sleep(0.25)
    finally:
        supervisor.stop(stop_rank, args.shutdown_grace + 5)
    return exit_code
