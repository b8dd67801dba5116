"""Sizing and allocation of the paged KV cache.

One allocation holds every layer's keys and values, shaped
[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; each layer's key and value
caches are contiguous views of it in the layout kernels/paged_attention.py documents (an
fp8 cache's values ordered [head, dim, slot] within the same bytes of each block). Block
ids are shared by all layers: block b of a sequence holds its tokens' KV in every layer.

The CPU swap pool has the same layout in host memory (pinned when the cache is on CUDA).
A step's block operations move whole blocks, all layers at once: swap-out (device -> CPU),
swap-in (CPU -> device) and copies within the device (copy on write), in that order.

Under tensor and pipeline parallelism a rank's cache holds only its stage's layers and its
KV heads: KVCacheLayout.of_model reads both from the rank's model. A ModelConfig stands
for the whole model on one rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from pagedserve.v1 import worker_pb2

from gpu_worker.config import WorkerConfig
from gpu_worker.kernels.paged_attention import as_bytes, value_cache_shape
from gpu_worker.model.attention import PagedAttention
from gpu_worker.model.config import ModelConfig


class StageModel(Protocol):
    """A rank's model, as far as its KV cache is concerned."""

    def attention_layers(self) -> list[PagedAttention]: ...


@dataclass(frozen=True)
class KVCacheLayout:
    """What one rank's cache holds per token slot: its layers, its KV heads of head_dim."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of_model(cls, model: StageModel) -> KVCacheLayout:
        layers = model.attention_layers()
        return cls(len(layers), layers[0].num_kv_heads, layers[0].head_dim)

    @classmethod
    def of(cls, source: ModelConfig | KVCacheLayout) -> KVCacheLayout:
        if isinstance(source, KVCacheLayout):
            return source
        return cls(source.num_hidden_layers, source.num_key_value_heads, source.head_dim)

    def shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_blocks, block_size, self.num_kv_heads, self.head_dim)


@dataclass(frozen=True)
class KVCache:
    storage: torch.Tensor
    num_blocks: int
    block_size: int

    def key_cache(self, layer: int) -> torch.Tensor:
        return self.storage[layer, 0]

    def value_cache(self, layer: int) -> torch.Tensor:
        num_blocks, block_size, num_kv_heads, head_dim = self.storage.shape[2:]
        shape = value_cache_shape(num_blocks, block_size, num_kv_heads, head_dim, self.storage.dtype)
        return self.storage[layer, 1].view(shape)


def bytes_per_block(model_config: ModelConfig | KVCacheLayout, block_size: int, dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return math.prod(KVCacheLayout.of(model_config).shape(1, block_size)) * element_size


def kv_cache_budget_bytes(config: WorkerConfig, device: torch.device) -> int:
    """Memory the cache may take. Call after the weights are loaded.

    On CUDA: what remains of gpu_memory_utilization * total after everything already on the
    device (our weights, other processes). Activations are not profiled yet; the
    (1 - gpu_memory_utilization) share of the device is what is left for them.
    """
    if device.type != "cuda":
        return config.kv_cache_memory_bytes
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    return int(free_bytes - (1.0 - config.gpu_memory_utilization) * total_bytes)


def determine_num_kv_blocks(
    config: WorkerConfig, model_config: ModelConfig | KVCacheLayout, device: torch.device, dtype: torch.dtype
) -> int:
    budget = kv_cache_budget_bytes(config, device)
    num_blocks = max(budget, 0) // bytes_per_block(model_config, config.block_size, dtype)
    if config.num_kv_blocks is not None:
        num_blocks = min(num_blocks, config.num_kv_blocks)
    if num_blocks <= 0:
        raise RuntimeError(
            f"no memory left for the KV cache on {device} (budget {budget} bytes); "
            "raise gpu_memory_utilization / kv_cache_memory_bytes or use a smaller model"
        )
    return int(num_blocks)


def allocate_kv_cache(
    model_config: ModelConfig | KVCacheLayout,
    num_blocks: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
    swap_pool: bool = False,
) -> KVCache:
    """The cache on `device`, zeroed: it keeps NaN garbage away from kernels that load
    whole blocks and mask afterwards, and in host memory it touches every page now, so
    that the process's memory at start-up is what it will hold under load.

    With swap_pool, the pool for a cache on `device` instead: host memory, pinned when
    `device` is CUDA so that copies to and from it are DMA transfers. Every page is
    touched now (pinned pages are resident anyway): the process's memory at start-up is
    what the pool will ever take, rather than growing with the first swaps, so a
    container's memory limit can be set from what start-up shows."""
    shape = KVCacheLayout.of(model_config).shape(num_blocks, block_size)
    if swap_pool:
        storage = torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda" and num_blocks > 0)
        storage.zero_()
    else:
        storage = torch.zeros(shape, dtype=dtype, device=device)
    return KVCache(storage=storage, num_blocks=num_blocks, block_size=block_size)


def bind_kv_cache(attention_layers: list[PagedAttention], kv_cache: KVCache) -> None:
    assert len(attention_layers) == kv_cache.storage.shape[0], "one cache per attention layer"
    for layer_index, layer in enumerate(attention_layers):
        layer.bind_kv_cache(kv_cache.key_cache(layer_index), kv_cache.value_cache(layer_index))


def num_cpu_blocks(
    config: WorkerConfig, model_config: ModelConfig | KVCacheLayout, dtype: torch.dtype
) -> int:
    return config.swap_space_bytes // bytes_per_block(model_config, config.block_size, dtype)


def _copy_blocks(source: KVCache, destination: KVCache, pairs: Sequence[worker_pb2.BlockCopy]) -> None:
    if not pairs:
        return
    src = torch.tensor([p.src_block_id for p in pairs], dtype=torch.int64, device=source.storage.device)
    dst = torch.tensor([p.dst_block_id for p in pairs], dtype=torch.int64, device=destination.storage.device)
    # Gathered first, then scattered: no pair reads a block another pair of the same kind
    # writes, and swap-out finishes reading before swap-in overwrites a block.
    blocks = as_bytes(source.storage).index_select(2, src).to(destination.storage.device)
    as_bytes(destination.storage).index_copy_(2, dst, blocks)


def apply_block_ops(device_cache: KVCache, cpu_cache: KVCache, step: worker_pb2.StepRequest) -> None:
    """A step's block operations, in the protocol's order, before its forward runs."""
    _copy_blocks(device_cache, cpu_cache, step.swap_out)
    _copy_blocks(cpu_cache, device_cache, step.swap_in)
    _copy_blocks(device_cache, device_cache, step.copy_blocks)
