"""How the model runner speculates: it asks the proposer for tokens for the sequences the
scheduler gave lookahead slots, has them computed in the step's one forward, verifies them
(rejection.py) and, once the step is read back, applies what each sequence gained: its
tokens, its accepted tokens counted as computed, its block table cut to the blocks that
hold its known tokens (the scheduler cuts its own the same way)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from pagedserve.v1 import common_pb2, worker_pb2

from gpu_worker.block_tables import BlockTables
from gpu_worker.input_batch import StepInputs
from gpu_worker.sampler import Sampler, SequenceSampling
from gpu_worker.speculative.proposer import ProposalRequest, Proposals, Proposer
from gpu_worker.speculative.rejection import verify

if TYPE_CHECKING:
    from gpu_worker.model.decoder import DecoderForCausalLM


class _Speculating(Protocol):
    token_ids: list[int]
    num_computed_tokens: int
    sampling: SequenceSampling


@dataclass
class VerifiedStep:
    """A launched step's verification: per speculating sequence, its id, its state, how
    many tokens it proposed; the gained tokens and accepted counts, copied to the host."""

    seq_ids: list[int]
    states: list[_Speculating]
    num_proposed: list[int]
    host_tokens: torch.Tensor
    host_num_accepted: torch.Tensor
    # Batch index of each, to merge them into the result in batch order.
    batch_index: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Gained:
    batch_index: int
    seq_id: int
    tokens: list[int]
    outcome: worker_pb2.SpeculationOutcome


class SpeculativeDecoding:
    def __init__(self, proposer: Proposer, sampler: Sampler, tables: BlockTables, block_size: int) -> None:
        self.proposer = proposer
        self.sampler = sampler
        self.tables = tables
        self.block_size = block_size
        self._proposals: Proposals | None = None

    def propose(
        self, scheduled: Sequence[worker_pb2.ScheduledSequence], sequences: Mapping[int, _Speculating]
    ) -> dict[int, list[int]]:
        """Proposals of every entry with lookahead slots, by seq_id (tables extended)."""
        requests = [
            ProposalRequest(
                entry.seq_id,
                sequences[entry.seq_id].token_ids,
                entry.num_lookahead_tokens,
                sequences[entry.seq_id].sampling,
            )
            for entry in scheduled
            if entry.num_lookahead_tokens
        ]
        self._proposals = self.proposer.propose(requests)
        return {r.seq_id: tokens for r, tokens in zip(requests, self._proposals.tokens)}

    def verify(
        self,
        model: DecoderForCausalLM,
        hidden_states: torch.Tensor,
        batch: StepInputs,
        sequences: Mapping[int, _Speculating],
        copy_to_host: Callable[[torch.Tensor], torch.Tensor],
    ) -> VerifiedStep:
        """Queues the verification of the batch's speculating sequences on the device."""
        verification = batch.verification
        assert verification is not None and verification.rows is not None and self._proposals is not None
        proposals, self._proposals = self._proposals, None
        logits = model.compute_logits(hidden_states.index_select(0, verification.rows))
        states = [sequences[seq_id] for seq_id in verification.seq_ids]
        rows: list[SequenceSampling] = []
        positions: list[int] = []
        proposed: list[int] = []
        proposal_rows: list[int] = []
        for state, tokens in zip(states, proposals.tokens):
            # Every token is known: row j predicts the token at len + j.
            num_known = len(state.token_ids)
            for j in range(len(tokens) + 1):
                rows.append(state.sampling)
                positions.append(num_known + j)
                if j < len(tokens):
                    proposal_rows.append(len(proposed))
                    proposed.append(tokens[j])
                else:
                    proposed.append(-1)
        probs = None
        if proposals.probs is not None:
            probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
            probs[torch.tensor(proposal_rows, dtype=torch.int64, device=logits.device)] = proposals.probs
        verified = verify(self.sampler, logits, rows, positions, proposed, verification.num_proposed, probs)
        return VerifiedStep(
            seq_ids=verification.seq_ids,
            states=states,
            num_proposed=verification.num_proposed,
            host_tokens=copy_to_host(verified.tokens),
            host_num_accepted=copy_to_host(verified.num_accepted),
            batch_index=verification.batch_index,
        )

    def finish(self, verified: VerifiedStep, sequences: Mapping[int, _Speculating]) -> list[Gained]:
        """Applies what each sequence gained (read from the host copies) to the sequences
        still live; returns it, in batch order."""
        tokens = verified.host_tokens.tolist()
        num_accepted = verified.host_num_accepted.tolist()
        gained = []
        for i, (seq_id, state) in enumerate(zip(verified.seq_ids, verified.states)):
            accepted = num_accepted[i]
            new_tokens = tokens[i][: accepted + 1]
            if sequences.get(seq_id) is state:
                state.token_ids.extend(new_tokens)
                state.num_computed_tokens += accepted
                self.tables.truncate(seq_id, -(-len(state.token_ids) // self.block_size))
            outcome = worker_pb2.SpeculationOutcome(
                seq_id=seq_id, num_proposed=verified.num_proposed[i], num_accepted=accepted
            )
            gained.append(Gained(verified.batch_index[i], seq_id, new_tokens, outcome))
        return gained


def merge_gained(result: worker_pb2.StepResult, gained: list[Gained], sample_index: Sequence[int]) -> None:
    """Puts the speculating sequences' tokens into a result that holds the other samples'
    (a run of one seq_id per sample, sample_index their batch indices), all in batch
    order, with their outcomes; empty logprobs stand for theirs when others have some."""
    runs: list[tuple[int, list[int], list[int], list]] = []
    seq_ids, tokens, logprobs = list(result.seq_ids), list(result.token_ids), list(result.logprobs)
    start = 0
    for batch_index in sample_index:
        end = start + 1
        while end < len(seq_ids) and seq_ids[end] == seq_ids[start]:
            end += 1
        runs.append((batch_index, seq_ids[start:end], tokens[start:end], logprobs[start:end]))
        start = end
    empty = common_pb2.TokenLogprobs()
    for item in gained:
        runs.append(
            (item.batch_index, [item.seq_id] * len(item.tokens), item.tokens, [empty] * len(item.tokens))
        )
    runs.sort(key=lambda run: run[0])
    del result.seq_ids[:], result.token_ids[:], result.logprobs[:]
    for _, run_ids, run_tokens, run_logprobs in runs:
        result.seq_ids.extend(run_ids)
        result.token_ids.extend(run_tokens)
        if logprobs:
            result.logprobs.extend(run_logprobs)
    result.speculation.extend(item.outcome for item in gained)
