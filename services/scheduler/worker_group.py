"""The workers that together hold one model replica, as their scheduler sees them.

A model served by one GPU has one worker; under tensor and pipeline parallelism it has one
per rank, and the scheduler takes their addresses in rank order. Each step goes to every
rank's step stream (the ranks never talk gRPC to each other: they exchange tensors over
torch.distributed), every rank answers it, and one rank's answer (the one whose WorkerInfo
says reports_tokens) carries the sampled tokens.
Writing to each rank costs the scheduler one message per rank and step; in exchange no
rank waits for another to relay its step, and a rank that fails is seen on its own stream
at once, by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from pagedserve.v1 import worker_pb2, worker_pb2_grpc

from services.common.channels import WORKER_CHANNEL_OPTIONS
from services.common.errors import UnavailableError
from services.common.grpc_server import wait_for_serving
from services.common.peer_access import PeerAccess
from services.scheduler.worker_watch import watch_rank


class WorkerGroupError(RuntimeError):
    """The workers do not make one model replica (wrong order, different models)."""


@dataclass(frozen=True)
class WorkerRank:
    rank: int
    address: str
    stub: worker_pb2_grpc.WorkerStub
    # What every call to the rank carries (the internal token).
    metadata: tuple[tuple[str, str], ...] = ()

    def failure(self, what: str) -> UnavailableError:
        return UnavailableError(f"worker rank {self.rank} at {self.address} {what}")


class WorkerGroup:
    def __init__(self, addresses: Sequence[str], access: PeerAccess | None = None) -> None:
        if not addresses:
            raise ValueError("a scheduler needs at least one worker address")
        access = access or PeerAccess()
        self._channels = [access.channel(address, WORKER_CHANNEL_OPTIONS) for address in addresses]
        self.ranks = [
            WorkerRank(rank, address, worker_pb2_grpc.WorkerStub(channel), access.metadata)
            for rank, (address, channel) in enumerate(zip(addresses, self._channels))
        ]
        # Learnt by describe(); a single worker always reports its tokens.
        self.reporting_rank = 0

    @property
    def size(self) -> int:
        return len(self.ranks)

    async def wait_until_serving(self, timeout_s: float) -> None:
        await asyncio.gather(*(wait_for_serving(channel, timeout_s) for channel in self._channels))

    async def watch(self, timeout_s: float) -> None:
        """Returns never; raises UnavailableError naming the first rank that has not
        answered its health check SERVING for timeout_s (services/scheduler/worker_watch.py)."""
        watches = [
            asyncio.ensure_future(
                watch_rank(channel, f"worker rank {rank.rank} at {rank.address}", timeout_s)
            )
            for rank, channel in zip(self.ranks, self._channels)
        ]
        try:
            await asyncio.gather(*watches)
        finally:
            for watch in watches:
                watch.cancel()

    async def describe(self) -> worker_pb2.WorkerInfo:
        """What the group serves: rank 0's description, with the KV pools cut to what every
        rank holds. Raises WorkerGroupError when the ranks are not one replica in order."""
        infos = await asyncio.gather(
            *(rank.stub.Describe(worker_pb2.DescribeRequest(), metadata=rank.metadata) for rank in self.ranks)
        )
        first = infos[0]
        world_size = (first.tensor_parallel_size or 1) * (first.pipeline_parallel_size or 1)
        if world_size != self.size:
            raise WorkerGroupError(
                f"the worker at {self.ranks[0].address} belongs to an engine of {world_size} ranks "
                f"(tensor_parallel_size {first.tensor_parallel_size or 1} x pipeline_parallel_size "
                f"{first.pipeline_parallel_size or 1}); the scheduler was given {self.size} worker addresses"
            )
        for rank, info in zip(self.ranks, infos):
            if info.rank != rank.rank:
                raise WorkerGroupError(
                    f"the worker at {rank.address} is rank {info.rank}, but it is address number "
                    f"{rank.rank} of the scheduler's --worker list, which goes in rank order"
                )
            for name in ("model", "block_size", "tensor_parallel_size", "pipeline_parallel_size"):
                if getattr(info, name) != getattr(first, name):
                    raise WorkerGroupError(
                        f"worker rank {rank.rank} at {rank.address} has {name} {getattr(info, name)}, "
                        f"rank 0 has {getattr(first, name)}"
                    )
        reporting = [info.rank for info in infos if info.reports_tokens or self.size == 1]
        if len(reporting) != 1:
            raise WorkerGroupError(f"ranks {reporting} say they report the tokens; exactly one must")
        self.reporting_rank = reporting[0]
        combined = worker_pb2.WorkerInfo()
        combined.CopyFrom(first)
        combined.num_kv_blocks = min(info.num_kv_blocks for info in infos)
        combined.num_cpu_blocks = min(info.num_cpu_blocks for info in infos)
        return combined

    def open_steps(self) -> GroupStepStream:
        return GroupStepStream(self.ranks, self.reporting_rank)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class GroupStepStream:
    """One step stream per rank, used as one: write() sends a step to every rank, read()
    returns the next result once every rank has answered it (the reporting rank's, with the
    tokens). A rank whose stream fails or ends raises UnavailableError naming the rank."""

    def __init__(self, ranks: Sequence[WorkerRank], reporting_rank: int) -> None:
        self._ranks = list(ranks)
        self._reporting_rank = reporting_rank
        self._calls = [rank.stub.Steps(metadata=rank.metadata) for rank in ranks]

    async def write(self, step: worker_pb2.StepRequest) -> None:
        for rank, call in zip(self._ranks, self._calls):
            try:
                await call.write(step)
            except grpc.aio.AioRpcError as error:
                raise rank.failure(f"failed: {error.details()}") from error
            except asyncio.InvalidStateError as error:
                raise rank.failure("closed its step stream") from error

    async def read(self) -> worker_pb2.StepResult:
        if len(self._calls) == 1:
            return await self._read(0)
        reads = [asyncio.ensure_future(self._read(index)) for index in range(len(self._calls))]
        try:
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_EXCEPTION)
            for read in done:
                error = read.exception()
                if error is not None:
                    raise error
            results = [read.result() for read in reads]
        finally:
            for read in reads:
                read.cancel()
        step_ids = {result.step_id for result in results}
        if len(step_ids) != 1:
            raise UnavailableError(f"worker ranks answered different steps: {sorted(step_ids)}")
        return results[self._reporting_rank]

    async def _read(self, index: int) -> worker_pb2.StepResult:
        rank = self._ranks[index]
        try:
            result = await self._calls[index].read()
        except grpc.aio.AioRpcError as error:
            raise rank.failure(f"failed: {error.details()}") from error
        if result is grpc.aio.EOF:
            raise rank.failure("closed its step stream")
        assert isinstance(result, worker_pb2.StepResult)
        return result

    def cancel(self) -> None:
        for call in self._calls:
            call.cancel()
