"""Structured output on the worker: one llguidance matcher per constrained sequence, and
the token mask it allows applied to the logits before sampling.

The matchers live here, beside the sampler, because the worker is where each token is
drawn and where a sequence's tokens are known first: the scheduler would learn them a
step later (one step more with overlapped steps), and carrying parser state through it
would mean shipping masks or matcher snapshots over the wire every step. The request's
constraint comes once, with the sequence (NewSequence.sampling); a sequence that comes
back after preemption, or moves to another engine, brings its generated tokens, and its
new matcher consumes them before its next draw. So the matcher's state is a pure
function of the sequence's tokens, like everything else the worker keeps.

Steps overlap: when step N+1 is launched, a sequence's token of step N may still be on
the device. Its matcher only needs it for N+1's mask, which is computed after N+1's
forward has been queued: waiting for step N's draws then overlaps the host's mask work
with N+1's forward on the device.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import llguidance
import torch
from llguidance.numpy import fill_next_token_bitmask_par
from pagedserve.v1 import common_pb2

from gpu_worker.sampler import SampledLogprobs, SampledTokens
from services.common.structured_output import constraint_kind, grammar_of

log = logging.getLogger(__name__)

_BITS_PER_WORD = 32


class _LaunchedDraws(Protocol):
    """A launched step: its draws reach host memory (host_tokens) once wait() returns."""

    host_tokens: torch.Tensor | None

    def wait(self) -> None: ...


@dataclass
class _ConstrainedSequence:
    matcher: llguidance.LLMatcher
    # The sequence's draws the matcher has not consumed yet, oldest first: (the step that
    # drew it, its index among the step's draws).
    pending: deque[tuple[_LaunchedDraws, int]] = field(default_factory=deque)


class GrammarMasks:
    """The matchers of the live constrained sequences, keyed by seq_id."""

    def __init__(self, tokenizer_path: Path, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer_path = tokenizer_path
        self._vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        # Built on the first constrained sequence: reading the vocabulary takes about half
        # a second, which a worker that never sees one should not pay at start-up.
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._sequences: dict[int, _ConstrainedSequence] = {}

    def __bool__(self) -> bool:
        return bool(self._sequences)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._sequences

    def add(self, seq_id: int, sampling: common_pb2.SamplingParams, generated: Sequence[int]) -> None:
        """Starts a matcher for the sequence if its sampling has a constraint, and feeds it
        the tokens the sequence already generated (after a preemption or a move)."""
        self._sequences.pop(seq_id, None)
        if not sampling.HasField("structured_output") or constraint_kind(sampling.structured_output) is None:
            return
        try:
            grammar = grammar_of(sampling.structured_output)
        except (ValueError, RecursionError) as error:
            # The tokenizer service refuses such constraints: a caller that skipped it
            # gets free text rather than a failed step for every sequence of the batch.
            log.warning("sequence %d: constraint cannot be read, left free: %s", seq_id, error)
            return
        matcher = llguidance.LLMatcher(self._vocabulary(), grammar, log_level=0)
        if matcher.is_error():
            log.warning("sequence %d: constraint does not compile: %s", seq_id, matcher.get_error())
        elif generated and not matcher.consume_tokens(list(generated)):
            log.warning("sequence %d: its tokens leave its constraint: %s", seq_id, matcher.get_error())
        self._sequences[seq_id] = _ConstrainedSequence(matcher)

    def remove(self, seq_id: int) -> None:
        self._sequences.pop(seq_id, None)

    def clear(self) -> None:
        self._sequences.clear()

    def note_draw(self, seq_id: int, step: _LaunchedDraws, index: int) -> None:
        """The sequence continues with draw `index` of `step`: its matcher consumes it
        before the sequence's next mask."""
        constrained = self._sequences.get(seq_id)
        if constrained is not None:
            constrained.pending.append((step, index))

    def masked(self, logits: torch.Tensor, seq_ids: Sequence[int]) -> torch.Tensor:
        """The logits ([len(seq_ids), vocab]) with every token that a constrained row's
        grammar does not allow next at -inf; the logits themselves when no row is
        constrained. Other rows are left as they are.

        This runs on the step's critical path (the device samples only once the mask is
        there), so the host work is kept to one wait per earlier step, one parallel fill
        straight into pinned memory and a handful of kernels over the whole batch."""
        rows = [
            (row, constrained)
            for row, seq_id in enumerate(seq_ids)
            if (constrained := self._sequences.get(seq_id)) is not None
        ]
        if not rows:
            return logits
        draws: dict[int, list[int]] = {}
        for row, constrained in rows:
            self._catch_up(constrained, seq_ids[row], draws)
        bitmask = torch.empty(
            (len(seq_ids), -(-self._vocab_size // _BITS_PER_WORD)),
            dtype=torch.int32,
            pin_memory=logits.device.type == "cuda",
        )
        # Filled through numpy: torch would start its CPU thread pool for it, whose spinning
        # threads then compete with the grammar engine's. Unconstrained rows keep every bit
        # set: they allow every token.
        words = bitmask.numpy()
        words.fill(-1)
        fill_next_token_bitmask_par(
            self._parallel(), [(constrained.matcher, row) for row, constrained in rows], words
        )
        allowed = allowed_tokens(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
        return logits.masked_fill(~allowed, float("-inf"))

    def _catch_up(self, constrained: _ConstrainedSequence, seq_id: int, draws: dict[int, list[int]]) -> None:
        """Feeds the matcher the sequence's draws it has not consumed; `draws` keeps each
        step's draws once read, so that a step is waited for and copied once, not once
        per sequence."""
        matcher = constrained.matcher
        while constrained.pending:
            step, index = constrained.pending.popleft()
            step_draws = draws.get(id(step))
            if step_draws is None:
                step.wait()
                assert step.host_tokens is not None
                step_draws = draws[id(step)] = step.host_tokens.tolist()
            token = step_draws[index]
            if not matcher.consume_token(token) and not matcher.is_stopped():
                log.warning(
                    "sequence %d: token %d leaves its constraint: %s", seq_id, token, matcher.get_error()
                )

    def _vocabulary(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            text = self._tokenizer_path.read_text(encoding="utf-8")
            # A model's EOS may lie past the tokenizer's own ids (padded embeddings, or a
            # model served with another vocabulary's tokenizer); the grammar ends on the
            # tokenizer's EOS then, rather than refusing every constrained sequence.
            size = llguidance.LLTokenizer(text).vocab_size
            known = [token for token in self._eos_token_ids if token < size]
            self._tokenizer = llguidance.LLTokenizer(text, n_vocab=self._vocab_size, eos_token=known or None)
        return self._tokenizer

    def _parallel(self) -> llguidance.LLExecutor:
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        return self._executor


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab_size] bool from a [rows, words] int32 bitmask (bit b of word w is
    token 32 w + b); tokens past the bitmask's end are not allowed."""
    shifts = torch.arange(_BITS_PER_WORD, dtype=torch.int32, device=bitmask.device)
    # An arithmetic shift still leaves bit b in the lowest place.
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]), value=False)


def unmasked_logprobs(logits: torch.Tensor, sampled: SampledTokens) -> SampledTokens:
    """The draws with their logprobs (if asked for) taken from the model's own logits, as
    for unconstrained rows, rather than from the masked ones they were drawn from."""
    if sampled.logprobs is None:
        return sampled
    if len(sampled.counts) != sampled.tokens.shape[0]:
        # Rows that drew n tokens were drawn from n copies of their logits.
        counts = torch.tensor(sampled.counts, dtype=torch.int64).to(logits.device)
        logits = logits.repeat_interleave(counts, dim=0, output_size=sampled.tokens.shape[0])
    top_k = sampled.logprobs.top_ids.shape[1]
    return dataclasses.replace(sampled, logprobs=SampledLogprobs.of(logits, sampled.tokens, top_k))
