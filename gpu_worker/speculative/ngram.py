"""N-gram prompt lookup: the sequence's last n tokens are looked up earlier in the
sequence (prompt and output), and the tokens that followed their latest earlier
occurrence are proposed; where those run into the end of the sequence (a span repeating
itself), the repetition goes on. Longer suffixes are tried first (prompt_lookup_max down to
prompt_lookup_min). Copy-heavy text (summaries, edits, code) repeats spans of its prompt,
and costs nothing to propose for: no model runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gpu_worker.input_batch import StepInputs
from gpu_worker.speculative.proposer import ProposalRequest, Proposals


def lookup(token_ids: Sequence[int], max_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to max_tokens tokens that followed the latest earlier occurrence of the longest
    suffix of token_ids (of min_n..max_n tokens) found earlier in it, continued
    periodically where they reach the end."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        # Windows starting at 0 .. length - n - 1: each is followed by at least one token.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)
        matches = np.flatnonzero((windows == suffix).all(axis=1))
        if len(matches):
            start = int(matches[-1]) + n
            proposal = tokens[start : start + max_tokens].tolist()
            # The copy overlaps its own source, as in LZ77: a loop of period
            # length - start predicts its next turn.
            period = length - start
            while len(proposal) < max_tokens:
                proposal.append(proposal[len(proposal) - period])
            return proposal
    return []


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, requests: Sequence[ProposalRequest]) -> Proposals:
        return Proposals([lookup(r.token_ids, r.num_lookahead, self.min_n, self.max_n) for r in requests])

    def after_forward(self, batch: StepInputs) -> None:
        pass

    def apply_block_ops(self, step: object) -> None:
        pass
