"""The process groups of one engine and the collectives its model runs over them.

One process per rank. World size 1 creates no process group at all: every collective of a
group of size 1 returns its input untouched, so the single-GPU path runs no communication
and makes no copies.

The collectives are torch.distributed's own, issued on the current stream with no host
synchronization (NCCL on CUDA, gloo on CPU), so that on NCCL a decode step's all-reduces
can be captured in a CUDA graph. Every group is warmed up with one collective when it is
made, so NCCL's communicators exist before any capture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from gpu_worker.parallel.config import ParallelConfig

# all_gather_into_tensor was renamed all_gather_single in torch 2.13.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ParallelStartupError(RuntimeError):
    """The ranks of an engine could not form their process groups."""


@dataclass(frozen=True)
class RankGroup:
    """Ranks that run collectives together; `rank` is this process's index among `ranks`."""

    ranks: tuple[int, ...] = (0,)
    rank: int = 0
    process_group: dist.ProcessGroup | None = field(default=None, compare=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def share_of(self, name: str, total: int) -> int:
        """Each rank's equal share of `total` (the size called `name`), or an error naming it."""
        if total % self.size:
            raise ValueError(f"{name} {total} is not divisible by tensor_parallel_size {self.size}")
        return total // self.size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` over the group, in place; returns it."""
        if self.size > 1:
            dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n], rank 0's columns first, on every rank."""
        if self.size == 1:
            return tensor
        # Gathered along dim 0 (each rank's tensor whole), then its columns put side by side.
        gathered = torch.empty(
            (self.size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device
        )
        _all_gather_into(gathered, tensor.contiguous(), group=self.process_group)
        gathered = gathered.view(self.size, *tensor.shape)
        return gathered.movedim(0, -2).reshape(*tensor.shape[:-1], self.size * tensor.shape[-1])

    def send(self, tensor: torch.Tensor, to: int) -> None:
        """Sends to the group's member `to` (an index into `ranks`)."""
        dist.send(tensor.contiguous(), dst=self.ranks[to], group=self.process_group)

    def recv(self, buffer: torch.Tensor, source: int) -> torch.Tensor:
        """Receives into `buffer` (its shape and dtype are the sender's) from member `source`."""
        dist.recv(buffer, src=self.ranks[source], group=self.process_group)
        return buffer

    def broadcast(self, tensor: torch.Tensor, source: int) -> torch.Tensor:
        """Member `source`'s `tensor` in `tensor` on every member (the same shape on each)."""
        if self.size > 1:
            dist.broadcast(tensor, src=self.ranks[source], group=self.process_group)
        return tensor


SINGLE_RANK = RankGroup()


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in its engine: its tensor-parallel group (the ranks of its pipeline
    stage) and its pipeline group (the same tensor-parallel rank in every stage)."""

    config: ParallelConfig = field(default_factory=ParallelConfig)
    tp: RankGroup = SINGLE_RANK
    pp: RankGroup = SINGLE_RANK

    @property
    def stage(self) -> int:
        return self.pp.rank

    @property
    def num_stages(self) -> int:
        return self.pp.size

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp.size - 1

    @property
    def answers(self) -> bool:
        """Whether this rank reports the engine's draws (ParallelConfig.answering_rank)."""
        return self.config.rank == self.config.answering_rank

    def send_to_next_stage(self, activations: torch.Tensor) -> None:
        self.pp.send(activations, self.stage + 1)

    def recv_from_previous_stage(self, buffer: torch.Tensor) -> torch.Tensor:
        return self.pp.recv(buffer, self.stage - 1)


SINGLE_RANK_CONTEXT = ParallelContext()


def init_parallel(config: ParallelConfig, device: torch.device) -> ParallelContext:
    """Joins the engine's process groups (NCCL on CUDA, gloo otherwise); world size 1 joins
    nothing. Raises ParallelStartupError when the group does not form within config.timeout_s."""
    if config.world_size == 1:
        return ParallelContext(config=config)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=config.timeout_s)
    try:
        dist.init_process_group(
            backend,
            init_method=config.init_method,
            world_size=config.world_size,
            rank=config.rank,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        # Every rank creates every group, in the same order, as torch.distributed requires.
        tp_groups = [
            dist.new_group(config.tp_group_ranks(s), timeout=timeout)
            for s in range(config.pipeline_parallel_size)
        ]
        pp_groups = [
            dist.new_group(config.pp_group_ranks(r), timeout=timeout)
            for r in range(config.tensor_parallel_size)
        ]
        context = ParallelContext(
            config=config,
            tp=RankGroup(
                tuple(config.tp_group_ranks(config.pp_rank)), config.tp_rank, tp_groups[config.pp_rank]
            ),
            pp=RankGroup(
                tuple(config.pp_group_ranks(config.tp_rank)), config.pp_rank, pp_groups[config.tp_rank]
            ),
        )
        _warm_up(context, device)
    except (RuntimeError, TimeoutError) as error:
        close_parallel()
        raise ParallelStartupError(
            f"rank {config.rank} of {config.world_size} could not form its process group at "
            f"{config.init_method} within {config.timeout_s:g} s ({backend}): {error}"
        ) from error
    return context


def _warm_up(context: ParallelContext, device: torch.device) -> None:
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)
    for group in (context.tp, context.pp):
        if group.size > 1:
            group.all_reduce(probe)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    expected = context.config.world_size * context.tp.size * context.pp.size
    if int(probe.item()) != expected:
        raise RuntimeError(f"warm-up all-reduce gave {probe.item()}, expected {expected}")


def close_parallel() -> None:
    """Leaves the process groups, if this process joined any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
