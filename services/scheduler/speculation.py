"""Which sequences speculate in a step, and with how many lookahead slots.

The worker proposes tokens (n-gram lookup or a draft model) for a sequence given
lookahead slots, verifies them in the step's forward, and returns between 1 and
1 + lookahead tokens for it. How many is unknown until the step returns, so a speculating
sequence is never planned ahead of its result: with overlapped scheduling it skips the
steps planned while its speculating step is in flight, and a sequence about to speculate
waits for the result of the plain step it is in. Sequences that do not speculate keep
running ahead as before.

When speculation pays (the rule): only in steps planned while at most
speculative_max_batch_size sequences run or wait to run (a large batch is compute-bound,
and verifying rejected proposals costs what speculation would save; a queue means the
batch is about to grow), and only for sequences whose
recent speculating steps accepted at least speculative_min_accepted_tokens proposed tokens
on average (half weight on the latest step); one that falls below decodes plainly, with
overlap, for speculative_backoff_steps steps, then tries again. A sequence starts out
trusted (its mean starts at the most it could accept).

A sequence speculates only in pure decode (one token to compute, every token known), not
awaiting its n-fork, with no penalties, logprobs or structured output, and with room left under max_tokens
and the model's length for what it may gain.
"""

from collections.abc import Callable

from pagedserve.v1 import worker_pb2

from services.common.errors import UnavailableError
from services.scheduler.block_manager import BlockManager, SlotAllocation
from services.scheduler.config import SchedulerConfig
from services.scheduler.outputs import RequestOutput, SchedulerOutput
from services.scheduler.prefix_cache import PrefixCache
from services.scheduler.request import Sequence, SequenceStatus


class SpeculationPolicy:
    def __init__(
        self,
        config: SchedulerConfig,
        max_lookahead: int,
        block_manager: BlockManager,
        prefix_cache: PrefixCache,
    ) -> None:
        """max_lookahead: the most tokens the worker proposes per sequence and step."""
        self.block_manager = block_manager
        self.prefix_cache = prefix_cache
        self.max_lookahead = max_lookahead
        self.max_batch_size = config.speculative_max_batch_size
        self.min_accepted_tokens = config.speculative_min_accepted_tokens
        self.backoff_steps = config.speculative_backoff_steps

    def in_step(self, num_unfinished: int) -> bool:
        """Whether sequences may speculate in a step planned while num_unfinished
        sequences run, wait or are swapped out."""
        return self.max_lookahead > 0 and num_unfinished <= self.max_batch_size

    def lookahead(self, sequence: Sequence, max_model_len: int) -> int | None:
        """Lookahead slots for a running sequence this step (0: decode plainly), or None
        when it should wait for its sample in flight and speculate after it."""
        request = sequence.request
        if not request.can_speculate or sequence.awaits_fork:
            return 0
        if sequence.num_planned_tokens - sequence.num_computed_tokens != 1:
            return 0  # a prompt still being computed
        if sequence.plain_steps_left:
            sequence.plain_steps_left -= 1
            if not sequence.plain_steps_left:
                # Another chance, which one poor step ends again.
                sequence.accepted_mean = self.min_accepted_tokens
            return 0
        num_planned = sequence.num_planned_tokens
        # Every token gained stays within max_tokens and the model's length.
        room = min(self.max_lookahead, max_model_len - num_planned - 1)
        if request.max_tokens is not None:
            room = min(room, request.max_tokens - (num_planned - request.num_prompt_tokens) - 1)
        if room <= 0:
            return 0
        if sequence.num_pending_samples:
            return None
        return room

    def plan(
        self, sequence: Sequence, num_new_tokens: int, budget: int, max_model_len: int, in_step: bool
    ) -> tuple[SlotAllocation | None, int] | None:
        """A running sequence's lookahead this step, and its slots for the new tokens and
        the lookahead, taken from free blocks only (never by preempting another): (None,
        0) when it does not speculate, None when it waits for its sample in flight."""
        lookahead = self.lookahead(sequence, max_model_len) if in_step else 0
        if lookahead is None:
            return None
        lookahead = min(lookahead, budget - num_new_tokens)
        if lookahead <= 0:
            return None, 0
        allocation = self.block_manager.allocate_slots(sequence, num_new_tokens + lookahead)
        return allocation, lookahead if allocation is not None else 0

    def apply(
        self, sequence: Sequence, tokens: list[int], stops: Callable[[Sequence], bool]
    ) -> list[RequestOutput]:
        """A speculating step's tokens for the sequence: its accepted proposals and the
        token after them, each checked by `stops` (which finishes the sequence at a stop).
        The accepted proposals' KV is computed; the lookahead blocks past its tokens go
        back (the worker cuts its table the same way). An output unless it ended since."""
        sequence.speculating = False
        if not sequence.num_pending_samples:
            return []
        sequence.num_pending_samples -= 1
        self.record(sequence, len(tokens) - 1)
        if sequence.status is SequenceStatus.RUNNING:
            sequence.num_computed_tokens += len(tokens) - 1
        new_tokens = []
        for token in tokens:
            sequence.token_ids.append(token)
            new_tokens.append(token)
            if stops(sequence):
                break
        if sequence.status is SequenceStatus.RUNNING:
            block_size = self.block_manager.block_size
            self.block_manager.shrink(sequence, -(-sequence.num_tokens // block_size))
            self.prefix_cache.register_computed_blocks(sequence)
        return [RequestOutput.of(sequence, new_tokens)]

    def record(self, sequence: Sequence, num_accepted: int) -> None:
        """A speculating step of the sequence returned with num_accepted proposals kept."""
        mean = sequence.accepted_mean
        mean = float(self.max_lookahead) if mean is None else mean
        sequence.accepted_mean = mean = 0.5 * mean + 0.5 * num_accepted
        if mean < self.min_accepted_tokens:
            sequence.plain_steps_left = self.backoff_steps


def sampled_counts(scheduled: SchedulerOutput, result: worker_pb2.StepResult) -> list[int] | None:
    """How many tokens the result holds for each scheduled entry, when the step has
    speculating sequences (None otherwise: each entry's num_samples); raises
    UnavailableError for a result that does not answer the step."""
    seq_ids = list(result.seq_ids)
    if not scheduled.num_speculating:
        expected = scheduled.sampling_seq_ids
        if len(seq_ids) != len(result.token_ids) or seq_ids != expected:
            raise UnavailableError(
                f"worker answered step {scheduled.step_id} with {len(result.token_ids)} tokens for "
                f"seq_ids {seq_ids}, expected tokens for {expected} in that order"
            )
        return None
    if len(seq_ids) != len(result.token_ids):
        raise UnavailableError(
            f"worker answered step {scheduled.step_id} with {len(result.token_ids)} tokens "
            f"for {len(seq_ids)} seq_ids"
        )
    counts = []
    cursor = 0
    for item in scheduled.scheduled:
        count = 0
        if item.num_lookahead_tokens:
            while cursor + count < len(seq_ids) and seq_ids[cursor + count] == item.seq_id:
                count += 1
            valid = 1 <= count <= 1 + item.num_lookahead_tokens
        else:
            count = item.num_samples
            valid = seq_ids[cursor : cursor + count] == [item.seq_id] * count
        if not valid:
            raise UnavailableError(
                f"worker answered step {scheduled.step_id} with tokens for seq_ids {seq_ids}: "
                f"{count} in a row for seq {item.seq_id} at {cursor} do not fit its entry"
            )
        counts.append(count)
        cursor += count
    if cursor != len(seq_ids):
        raise UnavailableError(
            f"worker answered step {scheduled.step_id} with {len(seq_ids) - cursor} tokens too many"
        )
    return counts
