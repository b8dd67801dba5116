"""Kernel variants that eager steps choose by their batch, compiled at start-up.

Triton compiles a kernel for each set of its compile-time parameters at the variant's
first launch: from a fraction of a second to seconds on a machine whose cache is empty.
Capturing the CUDA graphs launches the variants of the steps they replay, but a step run
eagerly (more prompt tokens than the largest prefill graph holds) may choose another: the
decode attention of a mixed step picks its context splits and its keys per tile by the
batch's sequence count. Compiled mid-run, such a variant holds up every sequence of the
step, and a machine's first run loses most of a second. Launching each variant once at
start-up, over sequences of length 0 that read nothing, moves the compiles out of serving.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gpu_worker.model.attention import PagedAttention


def mixed_decode_batch_sizes(max_num_seqs: int, num_kv_heads: int, cache_dtype: torch.dtype) -> list[int]:
    """For each launch variant (context splits, keys per tile) that the decode kernel can
    choose for a mixed batch of 1 to max_num_seqs sequences, the fewest sequences that
    choose it."""
    from gpu_worker.kernels.triton_decode_attention import choose_block_n, choose_num_splits

    first_count: dict[tuple[int, int], int] = {}
    for num_seqs in range(1, max_num_seqs + 1):
        variant = (choose_num_splits(num_seqs, num_kv_heads), choose_block_n(num_seqs, cache_dtype))
        first_count.setdefault(variant, num_seqs)
    return sorted(first_count.values())


@torch.inference_mode()
def warm_up_mixed_decode(layers: Sequence[PagedAttention], max_num_seqs: int, dtype: torch.dtype) -> None:
    """Launches the mixed-batch decode attention of every variant once per kind of
    attention layer (heads, window, soft-cap, cache dtype). CUDA only."""
    from gpu_worker.kernels.triton_decode_attention import decode_attention_triton

    seen: set[tuple] = set()
    for layer in layers:
        key_cache, value_cache = layer.bound_kv_cache()
        kind = (
            layer.num_heads,
            layer.num_kv_heads,
            layer.head_dim,
            layer.sliding_window is None,
            layer.logit_softcap is None,
            key_cache.dtype,
        )
        if kind in seen:
            continue
        seen.add(kind)
        device = key_cache.device
        for num_seqs in mixed_decode_batch_sizes(max_num_seqs, layer.num_kv_heads, key_cache.dtype):
            query = torch.zeros(num_seqs, layer.num_heads, layer.head_dim, dtype=dtype, device=device)
            decode_attention_triton(
                query,
                key_cache,
                value_cache,
                torch.zeros(num_seqs, 1, dtype=torch.int32, device=device),
                # Length 0: every program returns zeros without reading the cache.
                torch.zeros(num_seqs, dtype=torch.int32, device=device),
                layer.scale,
                sliding_window=layer.sliding_window,
                logit_softcap=layer.logit_softcap,
                query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32, device=device),
            )
    torch.cuda.synchronize()
