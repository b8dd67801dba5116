"""Scheduler settings, passed in explicitly; nothing here reads the environment or disk."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.step_limits import StepLimits, StepLimitsError


class PreemptionMode(enum.Enum):
    # Drop the victim's KV and compute it again when it resumes.
    RECOMPUTE = "recompute"
    # Move the victim's KV to the workers' CPU swap pool and back when it resumes; falls
    # back to recompute when the CPU pool is full.
    SWAP = "swap"


@dataclass(frozen=True)
class SchedulerConfig:
    # Most sequences holding KV blocks at once (the batch's seats). A request with n
    # completions takes n seats. None: the worker's; more than the worker's is refused at
    # start-up (step_limits).
    max_num_seqs: int | None = None
    # Most tokens computed in one step, all sequences together. Prompts longer than what is
    # left of it are computed in chunks over several steps. None: the worker's; more than
    # the worker's is refused at start-up.
    max_num_batched_tokens: int | None = None
    # Caps the KV block pool below what the worker holds (tests, small machines).
    # None: use every block the worker holds.
    num_kv_blocks: int | None = None
    # Reuse the KV of full blocks whose tokens (and every token before them) match.
    enable_prefix_caching: bool = True
    preemption_mode: PreemptionMode = PreemptionMode.RECOMPUTE
    # Requests that may wait for seats or KV blocks (those the free ones could not start
    # now; a burst that fits is not counted); past it new ones are refused at once
    # (RESOURCE_EXHAUSTED). None: no limit.
    max_waiting_requests: int | None = None
    # Seeds the seeds drawn for requests that bring none; None: from the OS.
    seed: int | None = None
    # Steps sent to the worker before the oldest one's result is back. 2 (overlapped
    # scheduling) plans and sends step N+1 while the worker runs step N, so that host work
    # and the round trip hide behind the GPU; 3 also overlaps the stages of that host work
    # in the three processes (the worker answering N, the scheduler planning N+2, the
    # worker launching it). A sequence that stops on a sampled stop token wastes up to
    # max_steps_in_flight - 1 tokens computed after it, never streamed. 1 is one step at
    # a time. None: as many as the worker launches at once; steps sent beyond those wait
    # at the worker and start as soon as one finishes.
    max_steps_in_flight: int | None = None
    # Stream messages sent per step to each frontend, the one process that streams them on
    # (first tokens and last messages always go at once); the other completions' tokens
    # wait, merged, for their turn, and a step's unused messages are saved for later ones; a
    # frontend that says it keeps up gets more (services/scheduler/coalescing.py). None: no
    # limit, a message per completion per step.
    max_stream_messages_per_step: int | None = 32
    # Speculative decoding, when the worker proposes tokens (its num_speculative_tokens):
    # no sequence speculates in a step while more than this many run or wait to run (a
    # large batch is compute-bound: verifying proposals costs what it saves); 0: never.
    speculative_max_batch_size: int = 32
    # A sequence whose speculating steps accept fewer proposed tokens than this on
    # average (an exponential mean, half weight on the latest step) decodes plainly for
    # speculative_backoff_steps steps, then tries again.
    speculative_min_accepted_tokens: float = 0.5
    speculative_backoff_steps: int = 16
    # A full batch lets newcomers in several at once (services/scheduler/admission_pacing.py):
    # while more wait than the free seats take, a step that would only decode holds them
    # back until those seats would bring this many tokens to compute, for at most
    # admission_max_delay_steps steps. 0: whoever fits joins at once.
    admission_batch_tokens: int = 4096
    admission_max_delay_steps: int = 8
    # Prompt tokens a step may compute beside sequences that decode, while the prompts
    # queued to start fit within one step (services/scheduler/prompt_budget.py): a long
    # prompt is spread over a few steps instead of stalling every stream for one long
    # step. None: as many as the step's budget leaves. 64 and 2 below kept the p99 of the
    # gaps between a worker's step results under twice their median where no cap did, at
    # no cost to full batches (benchmarks/RESULTS.md, 2026-12-06).
    max_prompt_tokens_with_decodes: int | None = 64
    # With that cap, prompt tokens it grows by per sequence decoding in the step: a step of
    # few decodes is short, so its prompt tokens must be few to keep each stream's gap
    # within about twice a decode step, while a step of many decodes can carry more.
    prompt_tokens_per_decode: int = 2

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "num_kv_blocks",
            "max_steps_in_flight",
            "max_prompt_tokens_with_decodes",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.max_stream_messages_per_step is not None and self.max_stream_messages_per_step < 1:
            raise ValueError(
                f"max_stream_messages_per_step must be at least 1, got {self.max_stream_messages_per_step}"
            )
        for name in (
            "speculative_max_batch_size",
            "speculative_min_accepted_tokens",
            "speculative_backoff_steps",
            "admission_batch_tokens",
            "admission_max_delay_steps",
            "prompt_tokens_per_decode",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        # Accept the plain string of a CLI flag.
        object.__setattr__(self, "preemption_mode", PreemptionMode(self.preemption_mode))

    def step_limits(self, worker: StepLimits | None = None) -> StepLimits:
        """The limits this scheduler runs with: each one set here, the worker's where none
        is. Raises StepLimitsError when this asks for larger steps than the worker is built
        for. Without a worker (tests, benchmarks) the unset ones are the standard limits."""
        if worker is not None:
            self._check_within(worker)
        adopted = worker or StepLimits()
        return StepLimits(
            max_num_seqs=self.max_num_seqs or adopted.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or adopted.max_num_batched_tokens,
            max_steps_in_flight=self.max_steps_in_flight or adopted.max_steps_in_flight,
        )

    def _check_within(self, worker: StepLimits) -> None:
        # Steps in flight beyond the worker's wait there: more is allowed.
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            asked, built = getattr(self, name), getattr(worker, name)
            if asked is not None and asked > built:
                flag = "--" + name.replace("_", "-")
                raise StepLimitsError(
                    f"{name} {asked} is more than the {built} the worker is built for: lower the "
                    f"scheduler's {flag} to {built} or less (or leave it out to adopt the worker's), "
                    f"or start the worker with {flag} {asked}"
                )
