"""Verification of proposed tokens by rejection sampling, which keeps the target model's
distribution exactly (Leviathan et al. 2023, Chen et al. 2023).

A sequence with proposals d_1..d_k has k + 1 rows of target logits: row j is the target's
distribution p_j of the token after d_1..d_j. Proposal d_(j+1) was drawn from the
proposer's q_j (a point mass for n-gram lookup). It is accepted with probability
min(1, p_j(d) / q_j(d)); the first rejected one is replaced by a draw from
norm(max(0, p_j - q_j)); when all k are accepted, one more token is drawn from p_k. Every
token so produced is distributed as the target alone would sample it.

Greedy rows accept a proposal exactly when it is the target's argmax, and replace the
first that is not with the argmax: the tokens are those of greedy decoding without
speculation.

Randomness is the sampler's (gpu_worker/sampler.py): a pure function of (seed, position,
completion index). The replacement and final draws use the very noise an unspeculated
draw at that position uses, so a sequence whose proposals are all rejected at once draws
what it would have drawn anyway; the accept tests and the draft model's own draws use
streams keyed by offset completion indices, independent of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpu_worker.sampler import (
    Sampler,
    SequenceSampling,
    _add_logit_bias,
    _filter_min_p,
    exponential_noise,
    to_device,
)

# Completion indices are below 2**31; these offsets key streams no sampled draw uses.
ACCEPT_STREAM = 1 << 40
DRAFT_STREAM = 2 << 40


@dataclass(frozen=True)
class Distributions:
    """What a sampler makes of rows of logits before it draws: each row's argmax (the
    greedy choice) and, for the rows that sample, their probabilities."""

    greedy: torch.Tensor
    # Rows of `probs`, in order; the others are greedy.
    random_rows: list[int]
    # [len(random_rows), vocab] float32.
    probs: torch.Tensor | None


def distributions(
    sampler: Sampler, logits: torch.Tensor, rows: Sequence[SequenceSampling], positions: Sequence[int]
) -> Distributions:
    """The sampler's transforms (min-tokens mask, logit bias, temperature, min-p, top-k,
    top-p) applied to each row, as Sampler draws one token per row without penalties."""
    processed = sampler._mask_stop_tokens(logits, rows, positions)
    processed = _add_logit_bias(processed, rows)
    greedy = processed.argmax(dim=-1)
    random_rows = [i for i, row in enumerate(rows) if not row.is_greedy]
    if not random_rows:
        return Distributions(greedy, [], None)
    picked = [rows[i] for i in random_rows]
    index = to_device(random_rows, torch.int64, logits.device)
    temperatures = to_device([r.temperature for r in picked], torch.float32, logits.device)
    scaled = processed[index].float() / temperatures[:, None]
    scaled = _filter_min_p(scaled, picked)
    scaled = Sampler._filter_top_k_top_p(scaled, picked)
    return Distributions(greedy, random_rows, torch.softmax(scaled, dim=-1))


def _noise(
    rows: Sequence[SequenceSampling],
    positions: Sequence[int],
    offset: int,
    vocab_size: int,
    device: torch.device,
) -> torch.Tensor:
    return exponential_noise(
        to_device([r.seed for r in rows], torch.int64, device),
        to_device(list(positions), torch.int64, device),
        to_device([r.index + offset for r in rows], torch.int64, device),
        vocab_size,
    )


def draw_proposals(
    sampler: Sampler, logits: torch.Tensor, rows: Sequence[SequenceSampling], positions: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A proposer model's draws: [rows] tokens and [rows, vocab] the distribution q each
    was drawn from (zeros for greedy rows, whose proposals the target checks by argmax)."""
    dist = distributions(sampler, logits, rows, positions)
    tokens = dist.greedy.clone()
    q = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    if dist.probs is not None:
        picked = [rows[i] for i in dist.random_rows]
        noise = _noise(
            picked, [positions[i] for i in dist.random_rows], DRAFT_STREAM, logits.shape[-1], logits.device
        )
        index = to_device(dist.random_rows, torch.int64, logits.device)
        tokens[index] = (dist.probs / noise).argmax(dim=-1)
        q[index] = dist.probs
    return tokens, q


@dataclass(frozen=True)
class Verified:
    """Per sequence, on the device: the tokens it gains, [sequences, max proposals + 1]
    padded with -1, and how many of its proposals were accepted (it gains one more)."""

    tokens: torch.Tensor
    num_accepted: torch.Tensor


def verify(
    sampler: Sampler,
    logits: torch.Tensor,
    rows: Sequence[SequenceSampling],
    positions: Sequence[int],
    proposed: Sequence[int],
    num_proposed: Sequence[int],
    proposal_probs: torch.Tensor | None = None,
) -> Verified:
    """logits: [R, vocab], each sequence's k + 1 rows in a row (sequences in order,
    num_proposed their k). rows, positions: per row, its sequence's sampling and the
    position of the token the row predicts. proposed: per row, the proposal it checks,
    -1 on each sequence's last row. proposal_probs: [R, vocab], q on the rows with a
    proposal; None: every proposal is a point mass (n-gram lookup)."""
    device = logits.device
    dist = distributions(sampler, logits, rows, positions)
    proposals = to_device(list(proposed), torch.int64, device)
    accepted = dist.greedy == proposals
    replacement = dist.greedy.clone()
    if dist.probs is not None:
        index = to_device(dist.random_rows, torch.int64, device)
        picked = [rows[i] for i in dist.random_rows]
        picked_positions = [positions[i] for i in dist.random_rows]
        p = dist.probs
        d = proposals[index]
        has_proposal = d >= 0
        d_safe = d.clamp(min=0)[:, None]
        p_d = p.gather(1, d_safe).squeeze(1)
        if proposal_probs is None:
            q = torch.zeros_like(p).scatter_(1, d_safe, 1.0)
        else:
            q = proposal_probs[index].float()
        q = q * has_proposal[:, None]
        q_d = q.gather(1, d_safe).squeeze(1)
        uniform = torch.exp(-_noise(picked, picked_positions, ACCEPT_STREAM, 1, device)[:, 0])
        # u < p/q, written without dividing; q(d) > 0 for every drawn proposal.
        accepted[index] = has_proposal & (uniform * q_d < p_d)
        residual = (p - q).clamp(min=0)
        # A residual of zero mass means p == q, where a rejection has probability 0.
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)
        noise = _noise(picked, picked_positions, 0, p.shape[-1], device)
        replacement[index] = (residual / noise).argmax(dim=-1)
    return _assemble(proposals, accepted, replacement, num_proposed, device)


def _assemble(
    proposals: torch.Tensor,
    accepted: torch.Tensor,
    replacement: torch.Tensor,
    num_proposed: Sequence[int],
    device: torch.device,
) -> Verified:
    """Each sequence's accepted leading proposals, then its replacement (or final) token."""
    width = max(num_proposed) + 1
    starts, start = [], 0
    for k in num_proposed:
        starts.append(start)
        start += k + 1
    columns = torch.arange(width, device=device)
    counts = to_device(list(num_proposed), torch.int64, device)
    in_range = columns[None, :] <= counts[:, None]
    row_index = torch.where(in_range, to_device(starts, torch.int64, device)[:, None] + columns[None, :], 0)
    is_proposal = columns[None, :] < counts[:, None]
    leading = (accepted[row_index] & is_proposal).to(torch.int64).cumprod(dim=1)
    num_accepted = leading.sum(dim=1)
    tokens = torch.where(
        columns[None, :] < num_accepted[:, None],
        proposals[row_index],
        torch.where(columns[None, :] == num_accepted[:, None], replacement[row_index], -1),
    )
    return Verified(tokens, num_accepted)
