"""The `pagedserve` command.

pagedserve serve       the whole stack on this machine, one process per service
pagedserve tokenizer   the public front door (tokenizer / detokenizer service)
pagedserve scheduler   the continuous-batching scheduler of one model replica
pagedserve worker      a GPU worker (model, KV cache, sampler)
pagedserve generate    stream a completion from a running server
pagedserve materialize convert the embedded default model into a model directory
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from gpu_worker.config import WorkerConfig
from services import frontend_args
from services.common.channels import MAX_MESSAGE_BYTES
from services.common.grpc_server import ServerConfig
from services.common.step_limits import StepLimitsError
from services.common.telemetry import setup_tracing
from services.common.tls import TlsConfigError
from services.flag_table import Flag, add_flags
from services.parallel_args import add_parallel_args, add_rank_args, parallel_config
from services.reliability_args import (
    add_engine_failure_args,
    add_supervisor_args,
    add_watchdog_arg,
    add_worker_watch_args,
    worker_watch_config,
)
from services.scheduler_args import (
    add_kv_blocks_arg,
    add_scheduler_args,
    add_step_limit_args,
    scheduler_config,
)
from services.security_args import add_security_args, add_tls_args, api_keys, internal_token, tls_config
from services.worker_flags import GIB, add_worker_args, speculative_config


def _model_dir(model: str | None) -> Path:
    if model:
        return Path(model)
    from services.common.embedded_model import materialize_default_model

    return materialize_default_model()


def add_server_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    add_flags(
        parser,
        Flag("--host", None, ServerConfig.host, "address to listen on"),
        Flag("--port", int, default_port, "port to listen on"),
        Flag("--shutdown-grace", float, ServerConfig.shutdown_grace_s, "seconds to drain on SIGTERM"),
        Flag("--metrics-port", int, None, "serve Prometheus /metrics on this port"),
    )
    add_watchdog_arg(parser)


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="model directory (config.json, *.safetensors, tokenizer.json); "
        "default: the embedded SmolLM2-135M-Instruct",
    )


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The worker configuration that `pagedserve worker` options `args` ask for."""
    return WorkerConfig(
        model_path=_model_dir(args.model),
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        prefill_graphs=args.prefill_graphs,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        swap_space_bytes=int(args.swap_space * GIB),
        step_timeline_path=args.step_timeline,
        parallel=parallel_config(args),
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        load_format=args.load_format,
        speculative=speculative_config(args),
    )


def server_config(args: argparse.Namespace) -> ServerConfig:
    try:
        tls = tls_config(args)
    except TlsConfigError as error:
        raise SystemExit(f"pagedserve {args.command}: {error}") from error
    return ServerConfig(
        host=args.host,
        port=args.port,
        shutdown_grace_s=args.shutdown_grace,
        metrics_port=args.metrics_port,
        reuse_port=getattr(args, "reuse_port", False),
        tls=tls,
        internal_token=internal_token(args, os.environ),
        watchdog_timeout_s=args.watchdog_timeout,
        # Only the tokenizer's port is public; internal ones take the large step messages.
        max_receive_message_bytes=getattr(args, "max_request_bytes", MAX_MESSAGE_BYTES),
    )


def cmd_worker(args: argparse.Namespace) -> None:
    from gpu_worker.parallel.groups import ParallelStartupError
    from gpu_worker.server import run_worker

    config = worker_config(args)
    setup_tracing("pagedserve-worker", os.environ, {"pagedserve.worker.rank": args.rank})
    try:
        run_worker(server_config(args), config)
    except (ValueError, ParallelStartupError) as error:
        sys.exit(f"pagedserve worker: not starting: {error}")


def cmd_scheduler(args: argparse.Namespace) -> None:
    from services.scheduler.server import SchedulerServiceConfig, run_scheduler
    from services.scheduler.worker_group import WorkerGroupError

    config = SchedulerServiceConfig(
        worker_addresses=tuple(args.worker),
        scheduling=scheduler_config(args),
        worker_watch=worker_watch_config(args),
    )
    setup_tracing("pagedserve-scheduler", os.environ)
    try:
        run_scheduler(server_config(args), config)
    except (StepLimitsError, WorkerGroupError) as error:
        sys.exit(f"pagedserve scheduler: not starting: {error}")


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from services.tokenizer.engine_pool import EnginePoolConfig
    from services.tokenizer.migration import MigrationConfig
    from services.tokenizer.routing import RoutingConfig
    from services.tokenizer.server import TokenizerServiceConfig, run_tokenizer

    service = server_config(args)
    config = TokenizerServiceConfig(
        model_path=_model_dir(args.model),
        engines=EnginePoolConfig(
            targets=tuple(args.scheduler),
            routing=RoutingConfig(policy=args.routing_policy),
            access=service.peer_access(),
            health_timeout_s=args.scheduler_timeout,
        ),
        http_port=args.http_port,
        served_model_name=args.served_model_name,
        api_keys=api_keys(args, os.environ),
        migration=MigrationConfig(engine_wait_s=args.engine_wait_timeout),
        model_sampling_defaults=args.generation_config == "auto",
        max_request_bytes=args.max_request_bytes,
    )
    setup_tracing("pagedserve-tokenizer", os.environ)
    run_tokenizer(service, config)


def cmd_serve(args: argparse.Namespace) -> None:
    from services.launcher import serve_all

    sys.exit(serve_all(args, _model_dir(args.model)))


def cmd_generate(args: argparse.Namespace) -> None:
    from services.client import generate_to_stdout

    sys.exit(generate_to_stdout(args))


def cmd_materialize(args: argparse.Namespace) -> None:
    print(_model_dir(None))


def _add_front_door_args(parser: argparse.ArgumentParser) -> None:
    """What the tokenizer tier takes, from `pagedserve tokenizer` or `serve`."""
    frontend_args.add_http_api_args(parser)
    frontend_args.add_generation_config_arg(parser)
    frontend_args.add_request_limit_args(parser)
    add_security_args(parser, public=True)
    add_engine_failure_args(parser)


def _add_generate_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    generate = commands.add_parser("generate", help="stream a completion from a running server")
    generate.add_argument("prompt", help="prompt text (a user message with --chat)")
    generate.add_argument("--address", default="localhost:50051")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a chat message")
    generate.add_argument("--max-tokens", type=int, default=None)
    generate.add_argument("--temperature", type=float, default=None)
    generate.add_argument("--seed", type=int, default=None)
    add_tls_args(generate)
    generate.add_argument(
        "--api-key", action="append", default=[], help="API key to send (also $PAGEDSERVE_API_KEY)"
    )
    generate.set_defaults(handler=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run tokenizer, scheduler and worker on this machine")
    add_server_args(serve, default_port=50051)
    add_model_arg(serve)
    add_worker_args(serve)
    add_scheduler_args(serve)
    add_kv_blocks_arg(serve)
    add_parallel_args(serve)
    _add_front_door_args(serve)
    frontend_args.add_replica_args(serve)
    add_worker_watch_args(serve)
    add_supervisor_args(serve)
    serve.set_defaults(handler=cmd_serve)

    tokenizer = commands.add_parser("tokenizer", help="run the tokenizer service (public API)")
    add_server_args(tokenizer, default_port=50051)
    add_model_arg(tokenizer)
    frontend_args.add_engine_target_args(tokenizer)
    _add_front_door_args(tokenizer)
    tokenizer.set_defaults(handler=cmd_tokenizer)

    scheduler = commands.add_parser("scheduler", help="run the scheduler service")
    add_server_args(scheduler, default_port=50052)
    scheduler.add_argument(
        "--worker",
        action="append",
        required=True,
        help="worker address, host:port; once per rank of a parallel engine, in rank order",
    )
    add_step_limit_args(scheduler)
    add_scheduler_args(scheduler)
    add_kv_blocks_arg(scheduler)
    add_security_args(scheduler, public=False)
    add_worker_watch_args(scheduler)
    scheduler.set_defaults(handler=cmd_scheduler)

    worker = commands.add_parser("worker", help="run a GPU worker")
    add_server_args(worker, default_port=50053)
    add_model_arg(worker)
    add_worker_args(worker)
    add_kv_blocks_arg(worker)
    add_parallel_args(worker)
    add_rank_args(worker)
    worker.add_argument(
        "--step-timeline",
        type=Path,
        default=WorkerConfig.step_timeline_path,
        help="append each step's host and device times to this file, one JSON line per step",
    )
    add_security_args(worker, public=False)
    worker.set_defaults(handler=cmd_worker)

    _add_generate_parser(commands)

    materialize = commands.add_parser("materialize", help="convert the embedded model, print its directory")
    materialize.set_defaults(handler=cmd_materialize)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.handler(args)


if __name__ == "__main__":
    main()
