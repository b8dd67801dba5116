"""Speculative decoding settings of a worker, which `pagedserve worker` and `serve` share.

The worker owns how tokens are proposed (n-gram prompt lookup or a draft model) and how
many at most; it reports that number in its WorkerInfo (num_speculative_tokens) and the
scheduler adopts it, so that the scheduler never hands out more lookahead slots than
the worker proposes. When to speculate is the scheduler's (SchedulerConfig). Nothing here
imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# --speculative-method values.
SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    # "ngram": propose the tokens that followed the sequence's last n-gram where it last
    # occurred earlier in the sequence (prompt lookup); "draft": a small model with the
    # target's vocabulary proposes them. None: no speculation.
    method: str | None = None
    # Tokens proposed per sequence and step at most (K): a speculating step computes K + 1
    # tokens per sequence and yields between 1 and K + 1 of them.
    num_speculative_tokens: int = 4
    # N-gram lookup: the longest suffix of the sequence looked up first, down to the
    # shortest; a longer match predicts better, a shorter one matches more often.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # The draft model's directory (method "draft"): same tokenizer and vocabulary size.
    draft_model_path: Path | None = None

    def __post_init__(self) -> None:
        if self.draft_model_path is not None:
            object.__setattr__(self, "draft_model_path", Path(self.draft_model_path))
            if self.method is None:
                object.__setattr__(self, "method", "draft")
        if self.method is None:
            return
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_method {self.method!r} is not supported; choose one of "
                f"{', '.join(SPECULATIVE_METHODS)}"
            )
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if self.method == "ngram" and not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
            )
        if self.method == "draft" and self.draft_model_path is None:
            raise ValueError(
                "speculative_method 'draft' needs speculative_model (the draft model's directory)"
            )

    @property
    def enabled(self) -> bool:
        return self.method is not None

    @property
    def max_lookahead(self) -> int:
        """Lookahead slots a sequence may take per step: what the worker reports."""
        return self.num_speculative_tokens if self.enabled else 0
