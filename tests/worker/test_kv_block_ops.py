"""The worker's block operations: swap-out, swap-in and copy-on-write copies move whole
blocks of every layer, in that order, before a step's forward."""

import ctypes
import os

import pytest
import torch
from pagedserve.v1 import worker_pb2

from gpu_worker.config import WorkerConfig
from gpu_worker.kv_cache import (
    KVCache,
    KVCacheLayout,
    allocate_kv_cache,
    apply_block_ops,
    bytes_per_block,
    num_cpu_blocks,
)
from gpu_worker.model.config import ModelConfig


def _cache(num_blocks: int, fill: float | None = None) -> KVCache:
    # [layers, k/v, blocks, block_size, heads, head_dim]
    storage = torch.zeros(2, 2, num_blocks, 4, 1, 3)
    if fill is None:
        for block in range(num_blocks):
            storage[:, :, block] = block + 1
    return KVCache(storage=storage, num_blocks=num_blocks, block_size=4)


def _block_values(cache: KVCache) -> list[float]:
    # Each block holds one value everywhere, in every layer, for keys and values alike.
    values = []
    for block in range(cache.num_blocks):
        content = cache.storage[:, :, block]
        assert torch.all(content == content.flatten()[0])
        values.append(content.flatten()[0].item())
    return values


def _step(**ops: list[tuple[int, int]]) -> worker_pb2.StepRequest:
    step = worker_pb2.StepRequest(step_id=1)
    for name, pairs in ops.items():
        for src, dst in pairs:
            getattr(step, name).add(src_block_id=src, dst_block_id=dst)
    return step


def test_ops_apply_in_order_swap_out_swap_in_copy() -> None:
    device, cpu = _cache(4), _cache(3, fill=0.0)
    # Block 2 goes out to CPU block 0 and, in the same step, CPU block 1 (filled below)
    # comes into device block 2: the out must read before the in writes.
    cpu.storage[:, :, 1] = 9
    apply_block_ops(device, cpu, _step(swap_out=[(2, 0)], swap_in=[(1, 2)], copy_blocks=[(2, 3)]))
    assert _block_values(cpu) == [3, 9, 0]
    assert _block_values(device) == [1, 2, 9, 9]


def test_no_ops_change_nothing() -> None:
    device, cpu = _cache(2), _cache(1, fill=0.0)
    apply_block_ops(device, cpu, _step())
    assert _block_values(device) == [1, 2] and _block_values(cpu) == [0]


def test_swap_space_sizes_the_cpu_pool(embedded_model_dir) -> None:
    model_config = ModelConfig.from_model_dir(embedded_model_dir)
    per_block = bytes_per_block(model_config, 16, torch.float32)
    config = WorkerConfig(model_path=embedded_model_dir, block_size=16, swap_space_bytes=10 * per_block + 1)
    assert num_cpu_blocks(config, model_config, torch.float32) == 10
    with pytest.raises(ValueError):
        WorkerConfig(model_path=embedded_model_dir, swap_space_bytes=-1)


def _resident_fraction(address: int, size: int) -> float:
    """The share of the pages in [address, address + size) that are in memory (mincore),
    whatever else the process holds or gave back before."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = address - address % page
    num_pages = (address + size - start + page - 1) // page
    pages = (ctypes.c_ubyte * num_pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    assert libc.mincore(start, num_pages * page, pages) == 0, os.strerror(ctypes.get_errno())
    return sum(flag & 1 for flag in pages) / num_pages


@pytest.mark.parametrize("swap_pool", [False, True])
def test_pools_in_host_memory_are_resident_from_the_start(swap_pool: bool) -> None:
    # Memory known at start-up: the pool's pages are touched when it is made, not as
    # sequences first use them.
    layout = KVCacheLayout(num_layers=4, num_kv_heads=2, head_dim=64)
    num_blocks = 1024
    size = bytes_per_block(layout, 16, torch.float32) * num_blocks
    cache = allocate_kv_cache(layout, num_blocks, 16, torch.device("cpu"), torch.float32, swap_pool)
    assert _resident_fraction(cache.storage.data_ptr(), size) >= 0.99
    assert cache.storage.nbytes == size and not cache.storage.any()
