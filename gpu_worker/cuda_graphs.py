"""CUDA graphs for decode steps, and for the verification steps of speculative decoding.

A decode step launches a few hundred small kernels whose launch cost exceeds their run
time at small batches, so the model's forward is captured once per batch size of a ladder
and replayed. Graphs are captured largest first into one memory pool, so that the smaller
ones reuse the largest one's activation memory. A batch runs in the smallest graph that
holds it; the rows past it are padding, whose slot -1 makes the KV store skip them and
whose context length 0 makes attention write zeros.

The captured kernels read fixed input buffers; each replay copies the step's inputs into
them. Nothing captured depends on context lengths (the attention kernels read them from
device memory), so one graph serves any contexts.

A verification step computes up to query_len tokens per sequence (its token and its
proposals), fewer where lookup found fewer. Its graphs are captured with exactly
query_len query tokens per sequence; a sequence with fewer is padded on the left with
tokens whose slot is -1. Its real tokens keep their positions, since attention places a
sequence's queries at the end of its context (context length minus query length), and
the padding's KV is never stored, so the real tokens never see it; the padding rows'
outputs are dropped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from gpu_worker.kernels.paged_attention import PADDING_SLOT
from gpu_worker.model.attention import AttentionMetadata, attention_context

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE


def capture_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    intermediate: torch.Tensor | None,
    metadata: AttentionMetadata,
    pool: _POOL_HANDLE,
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """The model's forward on these buffers captured into `pool`; returns the graph and
    the output tensor its replays write."""
    # One eager run first: kernels compile and the allocator settles outside capture.
    # It and the capture each see a copy of the metadata of their own: what the layers
    # derive from it once per forward (AttentionMetadata.derived, such as the prefill
    # kernel's tile map) must be made inside the graph, so that every replay remakes it
    # from the buffers it was given. Made by the warm-up, it would be a tensor outside
    # the graph, frozen at the warm-up's batch and freed once capture is done.
    with attention_context(replace(metadata)):
        model(input_ids, positions, intermediate)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with attention_context(replace(metadata)), torch.cuda.graph(graph, pool=pool):
        output = model(input_ids, positions, intermediate)
    return graph, output


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

    query_len: int

    @classmethod
    def allocate(
        cls, max_num_seqs: int, query_len: int, max_blocks_per_seq: int, device: torch.device
    ) -> _StaticInputs:
        num_tokens = max_num_seqs * query_len
        return cls(
            input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=device),
            positions=torch.zeros(num_tokens, dtype=torch.int64, device=device),
            slot_mapping=torch.full((num_tokens,), PADDING_SLOT, dtype=torch.int64, device=device),
            seq_lens=torch.zeros(max_num_seqs, dtype=torch.int32, device=device),
            block_tables=torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(
                0, (max_num_seqs + 1) * query_len, query_len, dtype=torch.int32, device=device
            ),
            query_len=query_len,
        )

    def metadata(self, size: int, max_seq_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[: size * self.query_len],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=self.query_len,
            max_seq_len=max_seq_len,
            may_have_decodes=self.query_len == 1,
        )

    def tokens(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The input ids and positions of a graph of `size` sequences."""
        num_tokens = size * self.query_len
        return self.input_ids[:num_tokens], self.positions[:num_tokens]

    def pad_queries(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """Writes a batch of up to query_len tokens per sequence into the buffers, each
        sequence's tokens at the end of its query_len rows (the rows before them: slot -1);
        returns where each of the batch's tokens went."""
        query_len = self.query_len
        start_loc = metadata.query_start_loc.to(torch.int64)
        num_tokens = input_ids.shape[0]
        # The sequence of each token, with no host sync: the output size is known.
        token_seq = torch.repeat_interleave(start_loc[1:] - start_loc[:-1], output_size=num_tokens)
        # A sequence's last token goes to its last row: (seq + 1) * query_len - 1.
        rows = (
            (token_seq + 1) * query_len
            - start_loc[token_seq + 1]
            + torch.arange(num_tokens, device=input_ids.device)
        )
        num_rows = metadata.seq_lens.shape[0] * query_len
        # Padding rows keep the ids and positions of earlier steps: valid values, and
        # nothing of them is stored or read.
        self.slot_mapping[:num_rows].fill_(PADDING_SLOT)
        self.slot_mapping.index_copy_(0, rows, metadata.slot_mapping)
        self.input_ids.index_copy_(0, rows, input_ids)
        self.positions.index_copy_(0, rows, positions)
        return rows


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        intermediate: torch.Tensor | None = None,
        query_len: int = 1,
    ) -> None:
        """intermediate: for a pipeline stage after the first, a [max_num_seqs, hidden] buffer
        the graphs read the previous stage's output from, instead of embedding input ids
        (decode graphs only). query_len: the query tokens per sequence the graphs compute,
        1 for decode steps, 1 + the proposals for verification steps."""
        assert query_len == 1 or intermediate is None, "verification graphs run on the first stage"
        self.model = model
        self.max_model_len = max_model_len
        self.query_len = query_len
        self.sizes = capture_sizes(max_num_seqs)
        max_blocks_per_seq = -(-max_model_len // block_size)
        self.inputs = _StaticInputs.allocate(self.sizes[-1], query_len, max_blocks_per_seq, device)
        self.intermediate = intermediate
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    @torch.inference_mode()
    def capture(self, pool: _POOL_HANDLE | None = None) -> _POOL_HANDLE:
        """Captures every size into `pool` (a new one if None); returns the pool, which
        other graphs replayed on the same stream may share."""
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
        for size in reversed(self.sizes):
            metadata = self.inputs.metadata(size, self.max_model_len)
            input_ids, positions = self.inputs.tokens(size)
            intermediate = None if self.intermediate is None else self.intermediate[:size]
            graph, self.outputs[size] = capture_forward(
                self.model, input_ids, positions, intermediate, metadata, pool
            )
            self.graphs[size] = graph
        torch.cuda.synchronize()
        return pool

    def can_run(self, metadata: AttentionMetadata) -> bool:
        num_seqs = metadata.seq_lens.shape[0]
        return (
            bool(self.graphs)
            and metadata.max_query_len <= self.query_len
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
        """Replays the smallest graph that holds the batch; returns [num_tokens, hidden]."""
        num_seqs = metadata.seq_lens.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, num_seqs)]
        inputs = self.inputs
        padded_rows = None
        if self.query_len > 1:
            padded_rows = inputs.pad_queries(input_ids, positions, metadata)
        else:
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
            query_len = self.query_len
            inputs.slot_mapping[num_seqs * query_len : size * query_len].fill_(PADDING_SLOT)
            inputs.seq_lens[num_seqs:size].fill_(0)
        self.graphs[size].replay()
        if padded_rows is not None:
            return self.outputs[size].index_select(0, padded_rows)
        return self.outputs[size][:num_seqs]
