"""What the scheduler tracks: a Request is what a caller submitted; each of its n
completions is a Sequence, the unit that is scheduled, holds blocks and can be preempted."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pagedserve.v1 import common_pb2, worker_pb2

from services.common.block_hash import BlockHash, extend_block_hashes


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # queued, holds no blocks (new, or preempted to recompute)
    RUNNING = enum.auto()  # holds device blocks and advances each step it is scheduled
    SWAPPED = enum.auto()  # its KV waits in CPU blocks of the workers' swap pool
    FINISHED = enum.auto()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    # Always carries a seed, so that every completion's random draws survive preemption.
    sampling: common_pb2.SamplingParams
    # Lower runs first.
    priority: int
    # Order of arrival: first come, first served within a priority.
    arrival_index: int
    # Index order; holds only the first until it samples the first token, then all n.
    sequences: list[Sequence] = field(default_factory=list)
    # Prompt tokens whose KV came from the prefix cache; None until first admitted.
    num_cached_tokens: int | None = None
    # The prompt's last tokens that another engine generated (a migrated request).
    num_resumed_tokens: int = 0
    # With sampling.prompt_logprobs: those received so far, of prompt positions 1, 2, ...
    # in order; None once sent with the request's first output.
    prompt_logprobs: list[common_pb2.TokenLogprobs] | None = field(default_factory=list)

    def __post_init__(self) -> None:
        # Read on every step for every sequence: plain attributes, taken once from the
        # request's own (never changed) prompt and sampling.
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.n = self.sampling.n if self.sampling.HasField("n") else 1
        self.stop_token_ids = frozenset(self.sampling.stop_token_ids)
        self.max_tokens = self.sampling.max_tokens if self.sampling.HasField("max_tokens") else None
        self.ignore_eos = self.sampling.ignore_eos
        self.min_tokens = self.sampling.min_tokens
        # What every sequence but a first one awaiting its fork samples with: one token.
        self.sampling_after_fork = common_pb2.SamplingParams()
        self.sampling_after_fork.CopyFrom(self.sampling)
        self.sampling_after_fork.ClearField("n")
        # Penalties count every token before the one sampled, logprobs come per draw and a
        # grammar masks one position at a time: none is computed for verified proposals,
        # so such requests never speculate.
        sampling = self.sampling
        self.can_speculate = not (
            sampling.HasField("logprobs")
            or sampling.HasField("structured_output")
            or sampling.presence_penalty
            or sampling.frequency_penalty
            or (sampling.HasField("repetition_penalty") and sampling.repetition_penalty != 1.0)
        )

    def receive_prompt_logprobs(self, received: worker_pb2.PromptLogprobs | None) -> None:
        """Keeps the positions not received yet: a sequence preempted in the middle of its
        prompt computes it again from the start."""
        kept = self.prompt_logprobs
        if received is None or kept is None:
            return
        skip = len(kept) + 1 - received.first_position
        if 0 <= skip < len(received.logprobs):
            kept.extend(received.logprobs[skip:])

    def take_prompt_logprobs(self) -> list[common_pb2.TokenLogprobs]:
        """What the request's first output carries: the prompt logprobs, if it asked."""
        kept = self.prompt_logprobs if self.sampling.HasField("prompt_logprobs") else None
        self.prompt_logprobs = None
        return kept or []

    @classmethod
    def new(
        cls,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: common_pb2.SamplingParams,
        priority: int,
        arrival_index: int,
        seed_if_unset: int,
        num_resumed_tokens: int = 0,
    ) -> Request:
        """A request with its first completion, waiting."""
        own_sampling = common_pb2.SamplingParams()
        own_sampling.CopyFrom(sampling)
        if not own_sampling.HasField("seed"):
            own_sampling.seed = seed_if_unset
        request = cls(request_id, tuple(prompt_token_ids), own_sampling, priority, arrival_index)
        request.num_resumed_tokens = num_resumed_tokens
        request.sequences.append(Sequence(request, index=0, token_ids=list(prompt_token_ids)))
        return request

    def end_unforked_completions(self, finish_reason: common_pb2.FinishReason) -> None:
        """Completions 1..n-1 that were never forked end too, each with its own record."""
        for index in range(len(self.sequences), self.n):
            self.sequences.append(
                Sequence(
                    self,
                    index,
                    list(self.prompt_token_ids),
                    status=SequenceStatus.FINISHED,
                    finish_reason=finish_reason,
                )
            )

    @property
    def finished(self) -> bool:
        return len(self.sequences) == self.n and all(
            s.status is SequenceStatus.FINISHED for s in self.sequences
        )


@dataclass(eq=False)
class Sequence:
    request: Request
    # Which of the request's completions this is, in [0, n).
    index: int
    # Prompt followed by every generated token, kept across preemptions.
    token_ids: list[int]
    # Leading tokens whose KV is in block_table's blocks (or, while swapped, in
    # cpu_block_table's).
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    cpu_block_table: list[int] = field(default_factory=list)
    # The worker's handle; a fresh one each time the sequence is (re)introduced to it.
    seq_id: int | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: common_pb2.FinishReason = common_pb2.FINISH_REASON_UNSPECIFIED
    # Leading blocks already offered to the prefix cache.
    num_registered_blocks: int = 0
    # Chained hashes of leading full blocks, computed as needed; the tokens only grow, so
    # they never go stale.
    block_hashes: list[BlockHash] = field(default_factory=list)
    # Tokens that steps sent to the worker will sample for it and whose values are not
    # known yet. A step planned meanwhile may already compute them: the worker feeds in
    # what it sampled.
    num_pending_samples: int = 0
    # The last step that computes anything for it: its blocks stay held until that step's
    # result is back.
    last_step_id: int = 0
    # Speculative decoding (services/scheduler/speculation.py): whether the step in
    # flight that samples for it speculates (how many tokens it gains is unknown until it
    # returns), the recent mean of tokens accepted per speculating step, and the steps it
    # still decodes plainly after that mean fell too low.
    speculating: bool = False
    accepted_mean: float | None = None
    plain_steps_left: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Scheduling order: priority, then arrival, then completion index."""
        return (self.request.priority, self.request.arrival_index, self.index)

    @property
    def num_tokens(self) -> int:
        """Tokens known: the prompt and every sampled token whose result is back."""
        return len(self.token_ids)

    @property
    def num_planned_tokens(self) -> int:
        """Known tokens and those that steps in flight are sampling."""
        return len(self.token_ids) + self.num_pending_samples

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_planned_tokens - self.num_computed_tokens

    def num_tokens_to_schedule(self, max_model_len: int) -> int:
        """What the next step may compute for it: its tokens to compute, or 0 while a
        result in flight decides what comes next.

        Running ahead of a sample is only worth it when the sample may not stop the
        sequence: one that samples its last token by length, or whose sample forks it into
        its request's n completions, waits for that result; so does one whose sample
        speculates, which gains an unknown number of tokens."""
        num_planned_tokens = self.num_planned_tokens
        if self.num_pending_samples:
            if self.awaits_fork or self.speculating:
                return 0
            max_tokens = self.request.max_tokens
            num_planned_output_tokens = num_planned_tokens - self.request.num_prompt_tokens
            if max_tokens is not None and num_planned_output_tokens >= max_tokens:
                return 0
            if num_planned_tokens >= max_model_len:
                return 0
        return num_planned_tokens - self.num_computed_tokens

    @property
    def awaits_fork(self) -> bool:
        """The first completion of an n > 1 request before its first sample, which draws
        the first token of every completion."""
        return self.request.n > 1 and len(self.request.sequences) == 1

    @property
    def worker_sampling(self) -> common_pb2.SamplingParams:
        """The sampling the worker gets with the sequence: n only while it awaits its fork."""
        return self.request.sampling if self.awaits_fork else self.request.sampling_after_fork

    @property
    def num_seats(self) -> int:
        """Seats in the running batch this sequence will take (max_num_seqs)."""
        return self.request.n if self.awaits_fork else 1

    def fork(self, index: int, first_token_id: int) -> Sequence:
        """Completion `index` of this first completion's request, which has computed the
        prompt (and nothing after it; or nothing at all, preempted since) and sampled
        `first_token_id` for it. It holds no blocks yet; the caller shares this sequence's
        with it."""
        assert self.num_tokens == self.request.num_prompt_tokens
        assert self.num_computed_tokens in (0, self.num_tokens)
        return Sequence(
            self.request,
            index,
            token_ids=[*self.token_ids, first_token_id],
            num_computed_tokens=self.num_computed_tokens,
            status=self.status,
            num_registered_blocks=self.num_registered_blocks,
            block_hashes=list(self.block_hashes),
        )

    def hashes_of_full_blocks(self, num_blocks: int, block_size: int) -> list[BlockHash]:
        return extend_block_hashes(self.block_hashes, self.token_ids, block_size, num_blocks)[:num_blocks]

    def stop_reason(self, eos_token_ids: frozenset[int], max_model_len: int) -> common_pb2.FinishReason:
        """Why the sequence must stop after its last token, or FINISH_REASON_UNSPECIFIED."""
        # A stop token wins over a length limit reached by the same token: the model did end.
        last_token = self.token_ids[-1]
        request = self.request
        num_tokens = self.num_tokens
        # The first min_tokens tokens cannot stop the sequence (the worker masks stop tokens
        # while they are sampled; this holds for any worker).
        if num_tokens - request.num_prompt_tokens <= request.min_tokens:
            return self._length_reason(num_tokens, max_model_len)
        if last_token in request.stop_token_ids:
            return common_pb2.FINISH_REASON_STOP
        if not request.ignore_eos and last_token in eos_token_ids:
            return common_pb2.FINISH_REASON_STOP
        return self._length_reason(num_tokens, max_model_len)

    def _length_reason(self, num_tokens: int, max_model_len: int) -> common_pb2.FinishReason:
        request = self.request
        if request.max_tokens is not None and num_tokens - request.num_prompt_tokens >= request.max_tokens:
            return common_pb2.FINISH_REASON_LENGTH
        if num_tokens >= max_model_len:
            return common_pb2.FINISH_REASON_LENGTH
        return common_pb2.FINISH_REASON_UNSPECIFIED
