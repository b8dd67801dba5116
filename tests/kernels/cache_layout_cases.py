"""The KV cache's layout against the PyTorch reference: the attention kernels over the
batch layouts of speculative verification graphs and of prefill graphs, over an fp8 cache
and over tables that a sliding window emptied, and the rotary + KV-store kernel (run with
kernel_cases.py by tests/kernels/test_kernels.py, whose import sets up the interpreter)."""

from __future__ import annotations

import pytest
import torch

# First: importing the cases sets TRITON_INTERPRET before triton is imported.
from tests.kernels.kernel_cases import (
    BLOCK_SIZE,
    DEVICE,
    DTYPE,
    HEAD_DIM,
    ON_GPU,
    TOLERANCE,
    PagedBatch,
    _triton_interpreter_on_cpu,
    prefill_attention_triton,
)

# isort: split
from gpu_worker.kernels.elementwise import qk_norm_rope_reference
from gpu_worker.kernels.paged_attention import (
    PADDING_SLOT,
    UNSCALED,
    KVScales,
    store_kv,
    value_cache_shape,
    values_by_slot,
)
from gpu_worker.kernels.triton_rope_store import rope_store_triton

__all__ = ["_triton_interpreter_on_cpu"]  # the autouse fixture, used here by pytest

# services/scheduler/block_manager.py's placeholder for a block that left the table.
FREED_BLOCK = -1


def test_prefill_attention_on_a_verification_graphs_layout() -> None:
    # Five query rows per sequence, as a verification graph lays them out: a sequence with
    # less context than rows has padding rows at negative positions, which must get zeros
    # (not NaN, not keys); a sequence of the graph past the batch has no context at all.
    batch = PagedBatch([3, 9, 1, 0], [5, 5, 5, 5], num_heads=4, num_kv_heads=2, seed=7)
    output = batch.prefill(block_n=16 if not ON_GPU else 64)
    expected = batch.reference()
    assert not output.isnan().any()
    torch.testing.assert_close(output.float(), expected.float(), **TOLERANCE)
    assert not output[:2].any() and not output[10:14].any() and not output[15:].any()


def _to_fp8(batch: PagedBatch) -> None:
    """The batch's cache as an fp8 one: values [block, head, dim, slot] within each block."""
    batch.key_cache = batch.key_cache.to(torch.float8_e4m3fn)
    batch.value_cache = batch.value_cache.to(torch.float8_e4m3fn).permute(0, 2, 3, 1).contiguous()


def test_attention_kernels_read_an_fp8_cache() -> None:
    # --kv-cache-dtype fp8: the kernels read float8 e4m3 keys and values in the query's
    # dtype; the reference reads the same rounded values.
    batch = PagedBatch([37, 9, 20], [1, 1, 1], num_heads=4, num_kv_heads=2, seed=3)
    _to_fp8(batch)
    expected = batch.reference()
    torch.testing.assert_close(batch.decode().float(), expected.float(), **TOLERANCE)
    torch.testing.assert_close(
        batch.prefill(block_n=16 if not ON_GPU else 64).float(), expected.float(), **TOLERANCE
    )


def test_attention_kernels_scale_back_an_fp8_caches_values() -> None:
    # A checkpoint's KV scales: the cache holds values divided by them. The key's factor
    # joins the softmax's scale (attention_backend folds it in), and the kernels multiply
    # their output by the value's, whole or merged from context splits.
    batch = PagedBatch([37, 9, 20], [1, 1, 1], num_heads=4, num_kv_heads=2, seed=13)
    _to_fp8(batch)
    value_scale = 1024.0
    expected = batch.reference().float() * value_scale
    outputs = [batch.decode(num_splits=splits, value_scale=value_scale) for splits in (1, 4)]
    outputs.append(batch.prefill(block_n=16 if not ON_GPU else 64, value_scale=value_scale))
    for output in outputs:
        torch.testing.assert_close(
            output.float(), expected, rtol=TOLERANCE["rtol"], atol=TOLERANCE["atol"] * 1024
        )


def _fp8_products_reference(batch: PagedBatch) -> torch.Tensor:
    """Decode attention as it is computed in e4m3 over an fp8 cache: each head's query
    rounded at the scale that makes its largest element e4m3's largest (448), and the
    probabilities, times 256, rounded before they weight the values."""
    keys = batch.key_cache.flatten(0, 1)[batch.slots].float()
    values = values_by_slot(batch.value_cache).flatten(0, 1)[batch.slots].float()
    query = batch.query.float()
    head_scale = query.abs().amax(-1, keepdim=True) / 448
    query = (query / head_scale).to(torch.float8_e4m3fn).float() * head_scale
    group = query.shape[1] // keys.shape[1]
    outputs, start = [], 0
    for row, seq_len in enumerate(batch.seq_lens.tolist()):
        seq_keys, seq_values = (
            x[start : start + seq_len].repeat_interleave(group, 1) for x in (keys, values)
        )
        scores = torch.einsum("hd,lhd->hl", query[row], seq_keys) * batch.scale
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        rounded = (weights * 256).to(torch.float8_e4m3fn).float() / 256
        outputs.append(torch.einsum("hl,lhd->hd", rounded, seq_values) / weights.sum(-1)[:, None])
        start += seq_len
    return torch.stack(outputs)


def test_attention_kernels_read_an_fp8_cache_under_a_bf16_model() -> None:
    # A bf16 model's queries over an fp8 cache are multiplied in fp16 (in_operand_dtype):
    # the outputs stay within bf16's precision of the reference's over the same values.
    # Decode told to multiply in e4m3 gives within bf16's precision what rounding its
    # operands does (whole, and merged from context splits), which is up to a few
    # hundredths from the reference.
    batch = PagedBatch([37, 9, 20], [1, 1, 1], num_heads=4, num_kv_heads=2, seed=5)
    _to_fp8(batch)
    expected = batch.reference().float()
    batch.query = batch.query.to(torch.bfloat16)
    for output in (batch.decode(), batch.prefill(block_n=16 if not ON_GPU else 64)):
        assert output.dtype == torch.bfloat16
        torch.testing.assert_close(output.float(), expected, atol=2e-2, rtol=2e-2)
    for num_splits in (1, 4):
        output = batch.decode(num_splits=num_splits, fp8_products=True)
        assert output.dtype == torch.bfloat16
        torch.testing.assert_close(output.float(), _fp8_products_reference(batch), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(output.float(), expected, atol=5e-2, rtol=5e-2)


def test_prefill_tiles_are_numbered_across_sequences() -> None:
    # Query lengths 3, 0, 70 and 1 in tiles of 32: one tile, none, three, one; the tiles
    # past the batch's last belong to no sequence (the sequence count, 4).
    from gpu_worker.kernels.triton_prefill_attention import max_prefill_tiles, prefill_tile_map

    start_loc = torch.tensor([0, 3, 3, 73, 74], dtype=torch.int32)
    tile_seq, tile_first = prefill_tile_map(start_loc, 32, max_prefill_tiles(74, 4, 32))
    assert tile_seq.tolist() == [0, 2, 2, 2, 3, 4, 4]
    assert tile_first[:5].tolist() == [0, 0, 32, 64, 0]
    # No sequences: every tile is past the batch.
    assert prefill_tile_map(torch.zeros(1, dtype=torch.int32), 32, 3)[0].tolist() == [0, 0, 0]


def test_prefill_attention_on_a_prefill_graphs_layout() -> None:
    # A prefill graph's batch: the step's sequences, then empty ones up to the graph's
    # sequence count (no query, no context), and rows past the step's tokens that belong
    # to no sequence, with a tile map sized for the graph's token count. The step's rows
    # must come out as the packed batch's.
    from gpu_worker.kernels.triton_prefill_attention import max_prefill_tiles, prefill_tile_map

    shapes = [(1500, 333), (900, 1), (2000, 1000)] if ON_GPU else [(13, 5), (9, 1), (40, 37)]
    seq_lens = [s for s, _ in shapes] + [0, 0]
    batch = PagedBatch(seq_lens, [q for _, q in shapes] + [0, 0], num_heads=4, num_kv_heads=2, seed=11)
    expected = batch.reference()
    num_tokens = batch.query.shape[0]
    graph_tokens = 2048 if ON_GPU else 64
    padding = torch.randn(graph_tokens - num_tokens, *batch.query.shape[1:]).to(batch.query)
    block_m = 32 if ON_GPU else 8
    tile_map = prefill_tile_map(
        batch.query_start_loc, block_m, max_prefill_tiles(graph_tokens, len(seq_lens), block_m)
    )
    output = prefill_attention_triton(
        torch.cat([batch.query, padding]),
        batch.key_cache,
        batch.value_cache,
        batch.block_tables,
        batch.query_start_loc,
        batch.seq_lens,
        batch.scale,
        block_m=block_m,
        block_n=16 if not ON_GPU else 64,
        tile_map=tile_map,
    )
    assert output.shape[0] == graph_tokens and not output[:num_tokens].isnan().any()
    torch.testing.assert_close(output[:num_tokens].float(), expected.float(), **TOLERANCE)


def _after_a_block_of_nan(cache: torch.Tensor) -> torch.Tensor:
    """The cache as a view that starts one block into a NaN-filled allocation: a kernel that
    reads block -1 reads NaN."""
    padded = torch.full((cache.shape[0] + 1, *cache.shape[1:]), float("nan"), device=cache.device)
    padded = padded.to(cache.dtype)
    padded[1:] = cache
    return padded[1:]


@pytest.mark.parametrize("fp8_cache", [False, True])
def test_windowed_attention_reads_no_block_that_left_the_table(fp8_cache: bool) -> None:
    # A windowed-only model's scheduler replaces the blocks wholly before every query's
    # window with FREED_BLOCK; the kernels' tiles start at multiples of their width, so
    # such blocks can lie inside a tile and must be left unread.
    window = 3 * BLOCK_SIZE
    block_n = 16 if not ON_GPU else 64
    seq_lens = [70, 33, 9] if not ON_GPU else [700, 333, 90]
    for query_lens in ([1, 1, 1], [20, 5, 9]):
        batch = PagedBatch(seq_lens, query_lens, num_heads=4, num_kv_heads=2, seed=11)
        if fp8_cache:
            _to_fp8(batch)
        expected = batch.reference(sliding_window=window).float()
        for row, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
            first_visible = seq_len - query_len - window + 1
            batch.block_tables[row, : max(first_visible, 0) // BLOCK_SIZE] = FREED_BLOCK
        batch.key_cache = _after_a_block_of_nan(batch.key_cache)
        batch.value_cache = _after_a_block_of_nan(batch.value_cache)
        output = batch.prefill(sliding_window=window, block_n=block_n)
        torch.testing.assert_close(output.float(), expected, **TOLERANCE)
        if query_lens[0] == 1:
            for num_splits in (1, 4):
                output = batch.decode(sliding_window=window, num_splits=num_splits, block_n=block_n)
                torch.testing.assert_close(output.float(), expected, **TOLERANCE)


@pytest.mark.parametrize(
    "num_tokens, with_norm, keep_key, fp8_cache, kv_scales",
    [(6, False, True, False, UNSCALED), (6, True, False, False, UNSCALED), (6, True, True, False, UNSCALED)]
    + [
        (530, True, True, False, UNSCALED),
        (6, True, True, True, UNSCALED),
        (530, False, False, True, UNSCALED),
    ]
    # A checkpoint's scales divide what an fp8 cache stores (a bf16 cache takes none).
    + [(6, True, True, True, KVScales(64.0, 0.25))],
)
def test_rope_store_matches_reference_and_skips_padding(
    num_tokens: int, with_norm: bool, keep_key: bool, fp8_cache: bool, kv_scales: KVScales
) -> None:
    num_heads, num_kv_heads = 6, 2
    # Strided views, as the q, k and v slices of a fused qkv projection are.
    fused = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * HEAD_DIM, device=DEVICE).to(DTYPE)
    query, key, value = (
        part.view(num_tokens, -1, HEAD_DIM)
        for part in fused.split(
            [num_heads * HEAD_DIM, num_kv_heads * HEAD_DIM, num_kv_heads * HEAD_DIM], dim=1
        )
    )
    # A non-finite value is stored as zero: attention reads slots past a sequence's end.
    value[1, 0, :2] = float("nan")
    value[2, 1, 3] = float("inf")
    generator = torch.Generator().manual_seed(num_tokens)
    positions = torch.randint(0, 4096, (num_tokens,), generator=generator).to(DEVICE)
    # Distinct slots, every third token a padding one.
    num_slots = BLOCK_SIZE * max(8, -(-2 * num_tokens // BLOCK_SIZE))
    slots = torch.randperm(num_slots, generator=generator)[:num_tokens]
    slots[::3] = PADDING_SLOT
    slots = slots.to(DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
    freqs = torch.outer(torch.arange(4096 + 8, device=DEVICE).float(), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()
    weights = (
        [(1 + 0.1 * torch.randn(HEAD_DIM, device=DEVICE)).to(DTYPE) for _ in range(2)]
        if with_norm
        else [None, None]
    )
    shape = (num_slots // BLOCK_SIZE, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    # An fp8 cache (--kv-cache-dtype fp8) stores each value rounded to float8 e4m3.
    cache_dtype = torch.float8_e4m3fn if fp8_cache else DTYPE
    expected_k = torch.randn(shape, device=DEVICE).to(cache_dtype)
    expected_v = torch.randn(value_cache_shape(*shape, cache_dtype), device=DEVICE).to(cache_dtype)
    actual_k, actual_v = expected_k.clone(), expected_v.clone()

    query_out, key_out = rope_store_triton(
        positions, query, key, value, cos_sin, *weights, 1e-6, actual_k, actual_v, slots, keep_key, kv_scales
    )
    expected_query, expected_key = qk_norm_rope_reference(positions, query, key, cos_sin, *weights, 1e-6)
    store_kv(expected_key / kv_scales.key, value / kv_scales.value, expected_k, expected_v, slots)
    # A padding token's rotated query and key are left unwritten: nothing reads them.
    real = slots != PADDING_SLOT
    torch.testing.assert_close(query_out[real], expected_query[real], **TOLERANCE)
    assert (key_out is not None) == keep_key
    if keep_key:
        torch.testing.assert_close(key_out[real], expected_key[real], **TOLERANCE)
    for token, head, dims in ((1, 0, slice(0, 2)), (2, 1, slice(3, 4))):
        slot = int(slots[token])
        stored = values_by_slot(actual_v)[slot // BLOCK_SIZE, slot % BLOCK_SIZE, head, dims]
        assert (stored.float() == 0).all()
    # Padding tokens leave the cache alone; the others land in their slots. In an fp8 cache
    # a key may round to the neighbouring float8 (the reference's keys are rounded to bf16
    # first, the kernel's once): a step is at most 1/8 of the value, 2**-9 below normals.
    if fp8_cache:
        for actual, expected in ((actual_k, expected_k), (actual_v, expected_v)):
            torch.testing.assert_close(actual.float(), expected.float(), atol=2**-9, rtol=0.126)
        return
    torch.testing.assert_close(actual_k, expected_k, **TOLERANCE)
    assert torch.equal(actual_v, expected_v)
