"""Tensor-parallel versions of the engine's layers (Megatron-LM's column/row split).

A column-parallel projection gives each rank a slice of the output features; the
row-parallel projection after it takes that slice as its input features and all-reduces
its output. Each rank's parameters hold only its shard, and every parameter's
weight_loader cuts its shard out of the full checkpoint tensor, so the checkpoint loader
stays unaware of the layout.

With a group of size 1 each class is exactly its base class of layers.py: full shards, no
collective, no extra copy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.kernels.w8a8 import Fp8Rows
from gpu_worker.model.layers import (
    Linear,
    LMHead,
    MergedLinear,
    PartialSumLinear,
    VocabEmbedding,
    default_weight_loader,
    refuse_shard_id,
)
from gpu_worker.parallel.config import kv_head_replicas, padded_vocab_size
from gpu_worker.parallel.groups import SINGLE_RANK, RankGroup

if TYPE_CHECKING:
    from gpu_worker.model.quantization.methods import QuantMethod


def load_slice(
    param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None, *, dim: int, index: int
) -> None:
    """Copies slice `index` of `loaded_weight`, as long along `dim` as `param`, into `param`
    (a weight_loader once `dim` and `index` are bound)."""
    refuse_shard_id(param, shard_id)
    size = param.shape[dim]
    default_weight_loader(param, loaded_weight.narrow(dim, index * size, size))


class ColumnParallelLinear(Linear):
    """Each rank computes output features [rank * n, (rank + 1) * n) of the full projection."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp: RankGroup = SINGLE_RANK,
        quant_method: QuantMethod | None = None,
    ) -> None:
        super().__init__(input_size, tp.share_of("output_size", output_size), bias, quant_method)
        self.tp = tp
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = functools.partial(load_slice, dim=0, index=tp.rank)  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field

    def checkpoint_output_slice(self, shard_id: str | None) -> tuple[int, int, int]:
        offset, size, _ = super().checkpoint_output_slice(shard_id)
        return offset, size, self.tp.rank


class ShardedMergedLinear(MergedLinear):
    """Column-parallel projections fused into one matmul. `shards` gives, per projection,
    this rank's output size and which slice of that size of the checkpoint tensor it holds."""

    def __init__(
        self,
        input_size: int,
        shards: Sequence[tuple[str, int, int]],
        bias: bool = False,
        quant_method: QuantMethod | None = None,
    ) -> None:
        super().__init__(input_size, [(shard_id, size) for shard_id, size, _ in shards], bias, quant_method)
        self.slice_index = {shard_id: index for shard_id, _, index in shards}

    def checkpoint_output_slice(self, shard_id: str | None) -> tuple[int, int, int]:
        offset, size, _ = super().checkpoint_output_slice(shard_id)
        return offset, size, self.slice_index[shard_id]  # type: ignore[index]  # checked by super()

    def _load_shard(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None
    ) -> None:
        if shard_id not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {list(self.shard_offsets)}")
        size = self.shard_offsets[shard_id][1]
        own = loaded_weight.narrow(0, self.slice_index[shard_id] * size, size)
        super()._load_shard(param, own, shard_id)


def merged_column_parallel_linear(
    input_size: int,
    shards: Sequence[tuple[str, int]],
    bias: bool = False,
    tp: RankGroup = SINGLE_RANK,
    quant_method: QuantMethod | None = None,
) -> ShardedMergedLinear:
    """gate/up: every projection split evenly over the ranks."""
    return ShardedMergedLinear(
        input_size,
        [(shard_id, tp.share_of(f"{shard_id} size", size), tp.rank) for shard_id, size in shards],
        bias,
        quant_method,
    )


def qkv_parallel_linear(
    hidden_size: int,
    head_dim: int,
    num_heads: int,
    num_kv_heads: int,
    bias: bool = False,
    tp: RankGroup = SINGLE_RANK,
    quant_method: QuantMethod | None = None,
) -> ShardedMergedLinear:
    """Query heads split evenly; KV heads split evenly too, or, when there are fewer KV heads
    than ranks, each rank holds one KV head, shared by tp / num_kv_heads neighbouring ranks
    (the ones whose query heads attend to it)."""
    local_heads = num_heads // tp.size
    replicas = kv_head_replicas(num_kv_heads, tp.size)
    local_kv_heads = max(1, num_kv_heads // tp.size)
    kv_index = tp.rank // replicas
    return ShardedMergedLinear(
        hidden_size,
        [
            ("q", local_heads * head_dim, tp.rank),
            ("k", local_kv_heads * head_dim, kv_index),
            ("v", local_kv_heads * head_dim, kv_index),
        ],
        bias,
        quant_method,
    )


class RowParallelLinear(PartialSumLinear):
    """Each rank multiplies its slice of the input features; the outputs are summed over the
    group. Read only by an add + RMSNorm, like PartialSumLinear.

    Where split-K applies, the rank first adds up its own fp32 partial sums and the group
    all-reduces that one fp32 [1, T, out] tensor, which the norm reads as a single partial
    sum: the message stays T * out (not `splits` times that), and the sum over ranks stays
    in fp32 with one rounding in the norm, as on one GPU. Otherwise the activation-dtype
    output is all-reduced. The bias is added once, by rank 0, before the sum.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp: RankGroup = SINGLE_RANK,
        quant_method: QuantMethod | None = None,
    ) -> None:
        super().__init__(tp.share_of("input_size", input_size), output_size, bias, quant_method)
        self.tp = tp
        self.input_shard_index = tp.rank
        if self.weight is not None:
            self.weight.weight_loader = functools.partial(load_slice, dim=1, index=tp.rank)  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        bias = self.bias if self.tp.rank == 0 else None
        if self.quant_method is not None:
            return self.tp.all_reduce(self.quant_method.apply(self, x, bias))
        assert isinstance(x, torch.Tensor), "fp8 rows only reach an fp8 projection"
        if x.is_cuda and self.bias is None:
            from gpu_worker.kernels.triton_linear import linear_partial_sums, split_k_plan

            plan = split_k_plan(x.shape[0], self.output_size, self.input_size)
            if plan is not None:
                partials = linear_partial_sums(x, self.weight, **plan)
                return self.tp.all_reduce(partials.sum(dim=0, keepdim=True))
        return self.tp.all_reduce(F.linear(x, self.weight, bias))


class VocabParallelEmbedding(VocabEmbedding):
    """Each rank holds rows [rank * n, (rank + 1) * n) of the vocabulary, padded to a
    multiple of the group size; a token outside a rank's rows looks up zeros there, and the
    all-reduce leaves every rank with the one real row."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: RankGroup = SINGLE_RANK) -> None:
        self.vocab_size = vocab_size
        self.vocab_start, self.rows_per_rank = vocab_rows_of_rank(vocab_size, tp)
        super().__init__(self.rows_per_rank, hidden_size)
        self.tp = tp
        self.weight.weight_loader = functools.partial(load_vocab_rows, start=self.vocab_start)  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        embeddings = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        embeddings.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(embeddings)


def vocab_rows_of_rank(vocab_size: int, tp: RankGroup) -> tuple[int, int]:
    """(first row, number of rows) of this rank's slice of the padded vocabulary."""
    rows_per_rank = padded_vocab_size(vocab_size, tp.size) // tp.size
    return tp.rank * rows_per_rank, rows_per_rank


def load_vocab_rows(
    param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None, *, start: int
) -> None:
    """Rows [start, start + len(param)) of a [vocab, hidden] tensor; rows past the real
    vocabulary (padding) are zero (a weight_loader once `start` is bound)."""
    refuse_shard_id(param, shard_id)
    if loaded_weight.shape[1:] != param.shape[1:]:
        raise ValueError(
            f"shape mismatch: parameter rows {tuple(param.shape[1:])}, checkpoint {tuple(loaded_weight.shape)}"
        )
    real_rows = max(0, min(param.shape[0], loaded_weight.shape[0] - start))
    param.data[:real_rows].copy_(loaded_weight[start : start + real_rows])
    param.data[real_rows:].zero_()


class ParallelLMHead(LMHead):
    """Each rank projects onto its vocabulary slice; the slices are all-gathered, so that every
    rank of the last stage holds the full [T, vocab] logits and samples the same tokens from
    them (the sampler's noise is a function of the request's seed and position only)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tied_to: VocabParallelEmbedding | None = None,
        tp: RankGroup = SINGLE_RANK,
    ) -> None:
        self.vocab_size = vocab_size
        self.vocab_start, rows_per_rank = vocab_rows_of_rank(vocab_size, tp)
        super().__init__(rows_per_rank, hidden_size, tied_to=tied_to)
        self.tp = tp
        if tied_to is None:
            self.weight.weight_loader = functools.partial(load_vocab_rows, start=self.vocab_start)  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states, self.weight)
        if self.tp.size == 1:
            return logits
        logits = self.tp.all_gather_last_dim(logits)
        if logits.shape[-1] != self.vocab_size:
            logits = logits[..., : self.vocab_size].contiguous()
        return logits
