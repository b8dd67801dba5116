"""CUDA graphs for steps with prompt tokens: prefills, chunks of prefill, and prefills
mixed with decodes.

Launched eagerly, such a step costs the host about 20 ms of Python and kernel launches on
a small model, more than its kernels take on the device: the device waits on the host,
and every sequence decoding in the same step waits with it (the inter-token latency's
tail). So the forward is captured once per token count of a ladder (128, 256, ... up to
2048, or max_num_batched_tokens if smaller) and a step replays the smallest graph that
holds its tokens; larger steps run eagerly. Asked for with `--prefill-graphs`
(WorkerConfig.prefill_graphs); gpu_worker/step_graphs.py decides where they apply.

Each token count is captured for a ladder of sequence slots too (16, 64, ... up to
max_num_seqs): the attention kernels launch programs for every slot, and those of empty
slots, though they return at once, take their turn on the multiprocessors behind the
real ones. A batch takes the fewest slots that hold it and leaves the rest empty (no
query tokens, no context); the rows past the batch's tokens are padding, whose slot -1
keeps their KV out of the cache and which belong to no sequence, so no attention reads
them. The attention kernels read query offsets and context lengths from device memory
and number their tiles on the device (kernels/triton_prefill_attention.py), so one graph
serves any mix of prompts, chunks and decodes of its size.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch
from torch import nn

from gpu_worker.cuda_graphs import capture_forward
from gpu_worker.kernels.paged_attention import PADDING_SLOT
from gpu_worker.model.attention import AttentionMetadata

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

# Below this many tokens a step's graph would save little over the next size up. A step
# of a few decodes beside the scheduler's capped prompt tokens (64, and 2 more per decode)
# holds some 70-150 tokens: padded to 256, its projections and MLPs did twice the work.
SMALLEST_PREFILL_GRAPH = 128
# Above it a step's kernels outlast its eager launches, and a step of fresh prompts only
# is faster eagerly, where it may use a varlen FlashAttention kernel (whose launch depends
# on the longest prompt) instead of the paged kernel.
LARGEST_PREFILL_GRAPH = 2048
# Sequence slots grow by this factor from the smallest: few graphs, none more than 4x the
# slots its batch needs.
SMALLEST_SEQ_SLOTS = 16
SEQ_SLOTS_GROWTH = 4


def prefill_capture_sizes(max_num_batched_tokens: int) -> list[int]:
    """Powers of two from SMALLEST_PREFILL_GRAPH up to the smaller of LARGEST_PREFILL_GRAPH
    and max_num_batched_tokens, and that one itself."""
    largest = min(max_num_batched_tokens, LARGEST_PREFILL_GRAPH)
    sizes = []
    size = SMALLEST_PREFILL_GRAPH
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(largest)
    return sizes


def prefill_seq_slots(max_num_seqs: int) -> list[int]:
    """16, 64, ... below max_num_seqs, and max_num_seqs itself."""
    slots = []
    count = SMALLEST_SEQ_SLOTS
    while count < max_num_seqs:
        slots.append(count)
        count *= SEQ_SLOTS_GROWTH
    slots.append(max_num_seqs)
    return slots


class PrefillGraphs:
    def __init__(
        self,
        model: nn.Module,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.sizes = prefill_capture_sizes(max_num_batched_tokens)
        self.seq_slots = prefill_seq_slots(max_num_seqs)
        num_tokens = self.sizes[-1]
        max_blocks_per_seq = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((num_tokens,), PADDING_SLOT, dtype=torch.int64, device=device)
        self.query_start_loc = torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        # By (tokens, sequence slots).
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}

    def _metadata(self, size: int, slots: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: slots + 1],
            seq_lens=self.seq_lens[:slots],
            block_tables=self.block_tables[:slots],
            max_query_len=size,
            max_seq_len=self.max_model_len,
            fewest_seqs=self.fewest_seqs(slots),
        )

    def fewest_seqs(self, slots: int) -> int:
        """How many sequences at least a batch replaying a graph of `slots` holds: more
        than the next smaller slot count, which it would replay otherwise."""
        smaller = [count for count in self.seq_slots if count < slots]
        return smaller[-1] if smaller else 1

    @torch.inference_mode()
    def capture(self, pool: _POOL_HANDLE | None = None) -> _POOL_HANDLE:
        """Captures every size and slot count, largest first, into `pool` (a new one if
        None); returns it."""
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
        for size in reversed(self.sizes):
            input_ids, positions = self.input_ids[:size], self.positions[:size]
            for slots in reversed(self.seq_slots):
                key = (size, slots)
                metadata = self._metadata(size, slots)
                self.graphs[key], self.outputs[key] = capture_forward(
                    self.model, input_ids, positions, None, metadata, pool
                )
        torch.cuda.synchronize()
        return pool

    def can_run(self, metadata: AttentionMetadata) -> bool:
        return (
            bool(self.graphs)
            and metadata.max_query_len > 1
            and metadata.slot_mapping.shape[0] <= self.sizes[-1]
            and metadata.seq_lens.shape[0] <= self.seq_lens.shape[0]
            and metadata.block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def stage(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> AttentionMetadata:
        """Writes the batch into the buffers of the smallest graph that holds its tokens and
        sequences; returns that graph's metadata (its size: max_query_len, its slots: the
        length of seq_lens)."""
        num_tokens = input_ids.shape[0]
        num_seqs = metadata.seq_lens.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, num_tokens)]
        slots = self.seq_slots[bisect.bisect_left(self.seq_slots, num_seqs)]
        self.input_ids[:num_tokens].copy_(input_ids, non_blocking=True)
        self.positions[:num_tokens].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_tokens].copy_(metadata.slot_mapping, non_blocking=True)
        self.slot_mapping[num_tokens:size].fill_(PADDING_SLOT)
        # The empty sequences past the batch start and end at its last token.
        self.query_start_loc[: num_seqs + 1].copy_(metadata.query_start_loc, non_blocking=True)
        self.query_start_loc[num_seqs + 1 : slots + 1].fill_(num_tokens)
        self.seq_lens[:num_seqs].copy_(metadata.seq_lens, non_blocking=True)
        self.seq_lens[num_seqs:slots].fill_(0)
        num_columns = metadata.block_tables.shape[1]
        self.block_tables[:num_seqs, :num_columns].copy_(metadata.block_tables, non_blocking=True)
        return self._metadata(size, slots)

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        intermediate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Replays the smallest graph that holds the batch's tokens and sequences; returns
        [num_tokens, hidden]."""
        assert intermediate is None, "prefill graphs run on a single pipeline stage"
        staged = self.stage(input_ids, positions, metadata)
        key = (staged.max_query_len, staged.seq_lens.shape[0])
        self.graphs[key].replay()
        return self.outputs[key][: input_ids.shape[0]]
