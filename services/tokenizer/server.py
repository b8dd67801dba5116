"""Runs the tokenizer service, the public front door:
`pagedserve tokenizer --model DIR --scheduler ADDRESS [--scheduler ADDRESS ...] --port N`."""

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from services.common.api_keys import ApiKeys
from services.common.caller_auth import CallerPolicy
from services.common.channels import DEFAULT_MAX_REQUEST_BYTES
from services.common.grpc_server import ServerConfig, ServiceHost
from services.tokenizer.engine_pool import EnginePool, EnginePoolConfig
from services.tokenizer.frontend import FrontendConfig, RequestFrontend
from services.tokenizer.generation import GenerationCore
from services.tokenizer.http.state import HttpApiConfig
from services.tokenizer.key_gate import KeyGate
from services.tokenizer.migration import MigrationConfig
from services.tokenizer.routing_metrics import RoutingMetrics
from services.tokenizer.sampling_defaults import describe, read_sampling_defaults
from services.tokenizer.servicer import GenerationServicer
from services.tokenizer.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from services.tokenizer.http.server import HttpApiServer

log = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(frozen=True)
class TokenizerServiceConfig:
    model_path: Path
    # The engines: scheduler addresses and dns:///name:port targets (EnginePoolConfig).
    engines: EnginePoolConfig
    # The scheduler waits for its worker's model to load; the front door waits as long.
    scheduler_startup_timeout_s: float = 900.0
    # Port of the OpenAI-compatible HTTP API on the same host; None serves none.
    http_port: int | None = None
    # The model's id on the HTTP API; None: the model directory's name.
    served_model_name: str | None = None
    # Keys both APIs require as bearer tokens, with their policies; None: the APIs are open.
    api_keys: ApiKeys | None = None
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    # Whether the model's generation_config.json fills the sampling fields a request
    # leaves unset.
    model_sampling_defaults: bool = True

    # Largest HTTP body a client may send (the gRPC port's limit is ServerConfig's).
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    def http_api_config(self) -> HttpApiConfig:
        return HttpApiConfig(
            served_model_name=self.served_model_name or self.model_path.name,
            max_body_bytes=self.max_request_bytes,
        )


async def serve_tokenizer(server_config: ServerConfig, config: TokenizerServiceConfig) -> None:
    tokenizer = TextTokenizer.from_model_dir(config.model_path)
    host = ServiceHost(server_config, [SERVICE_NAME], CallerPolicy(api_keys=config.api_keys))
    engines = EnginePool(config.engines)
    core = GenerationCore(engines, config.migration, RoutingMetrics(host.registry))
    gate = KeyGate(config.api_keys, registry=host.registry)
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(core, gate), host.server)
    port = await host.start()
    http_api: HttpApiServer | None = None
    if config.http_port is not None:
        # Imported here: a tokenizer that serves gRPC only never loads the HTTP stack.
        from services.tokenizer.http import server as http_server

        http_api = http_server.HttpApiServer(
            core,
            config.http_api_config(),
            host.registry,
            server_config.host,
            config.http_port,
            gate,
            server_config.tls,
            reuse_port=server_config.reuse_port,
        )
        await http_api.start()
    targets = ", ".join(config.engines.targets)
    log.info("tokenizer listening on port %d, waiting for schedulers at %s", port, targets)
    http_stopped: asyncio.Task[None] | None = None

    async def stop_http_api() -> None:
        # Both APIs drain at once: the HTTP one refuses new requests from now on.
        nonlocal http_stopped
        if http_api is not None:
            http_stopped = asyncio.create_task(http_api.stop(server_config.shutdown_grace_s))

    async def connect_scheduler() -> None:
        await engines.start()
        model = await engines.wait_for_model(config.scheduler_startup_timeout_s)
        core.model = model
        defaults = common_pb2.SamplingParams()
        if config.model_sampling_defaults:
            defaults = read_sampling_defaults(config.model_path, model.vocab_size)
        core.frontend = RequestFrontend(
            tokenizer,
            FrontendConfig(
                max_model_len=model.max_model_len, vocab_size=model.vocab_size, sampling_defaults=defaults
            ),
        )
        log.info("tokenizer serving %s; sampling defaults: %s", model.model_name, describe(defaults))

    try:
        # Ready while some engine serves: a request could go nowhere otherwise.
        await host.run(prepare=connect_scheduler, on_shutdown=stop_http_api, ready=lambda: engines.serving)
    finally:
        if http_stopped is not None:
            await http_stopped
        elif http_api is not None:
            await http_api.stop(0.0)
        await engines.close()


def run_tokenizer(server_config: ServerConfig, config: TokenizerServiceConfig) -> None:
    asyncio.run(serve_tokenizer(server_config, config))
