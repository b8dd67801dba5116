"""Runs one GPU worker process: `pagedserve worker --model DIR --port N`."""

import asyncio
import logging
import os

from pagedserve.v1 import worker_pb2, worker_pb2_grpc

from gpu_worker.config import WorkerConfig
from gpu_worker.model_runner import ModelRunner
from gpu_worker.servicer import WorkerServicer
from gpu_worker.step_telemetry import StepTelemetry
from services.common.grpc_server import ServerConfig, ServiceHost

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


def _leave_the_group() -> None:
    """Ends a rank of a parallel group whose step stream ended. Its peers may be waiting in
    a collective for a step this rank will never run, and a new stream would start them
    out of step: the whole group restarts instead (each rank's supervisor starts it again,
    and the scheduler waits until every rank serves). A hard exit, because a thread may be
    blocked in a collective that nothing can interrupt."""
    log.error("step stream ended: leaving the parallel group so that it restarts whole")
    logging.shutdown()
    os._exit(1)


async def serve_worker(server_config: ServerConfig, worker_config: WorkerConfig) -> None:
    host = ServiceHost(server_config, [SERVICE_NAME])
    in_group = worker_config.parallel.world_size > 1
    telemetry = StepTelemetry(host.registry, worker_config.parallel.rank)
    servicer = WorkerServicer(telemetry, _leave_the_group if in_group else None)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, host.server)
    port = await host.start()
    log.info("worker listening on port %d, loading %s", port, worker_config.model_path)

    async def load_model() -> None:
        runner = await servicer.load(lambda: ModelRunner(worker_config))
        if runner.device.type == "cuda":
            # Start-up has compiled what it warms; Triton compiles for the GPU only.
            telemetry.late_compiles.start()
        info = runner.info()
        log.info(
            "worker ready: %d KV blocks of %d tokens on %s", info.num_kv_blocks, info.block_size, info.device
        )

    await host.run(prepare=load_model)


def run_worker(server_config: ServerConfig, worker_config: WorkerConfig) -> None:
    asyncio.run(serve_worker(server_config, worker_config))
