"""CUDA graphs for decode-only steps.

A decode step launches a few hundred small kernels whose launch cost exceeds their run
time at small batches, so the model's forward is captured once per batch size of a ladder
and replayed. Graphs are captured largest first into one memory pool, so that the smaller
ones reuse the largest one's activation memory. A batch runs in the smallest graph that
holds it; the rows past it are padding, whose slot -1 makes the KV store skip them and
whose context length 0 makes attention write zeros.

The captured kernels read fixed input buffers; each replay copies the step's inputs into
them. Nothing captured depends on context lengths (the decode attention kernel reads
them from device memory), so one graph serves any contexts.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.kernels.paged_attention import PADDING_SLOT
from gpu_worker.model.attention import AttentionMetadata, attention_context


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    sizes.append(max_num_seqs)
    return sorted(set(sizes))


@dataclass
class _StaticInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor

    @classmethod
    def allocate(cls, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device) -> _StaticInputs:
        return cls(
            input_ids=torch.zeros(max_num_seqs, dtype=torch.int64, device=device),
            positions=torch.zeros(max_num_seqs, dtype=torch.int64, device=device),
            slot_mapping=torch.full((max_num_seqs,), PADDING_SLOT, dtype=torch.int64, device=device),
            seq_lens=torch.zeros(max_num_seqs, dtype=torch.int32, device=device),
            block_tables=torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device),
        )

    def metadata(self, size: int, max_seq_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=max_seq_len,
        )


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        intermediate: torch.Tensor | None = None,
    ) -> None:
        """intermediate: for a pipeline stage after the first, a [max_num_seqs, hidden] buffer
        the graphs read the previous stage's output from, instead of embedding input ids."""
        self.model = model
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        max_blocks_per_seq = -(-max_model_len // block_size)
        self.inputs = _StaticInputs.allocate(self.sizes[-1], max_blocks_per_seq, device)
        self.intermediate = intermediate
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            metadata = self.inputs.metadata(size, self.max_model_len)
            input_ids, positions = self.inputs.input_ids[:size], self.inputs.positions[:size]
            intermediate = None if self.intermediate is None else self.intermediate[:size]
            with attention_context(metadata):
                # One eager run first: kernels compile and the allocator settles outside capture.
                self.model(input_ids, positions, intermediate)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self.model(input_ids, positions, intermediate)
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def can_run(self, metadata: AttentionMetadata) -> bool:
        num_seqs = metadata.seq_lens.shape[0]
        return (
            bool(self.graphs)
            and metadata.max_query_len == 1
            and num_seqs <= self.max_batch_size
            and metadata.block_tables.shape[1] <= self.inputs.block_tables.shape[1]
        )

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        intermediate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Replays the smallest graph that holds the batch; returns [num_seqs, hidden]."""
        num_seqs = input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, num_seqs)]
        inputs = self.inputs
        if self.intermediate is not None:
            assert intermediate is not None, "a later pipeline stage runs on the previous stage's output"
            self.intermediate[:num_seqs].copy_(intermediate, non_blocking=True)
        inputs.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        inputs.positions[:num_seqs].copy_(positions, non_blocking=True)
        inputs.slot_mapping[:num_seqs].copy_(metadata.slot_mapping, non_blocking=True)
        inputs.seq_lens[:num_seqs].copy_(metadata.seq_lens, non_blocking=True)
        num_columns = metadata.block_tables.shape[1]
        inputs.block_tables[:num_seqs, :num_columns].copy_(metadata.block_tables, non_blocking=True)
        if size > num_seqs:
            inputs.slot_mapping[num_seqs:size].fill_(PADDING_SLOT)
            inputs.seq_lens[num_seqs:size].fill_(0)
        self.graphs[size].replay()
        return self.outputs[size][:num_seqs]
