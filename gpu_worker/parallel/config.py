"""How one engine's model is spread over its worker ranks, and what the model's sizes allow.

Ranks are laid out stage-major: rank = pp_rank * tensor_parallel_size + tp_rank. The ranks
of one pipeline stage are consecutive, so on one host a stage's tensor-parallel group (the
one that all-reduces every layer) sits on neighbouring GPUs, and the pipeline group of a
tensor-parallel rank r is {r, r + tp, r + 2 tp, ...}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Only for hints: the model package imports this module.
    from gpu_worker.model.config import ModelConfig


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # This process's global rank, in [0, world_size).
    rank: int = 0
    # torch.distributed rendezvous, e.g. "tcp://10.0.0.5:29500" (rank 0's host listens on the
    # port). Unused when world_size is 1.
    init_method: str = "tcp://127.0.0.1:29500"
    # How long the group may take to form, and the limit of any one collective after that.
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} and pipeline_parallel_size "
                f"{self.pipeline_parallel_size} must be at least 1"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside the world of {self.world_size} ranks")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s {self.timeout_s} must be positive")

    @classmethod
    def from_address(
        cls,
        tensor_parallel_size: int,
        pipeline_parallel_size: int,
        rank: int,
        master_addr: str,
        master_port: int,
        timeout_s: float = 60.0,
    ) -> ParallelConfig:
        host = f"[{master_addr}]" if ":" in master_addr else master_addr
        return cls(
            tensor_parallel_size, pipeline_parallel_size, rank, f"tcp://{host}:{master_port}", timeout_s
        )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tensor_parallel_size

    @property
    def answering_rank(self) -> int:
        """The rank whose step results carry the engine's tokens and logprobs: the first of
        the last stage, which samples (every rank learns the draws; one reports them)."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    def tp_group_ranks(self, pp_rank: int) -> list[int]:
        start = pp_rank * self.tensor_parallel_size
        return list(range(start, start + self.tensor_parallel_size))

    def pp_group_ranks(self, tp_rank: int) -> list[int]:
        return list(range(tp_rank, self.world_size, self.tensor_parallel_size))


def stage_layer_range(num_layers: int, num_stages: int, stage: int) -> tuple[int, int]:
    """[start, end) of the decoder layers that pipeline stage `stage` holds.

    An even split; the remainder goes one layer each to the earliest stages, because the
    last stage also computes the logits and samples.
    """
    base, remainder = divmod(num_layers, num_stages)
    start = stage * base + min(stage, remainder)
    return start, start + base + (1 if stage < remainder else 0)


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    """The vocabulary rounded up so that every rank holds an equal slice; the padding rows
    are zero and their logits are cut off after the gather."""
    return -(-vocab_size // tensor_parallel_size) * tensor_parallel_size


def kv_head_replicas(num_kv_heads: int, tensor_parallel_size: int) -> int:
    """How many ranks hold each KV head: 1 when the heads split evenly, tp / num_kv_heads
    when there are fewer KV heads than ranks (each rank then holds one head)."""
    return max(1, tensor_parallel_size // num_kv_heads)


def check_model_fits(model_config: ModelConfig, parallel: ParallelConfig) -> None:
    """Refuses, with the number and the reason, sizes that do not split the model evenly."""
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    c = model_config
    if c.num_attention_heads % tp:
        raise ValueError(
            f"num_attention_heads {c.num_attention_heads} is not divisible by tensor_parallel_size "
            f"{tp}: every rank must hold the same number of query heads"
        )
    if c.num_key_value_heads % tp and tp % c.num_key_value_heads:
        raise ValueError(
            f"num_key_value_heads {c.num_key_value_heads} and tensor_parallel_size {tp} do not "
            "divide one another: KV heads can be neither split evenly over the ranks nor "
            "replicated evenly on them"
        )
    if c.intermediate_size % tp:
        raise ValueError(
            f"intermediate_size {c.intermediate_size} is not divisible by tensor_parallel_size "
            f"{tp}: every rank must hold the same slice of the MLP"
        )
    if c.num_hidden_layers < pp:
        raise ValueError(
            f"num_hidden_layers {c.num_hidden_layers} is fewer than pipeline_parallel_size {pp}: "
            "every stage must hold at least one layer"
        )
