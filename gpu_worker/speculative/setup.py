"""Builds a worker's speculative decoding from its configuration: the proposer, and for a
draft model its weights and the share of the KV memory its cache takes."""

from __future__ import annotations

import torch

from gpu_worker.config import WorkerConfig
from gpu_worker.input_batch import StepInputBuilder
from gpu_worker.kv_cache import KVCache, KVCacheLayout, bytes_per_block, kv_cache_budget_bytes
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.decoder import DecoderForCausalLM
from gpu_worker.sampler import Sampler
from gpu_worker.speculative.decoding import SpeculativeDecoding
from gpu_worker.speculative.draft import DraftModelProposer, draft_bytes_per_block, load_draft_model
from gpu_worker.speculative.ngram import NgramProposer
from gpu_worker.speculative.proposer import Proposer


def load_draft(
    config: WorkerConfig, target: ModelConfig, max_model_len: int, device: torch.device, dtype: torch.dtype
) -> DecoderForCausalLM | None:
    """The draft model when the worker proposes with one; loaded before the KV cache is
    sized, so that its weights count."""
    spec = config.speculative
    if spec.method != "draft" or spec.draft_model_path is None:
        return None
    return load_draft_model(spec.draft_model_path, target, max_model_len, device, dtype)


def kv_blocks_with_draft(
    num_blocks: int,
    config: WorkerConfig,
    layout: KVCacheLayout,
    draft: DecoderForCausalLM,
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    """Blocks the target's cache may take when every block also has the draft's share."""
    per_block = bytes_per_block(layout, config.block_size, dtype) + draft_bytes_per_block(
        draft, config.block_size, dtype
    )
    return max(1, min(num_blocks, kv_cache_budget_bytes(config, device) // per_block))


def build_speculation(
    config: WorkerConfig,
    draft: DecoderForCausalLM | None,
    kv_cache: KVCache,
    cpu_kv_cache: KVCache,
    step_inputs: StepInputBuilder,
    sampler: Sampler,
    device: torch.device,
) -> SpeculativeDecoding | None:
    spec = config.speculative
    if not spec.enabled:
        return None
    proposer: Proposer
    if draft is not None:
        proposer = DraftModelProposer(
            draft,
            kv_cache.num_blocks,
            cpu_kv_cache.num_blocks,
            kv_cache.block_size,
            step_inputs.block_tables,
            sampler,
            device,
            kv_cache.storage.dtype,
        )
    else:
        proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    return SpeculativeDecoding(proposer, sampler, step_inputs.block_tables, kv_cache.block_size)
