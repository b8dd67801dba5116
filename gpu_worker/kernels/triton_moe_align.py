"""The MoE alignment (triton_moe.align_by_expert) in one Triton kernel, for small batches.

align_by_expert groups a batch's (token, choice) pairs by expert and pads each expert's
run to a multiple of BLOCK_M. In PyTorch that is some twenty small kernels (scatter,
cumsum, argsort, searchsorted, fills and gathers); at decode, with a handful of pairs,
their launches cost more than the expert GEMMs that follow. Here a single program does
it all, with the same outputs to the last element:

1. counts the pairs of each expert;
2. sums the padded counts into each expert's first row (an exclusive cumsum);
3. sends each pair to its expert's first row plus the number of earlier pairs of the same
   expert, so that within an expert the pairs keep their flat order, as a stable sort
   keeps them;
4. for every tile of BLOCK_M rows, writes its expert, and num_pairs into each row that no
   pair fills, so that every output element is written exactly once and no ordering
   between the program's stores is needed.

Pairs are taken in chunks, and each chunk is compared with every expert (a
[chunk, experts] matrix) rather than sorted, which keeps registers bounded and needs no
scratch memory. The outputs are sized for the worst case, as align_by_expert sizes them,
and nothing is read back to the host: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.kernels.launch import pdl_launch, wait_for_previous_kernel

# One program walks every pair twice and every tile once: beyond these sizes (128 tokens at
# top-8; DeepSeek's 256 experts) the PyTorch kernels, spread over the device, are faster.
MAX_TRITON_ALIGN_PAIRS = 1024
MAX_TRITON_ALIGN_EXPERTS = 256
# Elements of the largest comparison matrix a chunk builds: 32 a thread with 4 warps.
_MATRIX_ELEMENTS = 4096
# The [chunk, chunk] matrix that ranks pairs within a chunk grows with the square.
_MAX_PAIR_CHUNK = 64


@triton.jit
def _align_kernel(
    topk_ids_ptr,
    sorted_ids_ptr,
    expert_of_block_ptr,
    num_padded_ptr,
    num_pairs,
    num_experts,
    num_slots,
    num_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_M_PAD: tl.constexpr,
    EXPERTS: tl.constexpr,
    PAIR_CHUNK: tl.constexpr,
    TILE_CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    experts = tl.arange(0, EXPERTS)
    chunk_pos = tl.arange(0, PAIR_CHUNK)

    # Pairs of each expert. Rows past num_pairs load as -1, which matches no expert.
    counts = tl.zeros([EXPERTS], dtype=tl.int32)
    for chunk_start in range(0, num_pairs, PAIR_CHUNK):
        pairs = chunk_start + chunk_pos
        ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded_counts = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_ends = tl.cumsum(padded_counts, axis=0)
    padded_starts = padded_ends - padded_counts
    tl.store(num_padded_ptr, tl.sum(padded_counts, axis=0).to(tl.int64))

    # Each pair's row: its expert's next free row after the chunks before, plus the pairs
    # of the same expert earlier in this chunk.
    taken = tl.zeros([EXPERTS], dtype=tl.int32)
    for chunk_start in range(0, num_pairs, PAIR_CHUNK):
        pairs = chunk_start + chunk_pos
        valid = pairs < num_pairs
        ids = tl.load(topk_ids_ptr + pairs, mask=valid, other=-1).to(tl.int32)
        match = ids[:, None] == experts[None, :]
        next_free = tl.sum(tl.where(match, (padded_starts + taken)[None, :], 0), axis=1)
        earlier_same = (ids[:, None] == ids[None, :]) & (chunk_pos[None, :] < chunk_pos[:, None])
        rank_in_chunk = tl.sum(earlier_same.to(tl.int32), axis=1)
        tl.store(sorted_ids_ptr + next_free + rank_in_chunk, pairs.to(tl.int64), mask=valid)
        taken += tl.sum(match.to(tl.int32), axis=0)

    # Each tile's expert: how many experts' runs end at or before its first row (the
    # searchsorted of align_by_expert), the last expert for the unused tiles at the end.
    # Its rows past that expert's pairs are padding.
    real_experts = experts < num_experts
    real_ends = padded_starts + counts
    rows = tl.arange(0, BLOCK_M_PAD)
    for tile_start in range(0, num_tiles, TILE_CHUNK):
        tiles = tile_start + tl.arange(0, TILE_CHUNK)
        first_rows = tiles * BLOCK_M
        ended = (padded_ends[None, :] <= first_rows[:, None]) & real_experts[None, :]
        expert = tl.minimum(tl.sum(ended.to(tl.int32), axis=1), num_experts - 1)
        tl.store(expert_of_block_ptr + tiles, expert.to(tl.int64), mask=tiles < num_tiles)
        # At most one expert's run holds a tile's first row: those of unpicked experts are
        # empty, and past the last run none does (all rows padding).
        runs_from = padded_starts[None, :] <= first_rows[:, None]
        inside = runs_from & (first_rows[:, None] < padded_ends[None, :])
        pairs_end = tl.sum(tl.where(inside, real_ends[None, :], 0), axis=1)
        slots = first_rows[:, None] + rows[None, :]
        padding = (rows[None, :] < BLOCK_M) & (slots >= pairs_end[:, None]) & (slots < num_slots)
        fill = tl.zeros([TILE_CHUNK, BLOCK_M_PAD], dtype=tl.int64) + num_pairs
        tl.store(sorted_ids_ptr + slots, fill, mask=padding)


def fits_one_program(topk_ids: torch.Tensor, num_experts: int) -> bool:
    """Whether align_by_expert takes this kernel: CUDA tensors within the limits above."""
    return (
        topk_ids.is_cuda
        and topk_ids.numel() <= MAX_TRITON_ALIGN_PAIRS
        and num_experts <= MAX_TRITON_ALIGN_EXPERTS
    )


def align_by_expert_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """triton_moe.align_by_expert's (sorted_ids, expert_of_block, num_padded), in one launch."""
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    assert num_pairs <= MAX_TRITON_ALIGN_PAIRS and num_experts <= MAX_TRITON_ALIGN_EXPERTS
    max_padded = num_pairs + num_experts * (block_m - 1)
    num_tiles = triton.cdiv(max_padded, block_m)
    # The kernel writes every element: no launches to fill them first.
    sorted_ids = torch.empty(max_padded, dtype=torch.int64, device=flat.device)
    expert_of_block = torch.empty(num_tiles, dtype=torch.int64, device=flat.device)
    num_padded = torch.empty(1, dtype=torch.int64, device=flat.device)
    experts = triton.next_power_of_2(num_experts)
    block_m_pad = triton.next_power_of_2(block_m)
    pair_chunk = min(
        triton.next_power_of_2(max(num_pairs, 1)), _MAX_PAIR_CHUNK, max(16, _MATRIX_ELEMENTS // experts)
    )
    tile_chunk = min(triton.next_power_of_2(num_tiles), max(1, _MATRIX_ELEMENTS // max(experts, block_m_pad)))
    _align_kernel[(1,)](
        flat,
        sorted_ids,
        expert_of_block,
        num_padded,
        num_pairs,
        num_experts,
        max_padded,
        num_tiles,
        BLOCK_M=block_m,
        BLOCK_M_PAD=block_m_pad,
        EXPERTS=experts,
        PAIR_CHUNK=pair_chunk,
        TILE_CHUNK=tile_chunk,
        num_warps=4,
        **pdl_launch(flat.device),
    )
    return sorted_ids, expert_of_block, num_padded
