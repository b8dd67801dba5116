"""Runs the tokenizer service, the public front door:
`pagedserve tokenizer --model DIR --scheduler ADDRESS --port N`."""

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2_grpc

from services.common.channels import insecure_channel
from services.common.grpc_server import ServerConfig, ServiceHost, wait_for_serving
from services.tokenizer.frontend import FrontendConfig, RequestFrontend
from services.tokenizer.scheduler_session import SessionClient
from services.tokenizer.servicer import GenerationServicer
from services.tokenizer.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(frozen=True)
class TokenizerServiceConfig:
    model_path: Path
    scheduler_address: str
    # The scheduler waits for its worker's model to load; the front door waits as long.
    scheduler_startup_timeout_s: float = 900.0


async def serve_tokenizer(server_config: ServerConfig, config: TokenizerServiceConfig) -> None:
    tokenizer = TextTokenizer.from_model_dir(config.model_path)
    channel = insecure_channel(config.scheduler_address)
    scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
    host = ServiceHost(server_config, [SERVICE_NAME])
    session = SessionClient(scheduler)
    servicer = GenerationServicer(session)
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, host.server)
    port = await host.start()
    log.info("tokenizer listening on port %d, waiting for scheduler at %s", port, config.scheduler_address)

    async def connect_scheduler() -> None:
        await wait_for_serving(channel, config.scheduler_startup_timeout_s)
        model = await scheduler.GetModelInfo(common_pb2.GetModelInfoRequest())
        servicer.model = model
        servicer.frontend = RequestFrontend(
            tokenizer, FrontendConfig(max_model_len=model.max_model_len, vocab_size=model.vocab_size)
        )
        log.info("tokenizer serving %s", model.model_name)

    try:
        await host.run(prepare=connect_scheduler)
    finally:
        session.close()
        await channel.close()


def run_tokenizer(server_config: ServerConfig, config: TokenizerServiceConfig) -> None:
    asyncio.run(serve_tokenizer(server_config, config))
