"""N-gram prompt lookup proposes what followed the latest earlier occurrence of the
sequence's longest matching suffix."""

from gpu_worker.speculative.ngram import NgramProposer, lookup
from gpu_worker.speculative.proposer import ProposalRequest


def test_the_longest_suffix_wins_and_its_latest_occurrence() -> None:
    tokens = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 4, 2, 3]
    # Suffix [2, 3] occurs at 1 and 6 (latest: followed by 7, 8, 4); [4, 2, 3] nowhere.
    assert lookup(tokens, 3, 2, 3) == [7, 8, 4]
    tokens = [5, 2, 3, 1, 1, 4, 2, 3, 6, 4, 2, 3]
    # [4, 2, 3] occurs at 5, followed by 6: it beats the later [2, 3] match's 6 too.
    assert lookup(tokens, 2, 2, 3) == [6, 4]


def test_no_match_or_too_short_proposes_nothing() -> None:
    assert lookup([1, 2, 3, 4], 3, 2, 4) == []
    assert lookup([7], 3, 1, 4) == []


def test_a_match_reaching_the_end_repeats_its_loop() -> None:
    assert lookup([1, 1, 1], 5, 1, 1) == [1, 1, 1, 1, 1]
    # [7, 8] last occurred at 3, followed by 9, 7, 8 up to the end: a loop of period 3.
    assert lookup([5, 7, 8, 9, 7, 8, 9, 7, 8], 7, 2, 2) == [9, 7, 8, 9, 7, 8, 9]


def test_the_proposer_respects_each_requests_lookahead() -> None:
    from gpu_worker.sampler import SequenceSampling

    sampling = SequenceSampling(temperature=0.0, top_k=0, top_p=1.0, seed=0, index=0)
    proposer = NgramProposer(min_n=1, max_n=2)
    tokens = [1, 2, 3, 4, 5, 1, 2]
    proposals = proposer.propose(
        [ProposalRequest(1, tokens, 2, sampling), ProposalRequest(2, tokens, 4, sampling)]
    )
    assert proposals.tokens == [[3, 4], [3, 4, 5, 1]]
    assert proposals.probs is None
