"""Names, ports and devices of the processes `pagedserve serve` runs: M tokenizers sharing
the public port, and N engines, each a scheduler and its worker ranks.

Engine 0's services keep the names of a one-engine stack ("scheduler", "worker",
"worker1", ...); engine e > 0 prefixes them with "engine{e}-". Tokenizer 0 is "tokenizer",
the others "tokenizer1", ... Metrics ports follow one another in that order from
--metrics-port: the tokenizers, then each engine's scheduler and ranks."""

from collections.abc import Mapping
from dataclasses import dataclass


def worker_name(rank: int) -> str:
    """A worker's service name: "worker" for rank 0 (the only one of most engines), then
    "worker1", "worker2", ..."""
    return "worker" if rank == 0 else f"worker{rank}"


def tokenizer_name(index: int) -> str:
    return "tokenizer" if index == 0 else f"tokenizer{index}"


def _engine_prefix(engine: int) -> str:
    return "" if engine == 0 else f"engine{engine}-"


@dataclass(frozen=True)
class ServeLayout:
    num_engines: int = 1
    num_tokenizers: int = 1
    # Worker ranks per engine.
    world_size: int = 1

    def scheduler(self, engine: int) -> str:
        return f"{_engine_prefix(engine)}scheduler"

    def workers(self, engine: int) -> list[str]:
        return [f"{_engine_prefix(engine)}{worker_name(rank)}" for rank in range(self.world_size)]

    def rendezvous(self, engine: int) -> str:
        return f"{_engine_prefix(engine)}rendezvous"

    def tokenizers(self) -> list[str]:
        return [tokenizer_name(index) for index in range(self.num_tokenizers)]

    def schedulers(self) -> list[str]:
        return [self.scheduler(engine) for engine in range(self.num_engines)]

    def metrics_offset(self, name: str) -> int:
        order = [*self.tokenizers()]
        for engine in range(self.num_engines):
            order += [self.scheduler(engine), *self.workers(engine)]
        return order.index(name)

    def cuda_devices(self, engine: int, visible: str | None) -> str:
        """CUDA_VISIBLE_DEVICES for an engine's ranks: the next world_size GPUs of those
        visible (`visible`, as the variable says, or all), so that engines never share one
        and each rank takes the GPU of its rank among them."""
        start = engine * self.world_size
        if visible:
            devices = [device.strip() for device in visible.split(",")]
            chosen = devices[start : start + self.world_size]
            if len(chosen) < self.world_size:
                raise ValueError(
                    f"--engines {self.num_engines} of {self.world_size} ranks need "
                    f"{self.num_engines * self.world_size} GPUs; CUDA_VISIBLE_DEVICES has {len(devices)}"
                )
            return ",".join(chosen)
        return ",".join(str(device) for device in range(start, start + self.world_size))


def stop_rank(name: str) -> int:
    """Front doors stop first, so that no new work arrives while the engines drain; then
    schedulers, then workers."""
    for rank, kind in enumerate(("tokenizer", "scheduler", "worker")):
        if kind in name:
            return rank
    return 3


def loopback_addresses(ports: Mapping[str, int], names: list[str]) -> list[str]:
    return [f"127.0.0.1:{ports[name]}" for name in names]
