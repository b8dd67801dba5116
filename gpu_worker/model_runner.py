"""Executes scheduler steps: one forward over a mixed batch, then sampling.

The scheduler owns block allocation; the runner keeps, per live sequence, only what it
needs to build the next batch from a small step delta: its tokens, how many of them have
KV in the cache, its block table and its sampling state.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gpu_worker.config import WorkerConfig
from gpu_worker.kv_cache import allocate_kv_cache, bind_kv_cache, determine_num_kv_blocks
from gpu_worker.model.attention import AttentionMetadata, attention_context
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.loader import load_model
from gpu_worker.sampler import Sampler, make_generator
from pagedserve.v1 import common_pb2, worker_pb2


@dataclass
class SequenceState:
    token_ids: list[int]
    num_computed_tokens: int
    sampling: common_pb2.SamplingParams
    generator: torch.Generator | None
    block_table: list[int] = field(default_factory=list)


@dataclass
class _Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    # Rows of the flattened batch whose logits are sampled, and the sequences they belong to.
    sample_rows: torch.Tensor
    sample_seq_ids: list[int]


class ModelRunner:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.model_config = ModelConfig.from_model_dir(config.model_path)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {self.model_config.max_position_embeddings}"
            )
        self.model = load_model(
            config.model_path, self.model_config, self.device, self.dtype, self.max_model_len
        )
        # Sized after the weights are on the device, from what memory is left.
        num_blocks = determine_num_kv_blocks(config, self.model_config, self.device, self.dtype)
        self.kv_cache = allocate_kv_cache(
            self.model_config, num_blocks, config.block_size, self.device, self.dtype
        )
        bind_kv_cache(self.model.attention_layers(), self.kv_cache)
        self.sampler = Sampler(self.device, config.seed)
        self.sequences: dict[int, SequenceState] = {}

    def info(self) -> worker_pb2.WorkerInfo:
        model = common_pb2.ModelInfo(
            model_name=self.config.model_path.resolve().name,
            architecture=self.model_config.model_type,
            max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size,
            eos_token_ids=list(self.model_config.eos_token_ids),
        )
        return worker_pb2.WorkerInfo(
            model=model,
            num_kv_blocks=self.kv_cache.num_blocks,
            block_size=self.kv_cache.block_size,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def reset(self) -> None:
        """Forgets every sequence, as when a new scheduler stream starts from scratch."""
        self.sequences.clear()

    @torch.inference_mode()
    def execute_step(self, step: worker_pb2.StepRequest) -> worker_pb2.StepResult:
        start_ns = time.perf_counter_ns()
        for seq_id in step.finished_seq_ids:
            self.sequences.pop(seq_id, None)
        for new in step.new_sequences:
            # A copy, so that the state does not keep the whole step message alive.
            sampling = common_pb2.SamplingParams()
            sampling.CopyFrom(new.sampling)
            self.sequences[new.seq_id] = SequenceState(
                token_ids=list(new.token_ids),
                num_computed_tokens=new.num_computed_tokens,
                sampling=sampling,
                generator=make_generator(sampling, self.device),
            )
        result = worker_pb2.StepResult(step_id=step.step_id)
        if not step.scheduled:
            result.execute_ns = time.perf_counter_ns() - start_ns
            return result

        batch = self._prepare_batch(step.scheduled)
        with attention_context(batch.metadata):
            hidden_states = self.model(batch.input_ids, batch.positions)
        sampled_tokens: list[int] = []
        if batch.sample_seq_ids:
            logits = self.model.compute_logits(hidden_states[batch.sample_rows])
            states = [self.sequences[seq_id] for seq_id in batch.sample_seq_ids]
            sampled_tokens = self.sampler.sample(
                logits, [s.sampling for s in states], [s.generator for s in states]
            ).tolist()
            for state, token_id in zip(states, sampled_tokens):
                state.token_ids.append(token_id)

        result.seq_ids.extend(batch.sample_seq_ids)
        result.token_ids.extend(sampled_tokens)
        # tolist() above waited for the device, so this covers the whole step.
        result.execute_ns = time.perf_counter_ns() - start_ns
        return result

    def _prepare_batch(self, scheduled: Sequence[worker_pb2.ScheduledSequence]) -> _Batch:
        block_size = self.kv_cache.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        block_tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_seq_ids: list[int] = []
        for entry in scheduled:
            state = self.sequences[entry.seq_id]
            state.block_table.extend(entry.new_block_ids)
            start = state.num_computed_tokens
            end = start + entry.num_new_tokens
            assert entry.num_new_tokens > 0, f"seq {entry.seq_id}: nothing to compute"
            assert end <= len(state.token_ids), f"seq {entry.seq_id}: computing past its tokens"
            assert end <= len(state.block_table) * block_size, f"seq {entry.seq_id}: too few blocks"
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            table = state.block_table
            slot_mapping.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
            query_start_loc.append(query_start_loc[-1] + entry.num_new_tokens)
            seq_lens.append(end)
            block_tables.append(table)
            state.num_computed_tokens = end
            # A sequence samples once its known tokens are all computed; a partial prefill
            # chunk only fills the cache.
            if end == len(state.token_ids):
                sample_rows.append(query_start_loc[-1] - 1)
                sample_seq_ids.append(entry.seq_id)

        max_blocks = max(len(table) for table in block_tables)
        padded_tables = [table + [0] * (max_blocks - len(table)) for table in block_tables]

        def to_device(values, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        metadata = AttentionMetadata(
            slot_mapping=to_device(slot_mapping, torch.int64),
            query_start_loc=to_device(query_start_loc, torch.int32),
            seq_lens=to_device(seq_lens, torch.int32),
            block_tables=to_device(padded_tables, torch.int32),
            max_query_len=max(b - a for a, b in zip(query_start_loc, query_start_loc[1:])),
            max_seq_len=max(seq_lens),
        )
        return _Batch(
            input_ids=to_device(input_ids, torch.int64),
            positions=to_device(positions, torch.int64),
            metadata=metadata,
            sample_rows=to_device(sample_rows, torch.int64),
            sample_seq_ids=sample_seq_ids,
        )
