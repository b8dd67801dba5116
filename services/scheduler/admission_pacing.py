"""When a full batch lets newcomers in: several at once, not one or two a step.

Under load the batch's seats are the limit: each step a few sequences finish and as many
waiting ones could take their seats. Let in at once, nearly every step carries a few short
prompts, and a step with prompt tokens cannot replay a captured decode graph: on an H200,
at 250 sequences, such a step took 20-37 ms against 2-3 ms for a decode step
(benchmarks/RESULTS.md, short requests). So a step that would only decode lets waiting
sequences in, while more wait than the free seats could take, only once those seats would
bring `admission_batch_tokens` tokens to compute, or once it has held them back for
`admission_max_delay_steps` steps. With seats to spare nobody is held back: there the
batch has room, and a newcomer's first token should not wait for company.
"""

from collections.abc import Sequence as Seq
from itertools import chain

from services.scheduler.config import SchedulerConfig
from services.scheduler.queues import SequenceQueues


class AdmissionPacing:
    def __init__(self, config: SchedulerConfig, max_num_seqs: int, queues: SequenceQueues) -> None:
        self.batch_tokens = config.admission_batch_tokens
        self.max_delay_steps = config.admission_max_delay_steps
        self.max_num_seqs = max_num_seqs
        self.queues = queues
        # The step that first held newcomers back since some were last let in.
        self._held_since_step: int | None = None

    def lets_in(self, step_id: int, new_tokens: Seq[int]) -> bool:
        """Whether the step being planned, with these new tokens per scheduled sequence so
        far, lets swapped and waiting sequences in."""
        queues = self.queues
        if not (queues.swapped or queues.waiting):
            return True
        decode_only = bool(new_tokens) and all(n == 1 for n in new_tokens)
        if self.batch_tokens and decode_only and self._seats_limit_a_small_batch():
            if self._held_since_step is None:
                self._held_since_step = step_id
            if step_id - self._held_since_step < self.max_delay_steps:
                return False
        self._held_since_step = None
        return True

    def _seats_limit_a_small_batch(self) -> bool:
        """Whether some of the waiting sequences would take the free seats, more wait than
        those seats take, and those that would take them bring fewer than batch_tokens
        tokens to compute. The delay counts from the first step where one could join."""
        seats = self.max_num_seqs - sum(s.num_seats for s in self.queues.running)
        tokens = 0
        for sequence in chain(self.queues.swapped, self.queues.waiting):
            if sequence.num_seats > seats:
                return tokens > 0
            seats -= sequence.num_seats
            tokens += sequence.num_tokens_to_compute
            if tokens >= self.batch_tokens:
                return False
        return False
