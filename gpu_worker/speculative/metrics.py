"""Speculative decoding's counters, with vLLM's meanings: drafts (sequences that proposed
at least one token in a step), draft tokens (tokens proposed), accepted tokens, and
accepted tokens per position (position i counts the drafts whose i-th proposal was
accepted). The acceptance rate is accepted / draft tokens; at position i it is
accepted_per_pos[i] / drafts. The same counts of each step go on its span, as attributes."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.util.types import AttributeValue
from pagedserve.v1 import worker_pb2
from prometheus_client import CollectorRegistry, Counter

from services.common.metrics import PREFIX


class SpeculationMetrics:
    def __init__(self, registry: CollectorRegistry, rank: int = 0) -> None:
        self._rank = str(rank)

        def rank_counter(name: str, documentation: str) -> Counter:
            return Counter(PREFIX + name, documentation, ["rank"], registry=registry).labels(self._rank)

        self._drafts = rank_counter(
            "spec_decode_num_drafts", "Sequences that proposed at least one token, once per step."
        )
        self._draft_tokens = rank_counter("spec_decode_num_draft_tokens", "Tokens proposed.")
        self._accepted_tokens = rank_counter(
            "spec_decode_num_accepted_tokens", "Proposed tokens accepted by verification."
        )
        self._accepted_per_position = Counter(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Drafts whose proposal at this position (0 first) was accepted.",
            ["position", "rank"],
            registry=registry,
        )

    def record(self, outcomes: Sequence[worker_pb2.SpeculationOutcome]) -> dict[str, AttributeValue]:
        """Counts one step's outcomes; returns them as its span's attributes."""
        drafts = [o for o in outcomes if o.num_proposed]
        proposed = sum(o.num_proposed for o in drafts)
        accepted = sum(o.num_accepted for o in drafts)
        per_position = [0] * max((o.num_proposed for o in drafts), default=0)
        for outcome in drafts:
            for position in range(outcome.num_accepted):
                per_position[position] += 1
        self._drafts.inc(len(drafts))
        self._draft_tokens.inc(proposed)
        self._accepted_tokens.inc(accepted)
        for position, count in enumerate(per_position):
            self._accepted_per_position.labels(str(position), self._rank).inc(count)
        return {
            "pagedserve.spec_decode.num_speculating": len(outcomes),
            "pagedserve.spec_decode.num_drafts": len(drafts),
            "pagedserve.spec_decode.num_draft_tokens": proposed,
            "pagedserve.spec_decode.num_accepted_tokens": accepted,
            "pagedserve.spec_decode.num_accepted_tokens_per_pos": per_position,
        }
