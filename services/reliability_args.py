"""The command-line options of failure handling: the watchdog every service runs on its
event loop, how a scheduler tells that its workers are gone and how long it holds their
requests, how long a tokenizer waits for an engine for a request whose engine failed, and
how `pagedserve serve` restarts the services that die or hang."""

import argparse

from services.common.grpc_server import ServerConfig
from services.flag_table import Flag, add_flags
from services.scheduler.worker_watch import WorkerWatchConfig
from services.supervisor import SupervisorConfig
from services.tokenizer.engine_pool import EnginePoolConfig
from services.tokenizer.migration import MigrationConfig


def add_watchdog_arg(parser: argparse.ArgumentParser) -> None:
    add_flags(
        parser,
        Flag(
            "--watchdog-timeout",
            float,
            ServerConfig.watchdog_timeout_s,
            "seconds the service's event loop may stall before the process exits to be "
            "restarted (its stack is logged at half of it); 0: no watchdog",
        ),
    )


def add_worker_watch_args(parser: argparse.ArgumentParser) -> None:
    """A scheduler's (and serve's, which passes them on)."""
    add_flags(
        parser,
        Flag(
            "--worker-timeout",
            float,
            WorkerWatchConfig.timeout_s,
            "seconds a worker may go without answering its health check before the scheduler "
            "takes it for dead: health goes NOT_SERVING, its requests wait to be recomputed",
        ),
        Flag(
            "--worker-recovery-timeout",
            float,
            WorkerWatchConfig.recovery_timeout_s,
            "seconds requests wait for failed workers to serve again before they fail with "
            "UNAVAILABLE (a tokenizer then moves them to another engine)",
        ),
    )


def worker_watch_config(args: argparse.Namespace) -> WorkerWatchConfig:
    try:
        return WorkerWatchConfig(
            timeout_s=args.worker_timeout, recovery_timeout_s=args.worker_recovery_timeout
        )
    except ValueError as error:
        raise SystemExit(f"pagedserve: --worker-timeout / --worker-recovery-timeout: {error}") from error


def add_engine_failure_args(parser: argparse.ArgumentParser) -> None:
    """A tokenizer's (and serve's, which passes them on)."""
    add_flags(
        parser,
        Flag(
            "--scheduler-timeout",
            float,
            EnginePoolConfig.health_timeout_s,
            "seconds a scheduler may leave its liveness check unanswered before the tokenizer "
            "takes its engine for down (its requests move if another engine serves)",
        ),
        Flag(
            "--engine-wait-timeout",
            float,
            MigrationConfig.engine_wait_s,
            "seconds a request whose engine failed waits for an engine to serve (the same one, "
            "restarted, if it is the only one) before it fails with UNAVAILABLE",
        ),
    )


def add_supervisor_args(parser: argparse.ArgumentParser) -> None:
    """How `pagedserve serve` restarts its services."""
    add_flags(
        parser,
        Flag(
            "--max-restarts",
            int,
            SupervisorConfig.max_restarts,
            "restarts of one service within --restart-window past which serve gives up and exits",
        ),
        Flag(
            "--restart-window",
            float,
            SupervisorConfig.restart_window_s,
            "seconds over which --max-restarts counts",
        ),
        Flag(
            "--hang-timeout",
            float,
            SupervisorConfig.hang_timeout_s,
            "seconds a running service may leave its liveness check unanswered before serve "
            "kills and restarts it (a stopped or hung process)",
        ),
    )


def supervisor_config(args: argparse.Namespace) -> SupervisorConfig:
    return SupervisorConfig(
        max_restarts=args.max_restarts, restart_window_s=args.restart_window, hang_timeout_s=args.hang_timeout
    )
