"""What a proposer is: given sequences whose tokens are all known on the host, it offers
up to a number of next tokens for each, which the target then verifies in one forward.

N-gram lookup (ngram.py) and a draft model (draft.py) are proposers; an EAGLE-style head
would be one too (it would read the target's hidden states in after_forward)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from pagedserve.v1 import worker_pb2

    from gpu_worker.input_batch import StepInputs
    from gpu_worker.sampler import SequenceSampling


@dataclass(frozen=True)
class ProposalRequest:
    seq_id: int
    # Every token of the sequence; the last one's KV is computed in this step.
    token_ids: Sequence[int]
    # Proposals wanted at most (the lookahead slots the scheduler gave it).
    num_lookahead: int
    sampling: SequenceSampling


@dataclass(frozen=True)
class Proposals:
    # Per request, its proposals (possibly none), at most num_lookahead of them.
    tokens: list[list[int]]
    # [total proposals, vocab]: the distribution each proposal was drawn from, in order
    # (zeros for greedy requests); None when every proposal is a point mass.
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    def propose(self, requests: Sequence[ProposalRequest]) -> Proposals:
        """Proposals for sequences whose block tables already hold their lookahead slots."""
        ...

    def after_forward(self, batch: StepInputs) -> None:
        """Runs after the target's forward over every step's batch (the proposals of the
        step included): a proposer with a KV cache of its own fills it for the same
        tokens, so that it holds whatever the target's cache holds."""
        ...

    def apply_block_ops(self, step: worker_pb2.StepRequest) -> None:
        """The step's swaps and copies, applied to a proposer's own cache too."""
        ...
