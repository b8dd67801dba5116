"""How many prompt tokens a step may carry beside sequences that decode.

A step's time grows with its prompt tokens, and every sequence decoding in it waits for
the whole step: a 1,024-token prompt makes its step several times a decode step, and that
step is the inter-token latency's tail (benchmarks/RESULTS.md, online serving). Capping
the prompt tokens of a step that decodes to `max_prompt_tokens_with_decodes` spreads a
prompt over a few steps, each only somewhat longer than a decode step, at the price of a
little time to that prompt's first token.

The cap holds only while the prompt tokens queued to start fit within one full step. A
deeper queue (a burst, a benchmark's requests sent all at once) is computed at the full
step size: there the requests already wait in line, and throughput, not the pace of the
running streams, decides how long.

The cap grows by `prompt_tokens_per_decode` for each sequence that decodes in the step: a
decode step's time grows with its sequences, and what keeps a mixed step within about
twice a decode step of few sequences is a fraction of what one of many sequences allows.
"""

from itertools import chain

from services.common.step_limits import StepLimits
from services.scheduler.config import SchedulerConfig
from services.scheduler.queues import SequenceQueues


class PromptBudget:
    def __init__(self, config: SchedulerConfig, limits: StepLimits, queues: SequenceQueues) -> None:
        self.max_prompt_tokens_with_decodes = config.max_prompt_tokens_with_decodes
        self.prompt_tokens_per_decode = config.prompt_tokens_per_decode
        self.max_num_batched_tokens = limits.max_num_batched_tokens
        self.queues = queues

    def for_step(self) -> int:
        """The prompt tokens the step being planned may compute, chunks of running prompts
        and newcomers together."""
        base = self.max_prompt_tokens_with_decodes
        full = self.max_num_batched_tokens
        if base is None or base >= full:
            return full
        num_decodes = self._num_decoding()
        cap = base + self.prompt_tokens_per_decode * num_decodes
        if cap >= full or num_decodes == 0 or self._queued_prompt_tokens_exceed(full):
            return full
        return cap

    def _num_decoding(self) -> int:
        # A running sequence past its prompt has at most its next token to compute (none
        # while its sample is in flight).
        return sum(s.num_tokens_to_compute <= 1 for s in self.queues.running)

    def _queued_prompt_tokens_exceed(self, limit: int) -> bool:
        total = 0
        for sequence in chain(self.queues.swapped, self.queues.waiting):
            total += sequence.num_tokens_to_compute
            if total > limit:
                return True
        return False
