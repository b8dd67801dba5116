"""How much GPU memory a step's activations need, so the KV cache can take the rest.

One forward at the largest step the scheduler may send (max_num_batched_tokens, in
sequences as long as the model allows) plus the logits of the largest batch is measured
with the allocator's peak counter. The KV cache is then sized while that much memory (and
a margin for CUDA graphs) is held, so that kv_cache.determine_num_kv_blocks leaves it free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gpu_worker.config import WorkerConfig
from gpu_worker.kv_cache import KVCacheLayout, allocate_kv_cache, bind_kv_cache
from gpu_worker.model.attention import AttentionMetadata, attention_context
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.decoder import DecoderForCausalLM
from gpu_worker.parallel.groups import SINGLE_RANK_CONTEXT

# Decode graphs' own activations are small (one token per sequence); this covers them and
# the allocator's fragmentation.
GRAPH_MARGIN_BYTES = 512 << 20


@torch.inference_mode()
def profile_activation_bytes(
    model: DecoderForCausalLM,
    model_config: ModelConfig,
    config: WorkerConfig,
    max_model_len: int,
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    num_tokens = config.max_num_batched_tokens
    seq_len = min(num_tokens, max_model_len)
    lengths = [seq_len] * (num_tokens // seq_len)
    if num_tokens % seq_len:
        lengths.append(num_tokens % seq_len)
    block_size = config.block_size
    blocks_per_seq = -(-seq_len // block_size)
    # A scratch cache just large enough for the profiled step, dropped afterwards.
    scratch = allocate_kv_cache(
        KVCacheLayout.of_model(model), blocks_per_seq * len(lengths), block_size, device, dtype
    )
    bind_kv_cache(model.attention_layers(), scratch)
    block_tables = torch.arange(blocks_per_seq * len(lengths), dtype=torch.int32, device=device)
    block_tables = block_tables.view(len(lengths), blocks_per_seq)
    slot_mapping = torch.cat(
        [
            torch.arange(n, device=device) + index * blocks_per_seq * block_size
            for index, n in enumerate(lengths)
        ]
    )
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    lengths_tensor = torch.tensor(lengths, dtype=torch.int32, device=device)
    metadata = AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=torch.nn.functional.pad(lengths_tensor.cumsum(0), (1, 0)).to(torch.int32),
        seq_lens=lengths_tensor,
        block_tables=block_tables,
        max_query_len=seq_len,
        max_seq_len=seq_len,
        no_cached_context=True,
    )
    input_ids = torch.randint(0, model_config.vocab_size, (num_tokens,), device=device)
    # A later pipeline stage runs on the previous stage's output; its collectives run with
    # its tensor-parallel group's, which profiles the same step at the same time.
    parallel = getattr(model, "parallel", SINGLE_RANK_CONTEXT)
    intermediate = None
    if not parallel.is_first_stage:
        intermediate = torch.randn(num_tokens, model_config.hidden_size, device=device, dtype=dtype)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    with attention_context(metadata):
        hidden_states = model(input_ids, positions, intermediate)
    # The same step again as if over cached context, which takes the paged prefill kernel:
    # both attention paths are measured, and compiled before the first real step.
    with attention_context(dataclasses.replace(metadata, no_cached_context=False)):
        hidden_states = model(input_ids, positions, intermediate)
    logits = None
    if parallel.is_last_stage:
        num_sampled = min(config.max_num_seqs, num_tokens)
        # The sampler works on an fp32 copy of the logits.
        logits = model.compute_logits(hidden_states[:num_sampled]).float()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del hidden_states, logits, scratch, metadata, intermediate
    torch.cuda.empty_cache()
    return int(peak)


@contextmanager
def memory_held(num_bytes: int, device: torch.device) -> Iterator[None]:
    """Keeps num_bytes of device memory allocated (and so out of mem_get_info's free count)."""
    placeholder = torch.empty(max(num_bytes, 0), dtype=torch.uint8, device=device)
    try:
        yield
    finally:
        del placeholder
        torch.cuda.empty_cache()
