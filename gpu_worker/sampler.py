"""Turns one step's logits into tokens.

Each row's logit_bias is added to its logits first. Rows with temperature 0 then take the
exact argmax. The other rows are scaled by temperature, filtered by min-p, then top-k, then
top-p (the order vLLM applies them in), and sampled with the exponential race (argmax of
p / E with E ~ Exp(1)), which draws exactly from p. Each stage is one batched pass over the
rows that use it, skipped when none does.

The noise E of a row at vocabulary entry v is a pure function of (the request's seed, the
position of the token being sampled, the completion index, v): a counter-based hash computed
with batched integer tensor ops, no generator state. So a sequence's tokens do not depend on
what shares its batch, how its prompt was chunked, or whether it was preempted and resumed
(by recompute or swap): the same seed gives the same tokens. Completion 0 of an n-completion
request draws what an n = 1 request with the same seed draws.

Sampling never waits for the device: the per-row parameters reach it through pinned
memory, and the tokens stay there (SampledTokens) until the caller reads them, so that the
next step can be launched first.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import torch
from pagedserve.v1 import common_pb2

if TYPE_CHECKING:
    from gpu_worker.penalties import PenaltyTable

# Temperatures at or below this are greedy: dividing by them would overflow anyway.
_GREEDY_TEMPERATURE = 1e-5

_UINT64 = 1 << 64
# Odd 64-bit constants of the SplitMix64 generator (Steele, Lea, Flood 2014): the golden
# ratio increment and the two multipliers of its finalizer.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB
# Uniforms take 24 bits: exactly representable in float32.
_UNIFORM_BITS = 24


def _as_int64(value: int) -> int:
    """The two's-complement int64 with the same 64 bits as the uint64 `value`."""
    value %= _UINT64
    return value - _UINT64 if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors read as uint64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors: multiplication wraps modulo 2**64."""
    x = (x ^ _shift_right(x, 30)) * _as_int64(_MIX_1)
    x = (x ^ _shift_right(x, 27)) * _as_int64(_MIX_2)
    return x ^ _shift_right(x, 31)


def exponential_noise(
    seeds: torch.Tensor, positions: torch.Tensor, indices: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """[rows, vocab_size] float32 Exp(1) draws; row r is a function of (seeds[r],
    positions[r], indices[r]) and the vocabulary index only. Inputs: [rows] int64."""
    golden = _as_int64(_GOLDEN)
    key = _mix64(seeds + golden)
    key = _mix64(key + positions * golden)
    key = _mix64(key + indices * golden)
    vocab = torch.arange(1, vocab_size + 1, device=seeds.device, dtype=torch.int64) * golden
    bits = _shift_right(_mix64(key[:, None] + vocab[None, :]), 64 - _UNIFORM_BITS)
    # (bits + 0.5) / 2**24 lies strictly inside (0, 1): the log is finite and E > 0.
    uniform = (bits.float() + 0.5) * (1.0 / (1 << _UNIFORM_BITS))
    return -torch.log(uniform)


@dataclass(frozen=True)
class SequenceSampling:
    """How one sequence samples, read once from its SamplingParams."""

    temperature: float
    top_k: int
    top_p: float
    # As int64 bits (the request's uint64 seed).
    seed: int
    # Which completion of its request the sequence is.
    index: int
    # Tokens its next sample draws: n for the first sample of an n-completion request
    # (completion indices 0..n-1 from the same logits), then 1.
    num_samples: int = 1
    min_p: float = 0.0
    # (token id, value added to its logit), ids sorted.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Top tokens whose log-probabilities come back with each draw; None: no logprobs.
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Until the sequence has this many tokens (prompt and min_tokens), its stop tokens are
    # masked; 0: never.
    min_length: int = 0
    stop_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_proto(
        cls, sampling: common_pb2.SamplingParams, index: int, fallback_seed: int, num_prompt_tokens: int = 0
    ) -> SequenceSampling:
        return cls(
            temperature=sampling.temperature if sampling.HasField("temperature") else 1.0,
            top_k=sampling.top_k,
            top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
            seed=_as_int64(sampling.seed if sampling.HasField("seed") else fallback_seed),
            index=index,
            num_samples=sampling.n if sampling.HasField("n") and sampling.n > 1 else 1,
            min_p=sampling.min_p,
            logit_bias=tuple(sorted(sampling.logit_bias.items())),
            logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty
            if sampling.HasField("repetition_penalty")
            else 1.0,
            min_length=num_prompt_tokens + sampling.min_tokens if sampling.min_tokens > 0 else 0,
            stop_token_ids=tuple(sampling.stop_token_ids),
        )

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= _GREEDY_TEMPERATURE

    def after_sample(self) -> SequenceSampling:
        return self if self.num_samples == 1 else dataclasses.replace(self, num_samples=1)


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the work queued there: a
    pageable copy would synchronize the stream first."""
    tensor = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return tensor.to(device, non_blocking=True)


@dataclass(frozen=True)
class SampledLogprobs:
    """Log-softmax of the raw logits at each draw: of the drawn token [draws], and the
    top_k most likely tokens' ids and values [draws, top_k]."""

    sampled: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, tokens: torch.Tensor, top_k: int) -> SampledLogprobs:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top_values, top_ids = logprobs.topk(top_k, dim=-1)
        return cls(logprobs.gather(1, tokens[:, None]).squeeze(1), top_ids, top_values)


@dataclass(frozen=True)
class SampledTokens:
    """One step's draws, on the device: each row's num_samples tokens, rows in order."""

    tokens: torch.Tensor
    counts: list[int]
    # Where each row's draws start in `tokens`: the token its sequence continues with.
    first_indices: list[int]
    # Set when a row asked for logprobs: for every draw, with the most top tokens asked.
    logprobs: SampledLogprobs | None = None

    @classmethod
    def to_receive(cls, rows: Sequence[SequenceSampling], device: torch.device) -> SampledTokens:
        """An empty buffer laid out as the draws of `rows` will be, for a rank that does not
        sample but receives another's draws (a pipeline stage before the last)."""
        counts = [row.num_samples for row in rows]
        tokens = torch.empty(sum(counts), dtype=torch.int64, device=device)
        return cls(tokens, counts, [0, *accumulate(counts[:-1])])

    def grouped(self, tokens: list[int]) -> list[list[int]]:
        """`tokens` (read from the device) split into each row's draws."""
        return [tokens[start : start + count] for start, count in zip(self.first_indices, self.counts)]


class Sampler:
    def __init__(
        self, device: torch.device, seed: int | None = None, eos_token_ids: Sequence[int] = ()
    ) -> None:
        self.device = device
        # Masked, with each row's stop_token_ids, while a row is shorter than its min_length.
        self.eos_token_ids = tuple(eos_token_ids)
        # Keys the seeds of sequences that come without one (the scheduler always sends
        # one; this covers other callers).
        self._fallback_base = random.getrandbits(64) if seed is None else seed

    def fallback_seed(self, seq_id: int) -> int:
        return (self._fallback_base * _GOLDEN + seq_id) % _UINT64

    def sample(
        self, logits: torch.Tensor, rows: Sequence[SequenceSampling], positions: Sequence[int]
    ) -> list[list[int]]:
        """logits: [len(rows), vocab]; positions: where each row's next token goes. Returns
        each row's tokens: num_samples of them, in completion index order."""
        sampled = self.sample_on_device(logits, rows, positions)
        return sampled.grouped(sampled.tokens.tolist())

    def sample_on_device(
        self,
        logits: torch.Tensor,
        rows: Sequence[SequenceSampling],
        positions: Sequence[int],
        penalties: PenaltyTable | None = None,
        penalty_rows: Sequence[int] = (),
    ) -> SampledTokens:
        """As `sample`, leaving the tokens on the device. penalties: the sequences'
        histories, penalty_rows each row's in it (penalties.rows); each row's first draw
        is counted into it."""
        sampled = self._draw(logits, rows, positions, penalties, penalty_rows)
        if penalties is not None:
            firsts = sampled.tokens
            if len(sampled.first_indices) != firsts.shape[0]:
                firsts = firsts[to_device(sampled.first_indices, torch.int64, logits.device)]
            penalties.count(penalty_rows, firsts)
        return sampled

    def _draw(
        self,
        logits: torch.Tensor,
        rows: Sequence[SequenceSampling],
        positions: Sequence[int],
        penalties: PenaltyTable | None,
        penalty_rows: Sequence[int],
    ) -> SampledTokens:
        assert logits.shape[0] == len(rows) == len(positions)
        repeats = [row.num_samples for row in rows]
        num_draws = sum(repeats)
        top_k = max((row.logprobs for row in rows if row.logprobs is not None), default=None)
        if num_draws == len(rows):
            # Every row draws one token (the usual case): nothing to expand, and row r's
            # draw is tokens[r].
            penalized = self._mask_stop_tokens(logits, rows, positions)
            if penalties is not None:
                penalized = penalties.apply(penalized, rows, penalty_rows)
            tokens = self._sample_rows(penalized, rows, positions, [row.index for row in rows])
            logprobs = None if top_k is None else SampledLogprobs.of(logits, tokens, top_k)
            return SampledTokens(tokens, repeats, list(range(num_draws)), logprobs)
        # A row that draws n tokens becomes n rows of the same logits.
        expanded = [row for row in rows for _ in range(row.num_samples)]
        logits = logits.repeat_interleave(
            to_device(repeats, torch.int64, logits.device), dim=0, output_size=num_draws
        )
        positions = [p for p, k in zip(positions, repeats) for _ in range(k)]
        indices = [
            i for row in rows for i in (range(row.num_samples) if row.num_samples > 1 else [row.index])
        ]
        first_indices = [0, *accumulate(repeats[:-1])]
        penalized = self._mask_stop_tokens(logits, expanded, positions)
        if penalties is not None:
            expanded_rows = [r for r, k in zip(penalty_rows, repeats) for _ in range(k)]
            penalized = penalties.apply(penalized, expanded, expanded_rows)
        tokens = self._sample_rows(penalized, expanded, positions, indices)
        logprobs = None if top_k is None else SampledLogprobs.of(logits, tokens, top_k)
        return SampledTokens(tokens, repeats, first_indices, logprobs)

    def _sample_rows(
        self,
        logits: torch.Tensor,
        rows: Sequence[SequenceSampling],
        positions: Sequence[int],
        indices: Sequence[int],
    ) -> torch.Tensor:
        logits = _add_logit_bias(logits, rows)
        # The argmax of the logits as they come (bf16 on GPU) is the argmax of their float32
        # values, without writing a float32 copy of every row's vocabulary first.
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, row in enumerate(rows) if not row.is_greedy]
        if not random_rows:
            return tokens

        def column(values: Sequence, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, logits.device)

        picked = [rows[i] for i in random_rows]
        row_index = column(random_rows, torch.int64)
        scaled = logits[row_index].float() / column([r.temperature for r in picked], torch.float32).unsqueeze(
            1
        )
        scaled = _filter_min_p(scaled, picked)
        scaled = self._filter_top_k_top_p(scaled, picked)
        probs = torch.softmax(scaled, dim=-1)
        noise = exponential_noise(
            column([r.seed for r in picked], torch.int64),
            column([positions[i] for i in random_rows], torch.int64),
            column([indices[i] for i in random_rows], torch.int64),
            probs.shape[-1],
        )
        tokens[row_index] = (probs / noise).argmax(dim=-1)
        return tokens

    def _mask_stop_tokens(
        self, logits: torch.Tensor, rows: Sequence[SequenceSampling], positions: Sequence[int]
    ) -> torch.Tensor:
        """The logits with the stop tokens of rows still short of min_length at -inf, in
        one scatter; the logits themselves when no row is."""
        banned = [
            (r, token)
            for r, (row, position) in enumerate(zip(rows, positions))
            if position < row.min_length
            for token in (*self.eos_token_ids, *row.stop_token_ids)
        ]
        if not banned:
            return logits
        masked = logits.to(torch.float32, copy=True)
        index = (
            to_device([r for r, _ in banned], torch.int64, logits.device),
            to_device([t for _, t in banned], torch.int64, logits.device),
        )
        masked.index_put_(index, torch.tensor(float("-inf"), device=logits.device))
        return masked

    @staticmethod
    def _filter_top_k_top_p(logits: torch.Tensor, rows: Sequence[SequenceSampling]) -> torch.Tensor:
        vocab_size = logits.shape[-1]
        top_k = [r.top_k if 0 < r.top_k < vocab_size else vocab_size for r in rows]
        top_p = [r.top_p for r in rows]
        if all(k == vocab_size for k in top_k) and all(p >= 1.0 for p in top_p):
            return logits  # skip the vocabulary sort when no row filters

        sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab_size, device=logits.device)
        top_k_tensor = to_device(top_k, torch.int64, logits.device)
        sorted_logits.masked_fill_(ranks[None, :] >= top_k_tensor[:, None], float("-inf"))
        # Top-p applies to what top-k kept. Keep a token while the mass before it is below
        # top_p: the smallest prefix whose probability reaches top_p, never empty.
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        top_p_tensor = to_device(top_p, logits.dtype, logits.device)
        outside_nucleus = mass_before >= top_p_tensor[:, None]
        outside_nucleus[:, 0] = False
        sorted_logits.masked_fill_(outside_nucleus, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, sorted_index, sorted_logits)


def _add_logit_bias(logits: torch.Tensor, rows: Sequence[SequenceSampling]) -> torch.Tensor:
    """The logits with each row's bias added, in float32, in one scatter over all rows;
    the logits themselves when no row has a bias."""
    if not any(row.logit_bias for row in rows):
        return logits
    row_ids = [r for r, row in enumerate(rows) for _ in row.logit_bias]
    token_ids = [token for row in rows for token, _ in row.logit_bias]
    values = [value for row in rows for _, value in row.logit_bias]
    biased = logits.to(torch.float32, copy=True)
    indices = (
        to_device(row_ids, torch.int64, logits.device),
        to_device(token_ids, torch.int64, logits.device),
    )
    biased.index_put_(indices, to_device(values, torch.float32, logits.device), accumulate=True)
    return biased


def _filter_min_p(logits: torch.Tensor, rows: Sequence[SequenceSampling]) -> torch.Tensor:
    """Drops, per row, the tokens less likely than min_p times its most likely token."""
    min_p = [row.min_p for row in rows]
    if not any(p > 0 for p in min_p):
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * to_device(min_p, torch.float32, logits.device)[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))
