"""The decode attention kernel on its own, for Nsight Compute: a few launches at a small and
at a large batch of ragged contexts, each case warmed up first.

    ncu --clock-control none --kernel-name regex:_decode_kernel --launch-skip 3 --launch-count 5 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        --section WarpStateStats --section SchedulerStats --section LaunchStats \\
        python -m benchmarks.ncu_decode_attention

profiles the last launch at 32 sequences and the four at 256.
"""

from __future__ import annotations

import random

import torch

from kernels.triton_decode_attention import decode_attention_triton

BLOCK_SIZE, NUM_KV_HEADS, NUM_HEADS, HEAD_DIM = 16, 8, 16, 128
# (sequences, shortest and longest context)
CASES = ((32, 1000, 2000), (256, 200, 2000))
LAUNCHES_PER_CASE = 4


def decode_inputs(num_seqs: int, shortest: int, longest: int) -> tuple[torch.Tensor, ...]:
    rng = random.Random(0)
    contexts = [rng.randint(shortest, longest) for _ in range(num_seqs)]
    width = -(-longest // BLOCK_SIZE)
    num_blocks = num_seqs * width
    key_cache = torch.randn(
        num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"
    )
    value_cache = torch.randn_like(key_cache)
    block_tables = torch.randperm(num_blocks, device="cuda").view(num_seqs, width).int()
    seq_lens = torch.tensor(contexts, dtype=torch.int32, device="cuda")
    query = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return query, key_cache, value_cache, block_tables, seq_lens


def main() -> None:
    for case in CASES:
        inputs = decode_inputs(*case)
        for _ in range(LAUNCHES_PER_CASE):
            decode_attention_triton(*inputs, HEAD_DIM**-0.5)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
