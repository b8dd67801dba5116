"""The engines behind a tokenizer: one EngineClient per scheduler address, from fixed
addresses and from DNS names (`dns:///name:port`, e.g. a Kubernetes headless Service)
resolved again periodically, so that engines can come and go; and the routing of each
request to one of them (services/tokenizer/routing.py)."""

import asyncio
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from pagedserve.v1 import common_pb2

from services.common.block_hash import chained_hashes, hash_block, routing_key
from services.common.errors import UnavailableError
from services.common.peer_access import PeerAccess
from services.tokenizer.engine_client import EngineClient
from services.tokenizer.intake import Intake
from services.tokenizer.routing import RouteDecision, RoutingConfig, route

log = logging.getLogger(__name__)

DNS_SCHEME = "dns:///"


@dataclass(frozen=True)
class EnginePoolConfig:
    # Scheduler addresses, host:port, or dns:///name:port for every address of a name.
    targets: tuple[str, ...]
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    # How often DNS names are resolved again.
    resolve_interval_s: float = 5.0
    # After a request failed on an engine, how long it gets no new ones at least.
    suspend_after_failure_s: float = 2.0
    # TLS and the internal token of the link to each scheduler.
    access: PeerAccess = field(default_factory=PeerAccess)
    # Seconds a scheduler may leave its liveness check unanswered before it counts as not
    # serving (services/tokenizer/engine_health.py).
    health_timeout_s: float = 10.0


async def resolve(target: str) -> list[str]:
    """The host:port addresses a target stands for."""
    if not target.startswith(DNS_SCHEME):
        return [target]
    host, _, port = target.removeprefix(DNS_SCHEME).rpartition(":")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        log.warning("cannot resolve %s: %s", target, error)
        return []
    ips = sorted({str(info[4][0]) for info in infos})
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


class EnginePool:
    def __init__(self, config: EnginePoolConfig) -> None:
        self._config = config
        self.engines: dict[str, EngineClient] = {}
        # Requests being taken in, which every engine's session reports on.
        self.intake = Intake()
        self._resolver: asyncio.Task[None] | None = None
        self._num_routed = 0

    async def start(self) -> None:
        await self._update_addresses()
        if any(target.startswith(DNS_SCHEME) for target in self._config.targets):
            self._resolver = asyncio.create_task(self._resolve_periodically())

    async def _update_addresses(self) -> None:
        found: set[str] = set()
        for target in self._config.targets:
            found.update(await resolve(target))
        for address in sorted(found - self.engines.keys()):
            log.info("engine %s joins", address)
            engine = EngineClient(
                address,
                self._config.suspend_after_failure_s,
                self._config.health_timeout_s,
                self._config.access,
                self.intake,
            )
            self.engines[address] = engine
            engine.start()
        for address in sorted(self.engines.keys() - found):
            # Requests in flight there move on as from a failed engine when its channel closes.
            log.info("engine %s leaves", address)
            await self.engines.pop(address).close()

    async def _resolve_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._config.resolve_interval_s)
            await self._update_addresses()

    def available(self) -> list[EngineClient]:
        return [engine for engine in self.engines.values() if engine.available]

    @property
    def serving(self) -> bool:
        """Some engine serves, as of their latest reports: the tokenizer's readiness."""
        return any(engine.serving for engine in self.engines.values())

    async def wait_until_available(self, timeout_s: float) -> bool:
        """Whether an engine takes requests within timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.available():
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def wait_for_model(self, timeout_s: float) -> common_pb2.ModelInfo:
        """The served model, as the first engine to serve describes it."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.available():
            if asyncio.get_running_loop().time() > deadline:
                raise UnavailableError(f"no engine serving after {timeout_s:.0f}s: {self._config.targets}")
            await asyncio.sleep(0.2)
        return await self.available()[0].model_info()

    def choose(self, prompt_token_ids: Sequence[int]) -> tuple[EngineClient, RouteDecision]:
        """The engine for a prompt, and why; raises UnavailableError when none serves."""
        engines = self.available()
        block_size = engines[0].block_size if engines else 0
        keys = [routing_key(h) for h in chained_hashes(prompt_token_ids, block_size)] if block_size else []
        affinity = keys[0] if keys else routing_key(hash_block(None, prompt_token_ids))
        views = sorted((engine.view() for engine in engines), key=lambda view: view.engine_id)
        if self._config.routing.policy == "round_robin" and views:
            view = views[self._num_routed % len(views)]
            decision = RouteDecision(view.engine_id, "round_robin", 0, view.load)
        else:
            decision = route(keys, affinity, views, self._config.routing)
        self._num_routed += 1
        engine = self.engines[decision.engine_id]
        engine.on_sent()
        return engine, decision

    async def close(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
        for engine in self.engines.values():
            await engine.close()
