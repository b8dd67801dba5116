"""Prompt logprobs (SamplingParams.prompt_logprobs): the log-softmax of the logits at
every prompt position, at the next prompt token, computed from the hidden states that a
prefill step (or chunk) produces anyway.

Only a sequence that has generated nothing yet reports them: one that comes back after a
preemption or a move to another engine with generated tokens has delivered them already.
One preempted in the middle of its prompt computes it again from the start, and the
scheduler keeps the positions it has not received yet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from pagedserve.v1 import common_pb2, worker_pb2

from gpu_worker.sampler import to_device

# Rows whose logits are computed at once: a whole prompt's logits over a large vocabulary
# would take gigabytes.
_ROWS_PER_SLICE = 256


@dataclass(frozen=True)
class _Wanted:
    num_top: int
    num_prompt_tokens: int


@dataclass(frozen=True)
class PromptSlice:
    """Rows of a step's flattened batch that predict prompt tokens of one sequence."""

    seq_id: int
    first_row: int
    # Position in the prompt of the token the first row predicts.
    first_position: int
    targets: list[int]
    num_top: int


@dataclass(frozen=True)
class ScoredPrompt:
    """A slice's log-probabilities, on the host once the step's copies are done."""

    slice: PromptSlice
    target: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor

    def to_proto(self) -> worker_pb2.PromptLogprobs:
        entries = [
            common_pb2.TokenLogprobs(logprob=logprob, top_token_ids=ids, top_logprobs=values)
            for logprob, ids, values in zip(
                self.target.tolist(), self.top_ids.tolist(), self.top_values.tolist()
            )
        ]
        return worker_pb2.PromptLogprobs(
            seq_id=self.slice.seq_id, first_position=self.slice.first_position, logprobs=entries
        )


class _SequenceLike(Protocol):
    token_ids: list[int]
    num_computed_tokens: int


class PromptLogprobs:
    """Which live sequences want their prompt's logprobs, and the work to get them."""

    def __init__(self) -> None:
        self._wanted: dict[int, _Wanted] = {}

    def __bool__(self) -> bool:
        return bool(self._wanted)

    def add(self, new: worker_pb2.NewSequence) -> None:
        self._wanted.pop(new.seq_id, None)
        sampling = new.sampling
        if sampling.HasField("prompt_logprobs") and len(new.token_ids) == new.num_prompt_tokens:
            self._wanted[new.seq_id] = _Wanted(sampling.prompt_logprobs, new.num_prompt_tokens)

    def remove(self, seq_id: int) -> None:
        self._wanted.pop(seq_id, None)

    def clear(self) -> None:
        self._wanted.clear()

    def plan(
        self, scheduled: Sequence[worker_pb2.ScheduledSequence], sequences: Mapping[int, _SequenceLike]
    ) -> list[PromptSlice]:
        """The slices of a step not built yet (each sequence's num_computed_tokens still
        where the step starts): rows follow the scheduled order, num_new_tokens each. A
        sequence whose prompt this step finishes is not planned again."""
        slices = []
        first_row = 0
        for entry in scheduled:
            wanted = self._wanted.get(entry.seq_id)
            if wanted is not None:
                state = sequences[entry.seq_id]
                start = state.num_computed_tokens
                # Row i predicts token start + i + 1; the last prompt token predicts a
                # generated one.
                end = min(start + entry.num_new_tokens, wanted.num_prompt_tokens - 1)
                if end > start:
                    targets = state.token_ids[start + 1 : end + 1]
                    slices.append(PromptSlice(entry.seq_id, first_row, start + 1, targets, wanted.num_top))
                if start + entry.num_new_tokens >= wanted.num_prompt_tokens - 1:
                    del self._wanted[entry.seq_id]  # its whole prompt is scored
            first_row += entry.num_new_tokens
        return slices


def score_prompts(
    hidden_states: torch.Tensor,
    slices: Sequence[PromptSlice],
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    copy_to_host: Callable[[torch.Tensor], torch.Tensor],
) -> list[ScoredPrompt]:
    """Each slice's log-probabilities, queued on the device and copied to the host."""
    scored = []
    device = hidden_states.device
    for prompt in slices:
        targets_all = to_device(prompt.targets, torch.int64, device)
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for offset in range(0, len(prompt.targets), _ROWS_PER_SLICE):
            count = min(_ROWS_PER_SLICE, len(prompt.targets) - offset)
            first = prompt.first_row + offset
            logprobs = torch.log_softmax(compute_logits(hidden_states[first : first + count]).float(), dim=-1)
            targets = targets_all[offset : offset + count]
            top_values, top_ids = logprobs.topk(prompt.num_top, dim=-1)
            parts.append((logprobs.gather(1, targets[:, None]).squeeze(1), top_ids, top_values))
        target, top_ids, top_values = (torch.cat(column) for column in zip(*parts))
        scored.append(
            ScoredPrompt(prompt, copy_to_host(target), copy_to_host(top_ids), copy_to_host(top_values))
        )
    return scored
