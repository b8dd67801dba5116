"""A draft model proposer: a small model with the target's vocabulary runs K decode
steps per speculating sequence and proposes what it draws.

Its paged KV cache is its own allocation, with as many blocks as the target's, and it uses
the target's block tables: block b of a sequence holds that sequence's tokens in both
caches. After every target forward the draft model runs over the same batch (proposals
included), so its cache holds KV for exactly the positions the target's does; the
scheduler's block tables, prefix cache, swaps and copies then hold for both without the
scheduler knowing of the draft. Proposing writes the draft's KV of positions it then
writes again, with the same tokens, in that mirror forward.

Draft forwards run eagerly (no CUDA graphs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pagedserve.v1 import worker_pb2

from gpu_worker.block_tables import BlockTables
from gpu_worker.input_batch import StepInputs
from gpu_worker.kv_cache import (
    KVCache,
    KVCacheLayout,
    allocate_kv_cache,
    apply_block_ops,
    bind_kv_cache,
    bytes_per_block,
)
from gpu_worker.model.attention import AttentionMetadata, attention_context
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.decoder import DecoderForCausalLM
from gpu_worker.model.loader import load_model
from gpu_worker.sampler import Sampler
from gpu_worker.speculative.proposer import ProposalRequest, Proposals
from gpu_worker.speculative.rejection import draw_proposals


def load_draft_model(
    model_dir: Path, target: ModelConfig, max_model_len: int, device: torch.device, dtype: torch.dtype
) -> DecoderForCausalLM:
    """The draft model, checked against the target: same vocabulary, long enough."""
    config = ModelConfig.from_model_dir(model_dir)
    if config.vocab_size != target.vocab_size:
        raise ValueError(
            f"speculative_model: vocab_size {config.vocab_size} differs from the target's {target.vocab_size}"
        )
    if config.max_position_embeddings < max_model_len:
        raise ValueError(
            f"speculative_model: max_position_embeddings {config.max_position_embeddings} is below "
            f"max_model_len {max_model_len}; lower --max-model-len"
        )
    return load_model(model_dir, config, device, dtype, max_model_len)


def draft_bytes_per_block(model: DecoderForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    return bytes_per_block(KVCacheLayout.of_model(model), block_size, dtype)


def decode_metadata(
    tables: BlockTables, seq_ids: Sequence[int], positions: np.ndarray, block_size: int, device: torch.device
) -> AttentionMetadata:
    """One token per sequence at `positions`, through the sequences' block tables."""
    rows = np.array([tables.row_of[seq_id] for seq_id in seq_ids], dtype=np.int64)
    block_index, offset = np.divmod(positions, block_size)
    slots = tables.array[rows, block_index].astype(np.int64) * block_size + offset
    seq_lens = positions + 1
    max_blocks = int(-(-seq_lens.max() // block_size))
    return AttentionMetadata(
        slot_mapping=torch.from_numpy(slots).to(device),
        query_start_loc=torch.arange(len(seq_ids) + 1, dtype=torch.int32, device=device),
        seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(device),
        block_tables=torch.from_numpy(np.ascontiguousarray(tables.array[rows, :max_blocks])).to(device),
        max_query_len=1,
        max_seq_len=int(seq_lens.max()),
    )


class DraftModelProposer:
    def __init__(
        self,
        model: DecoderForCausalLM,
        num_blocks: int,
        num_cpu_blocks: int,
        block_size: int,
        tables: BlockTables,
        sampler: Sampler,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        layout = KVCacheLayout.of_model(model)
        self.kv_cache: KVCache = allocate_kv_cache(layout, num_blocks, block_size, device, dtype)
        self.cpu_kv_cache = allocate_kv_cache(
            layout, num_cpu_blocks, block_size, device, dtype, swap_pool=True
        )
        bind_kv_cache(model.attention_layers(), self.kv_cache)
        self.block_size = block_size
        self.tables = tables
        self.sampler = sampler
        self.device = device

    @torch.inference_mode()
    def propose(self, requests: Sequence[ProposalRequest]) -> Proposals:
        """num_lookahead decode steps of the draft per request, in a batch that loses each
        request once it has proposed enough."""
        active = list(range(len(requests)))
        positions = np.array([len(r.token_ids) - 1 for r in requests], dtype=np.int64)
        input_ids = torch.tensor([r.token_ids[-1] for r in requests], dtype=torch.int64, device=self.device)
        drawn: list[list[torch.Tensor]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        step = 0
        while active:
            picked = [requests[i] for i in active]
            metadata = decode_metadata(
                self.tables, [r.seq_id for r in picked], positions[active], self.block_size, self.device
            )
            positions_d = torch.from_numpy(positions[active]).to(self.device)
            with attention_context(metadata):
                hidden = self.model(input_ids, positions_d, None)
            logits = self.model.compute_logits(hidden)
            # Each draw is the token at the position after the one just computed.
            tokens, q = draw_proposals(
                self.sampler, logits, [r.sampling for r in picked], (positions[active] + 1).tolist()
            )
            for row, i in enumerate(active):
                drawn[i].append(tokens[row])
                probs[i].append(q[row])
            step += 1
            positions[active] += 1
            keep = [row for row, i in enumerate(active) if requests[i].num_lookahead > step]
            active = [active[row] for row in keep]
            input_ids = tokens[torch.tensor(keep, dtype=torch.int64, device=self.device)] if keep else tokens
        flat = [token for sequence_draws in drawn for token in sequence_draws]
        values = torch.stack(flat).tolist() if flat else []
        proposals, start = [], 0
        for sequence_draws in drawn:
            proposals.append(values[start : start + len(sequence_draws)])
            start += len(sequence_draws)
        flat_probs = [q for qs in probs for q in qs]
        return Proposals(proposals, torch.stack(flat_probs) if flat_probs else None)

    @torch.inference_mode()
    def after_forward(self, batch: StepInputs) -> None:
        with attention_context(batch.metadata):
            self.model(batch.input_ids, batch.positions, None)

    def apply_block_ops(self, step: worker_pb2.StepRequest) -> None:
        apply_block_ops(self.kv_cache, self.cpu_kv_cache, step)
