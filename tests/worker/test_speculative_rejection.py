"""Rejection sampling of proposed tokens keeps the target's distribution exactly: checked
over many seeds on a small vocabulary with a chi-squared test at significance level
0.001 (each test fails by chance once in a thousand runs at most; the seeds are fixed, so
a run that passes passes every time)."""

from __future__ import annotations

import torch

from gpu_worker.sampler import Sampler, SequenceSampling
from gpu_worker.speculative.rejection import draw_proposals, verify

CPU = torch.device("cpu")
SIGNIFICANCE = 1e-3
NUM_SEEDS = 6000
VOCAB = 6


def _p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-squared test of observed counts against probabilities, with the
    survival function of the chi-squared distribution (regularized upper gamma)."""
    total = counts.sum()
    expected = probs * total
    keep = expected > 0
    assert (counts[~keep] == 0).all(), "a token of probability 0 was drawn"
    statistic = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(
        torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic.double() / 2)
    )


def _rows(num_rows_each: int, temperature: float = 1.0) -> list[SequenceSampling]:
    return [
        SequenceSampling(temperature=temperature, top_k=0, top_p=1.0, seed=seed, index=0)
        for seed in range(NUM_SEEDS)
        for _ in range(num_rows_each)
    ]


def _logits(seed: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 1.5


def test_one_point_mass_proposal_keeps_the_target_distribution() -> None:
    target = _logits(0, 2)  # row 0: the first token's distribution, row 1: after the proposal
    proposal = int(target[0].argsort()[-2])  # the second likeliest: often rejected
    logits = target.repeat(NUM_SEEDS, 1)
    rows = _rows(2)
    positions = [10, 11] * NUM_SEEDS
    verified = verify(Sampler(CPU), logits, rows, positions, [proposal, -1] * NUM_SEEDS, [1] * NUM_SEEDS)
    first = verified.tokens[:, 0]
    assert (
        _p_value(torch.bincount(first, minlength=VOCAB).double(), target[0].softmax(-1).double())
        > SIGNIFICANCE
    )
    # After an accepted proposal the next token follows the target's next distribution.
    after = verified.tokens[verified.num_accepted == 1, 1]
    assert len(after) > 50
    assert (
        _p_value(torch.bincount(after, minlength=VOCAB).double(), target[1].softmax(-1).double())
        > SIGNIFICANCE
    )


def test_draft_model_proposals_keep_the_target_distribution() -> None:
    target = _logits(1, 3)
    draft = _logits(2, 2)
    sampler = Sampler(CPU)
    rows = _rows(3)
    # Each seed's draft draws two proposals from its own distributions.
    draft_rows = [rows[i] for i in range(len(rows)) if i % 3 < 2]
    draft_positions = [20 + i % 2 for i in range(len(draft_rows))]
    proposed, q = draw_proposals(sampler, draft.repeat(NUM_SEEDS, 1), draft_rows, draft_positions)
    proposals = proposed.view(NUM_SEEDS, 2)
    per_row = torch.cat([proposals, torch.full((NUM_SEEDS, 1), -1)], dim=1).flatten().tolist()
    probs = torch.cat([q.view(NUM_SEEDS, 2, VOCAB), torch.zeros(NUM_SEEDS, 1, VOCAB)], dim=1).flatten(0, 1)
    positions = [20, 21, 22] * NUM_SEEDS
    verified = verify(sampler, target.repeat(NUM_SEEDS, 1), rows, positions, per_row, [2] * NUM_SEEDS, probs)
    first = verified.tokens[:, 0]
    assert (
        _p_value(torch.bincount(first, minlength=VOCAB).double(), target[0].softmax(-1).double())
        > SIGNIFICANCE
    )
    # The draft's distribution differs from the target's: rejections happen, and so do
    # acceptances.
    assert 0 < int((verified.num_accepted == 0).sum()) < NUM_SEEDS


def test_with_nothing_proposed_the_draw_is_the_samplers() -> None:
    logits = _logits(3, 1).repeat(NUM_SEEDS, 1)
    rows = _rows(1)
    positions = [7] * NUM_SEEDS
    sampler = Sampler(CPU)
    verified = verify(sampler, logits, rows, positions, [-1] * NUM_SEEDS, [0] * NUM_SEEDS)
    plain = sampler.sample_on_device(logits, rows, positions).tokens
    assert torch.equal(verified.tokens[:, 0], plain)
    assert not verified.num_accepted.any()


def test_greedy_accepts_the_argmax_prefix_and_then_corrects() -> None:
    logits = _logits(4, 4)
    best = logits.argmax(-1).tolist()
    wrong = (best[1] + 1) % VOCAB
    rows = [SequenceSampling(temperature=0.0, top_k=0, top_p=1.0, seed=0, index=0)] * 4
    verified = verify(Sampler(CPU), logits, rows, [0, 1, 2, 3], [best[0], wrong, best[2], -1], [3])
    assert verified.num_accepted.tolist() == [1]
    assert verified.tokens[0].tolist() == [best[0], best[1], -1, -1]
