"""Runs the scheduler process: `pagedserve scheduler --worker ADDRESS [--worker ADDRESS ...]
--port N`, with one --worker per rank of its model replica, in rank order."""

import asyncio
import logging
from dataclasses import dataclass, field

from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2

from services.common.grpc_server import ServerConfig, ServiceHost
from services.common.step_limits import StepLimits
from services.scheduler.config import SchedulerConfig
from services.scheduler.engine import Engine
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.scheduler import Scheduler
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.worker_group import WorkerGroup
from services.scheduler.worker_watch import WorkerWatchConfig

log = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


@dataclass(frozen=True)
class SchedulerServiceConfig:
    # One address per rank of the model replica, in rank order.
    worker_addresses: tuple[str, ...]
    scheduling: SchedulerConfig
    # Model loads can take minutes; the scheduler waits for its worker that long.
    worker_startup_timeout_s: float = 600.0
    # Shortest time between two WatchLoad reports to a frontend.
    load_report_interval_s: float = 0.05
    # When workers count as dead, and how long their requests wait for them.
    worker_watch: WorkerWatchConfig = field(default_factory=WorkerWatchConfig)


def build_scheduler(config: SchedulerConfig, info: worker_pb2.WorkerInfo) -> Scheduler:
    """The scheduler of the worker `info` describes; raises StepLimitsError when `config`
    asks for larger steps than that worker is built for."""
    num_blocks = info.num_kv_blocks
    if config.num_kv_blocks is not None:
        num_blocks = min(num_blocks, config.num_kv_blocks)
    return Scheduler(
        config,
        num_blocks=num_blocks,
        block_size=info.block_size,
        max_model_len=info.model.max_model_len,
        eos_token_ids=list(info.model.eos_token_ids),
        num_cpu_blocks=info.num_cpu_blocks,
        worker_limits=StepLimits.from_worker_info(info),
        num_speculative_tokens=info.num_speculative_tokens,
        sliding_window=info.sliding_window,
    )


async def serve_scheduler(server_config: ServerConfig, config: SchedulerServiceConfig) -> None:
    host = ServiceHost(server_config, [SERVICE_NAME])
    servicer = SchedulerServicer(config.load_report_interval_s)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, host.server)
    port = await host.start()
    log.info(
        "scheduler listening on port %d, waiting for workers at %s", port, ", ".join(config.worker_addresses)
    )
    workers = WorkerGroup(config.worker_addresses, server_config.peer_access())
    background: list[asyncio.Task[None]] = []

    metrics = SchedulerMetrics(
        host.registry,
        lambda: servicer.engine.scheduler.stats() if servicer.engine else scheduler_pb2.SchedulerStats(),
    )

    async def connect_worker() -> None:
        await workers.wait_until_serving(config.worker_startup_timeout_s)
        info = await workers.describe()

        async def report_serving(serving: bool) -> None:
            await (host.set_serving() if serving else host.set_not_serving())

        engine = Engine(
            build_scheduler(config.scheduling, info), workers, metrics, report_serving, config.worker_watch
        )
        servicer.model.CopyFrom(info.model)
        # The pool may hold fewer tokens than the model's context: callers see the real limit.
        servicer.model.max_model_len = engine.scheduler.max_model_len
        servicer.engine = engine
        background.append(asyncio.create_task(engine.run()))
        stats = engine.scheduler.stats()
        limits = engine.scheduler.limits
        log.info(
            "scheduler ready: %s on %d worker ranks, %d KV blocks, %d CPU swap blocks, steps of "
            "up to %d sequences and %d tokens, %d in flight",
            info.model.model_name,
            workers.size,
            stats.num_total_blocks,
            stats.num_total_cpu_blocks,
            limits.max_num_seqs,
            limits.max_num_batched_tokens,
            limits.max_steps_in_flight,
        )

    try:
        await host.run(prepare=connect_worker, on_shutdown=servicer.drain)
    finally:
        for task in background:
            task.cancel()
        await workers.close()


def run_scheduler(server_config: ServerConfig, config: SchedulerServiceConfig) -> None:
    asyncio.run(serve_scheduler(server_config, config))
