"""Scheduler settings, passed in explicitly; nothing here reads the environment or disk."""

import enum
from dataclasses import dataclass


class PreemptionMode(enum.Enum):
    # Drop the victim's KV and compute it again when it resumes.
    RECOMPUTE = "recompute"
    # Move the victim's KV to the workers' CPU swap pool and back when it resumes; falls
    # back to recompute when the CPU pool is full.
    SWAP = "swap"


@dataclass(frozen=True)
class SchedulerConfig:
    # Most sequences holding KV blocks at once (the batch's seats). A request with n
    # completions takes n seats.
    max_num_seqs: int = 256
    # Most tokens computed in one step, all sequences together. Prompts longer than what is
    # left of it are computed in chunks over several steps.
    max_num_batched_tokens: int = 8192
    # Caps the KV block pool below what the worker holds (tests, small machines).
    # None: use every block the worker holds.
    num_kv_blocks: int | None = None
    # Reuse the KV of full blocks whose tokens (and every token before them) match.
    enable_prefix_caching: bool = True
    preemption_mode: PreemptionMode = PreemptionMode.RECOMPUTE
    # Requests that may queue unadmitted; past it new ones are refused at once
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
    # a time.
    max_steps_in_flight: int = 3
    # Stream messages sent per step at most (first tokens and last messages always go at
    # once); the other completions' tokens wait, merged, for their turn. None: no limit,
    # a message per completion per step.
    max_stream_messages_per_step: int | None = 32

    @property
    def overlap_scheduling(self) -> bool:
        return self.max_steps_in_flight > 1

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.max_steps_in_flight < 1:
            raise ValueError(f"max_steps_in_flight must be at least 1, got {self.max_steps_in_flight}")
        if self.max_stream_messages_per_step is not None and self.max_stream_messages_per_step < 1:
            raise ValueError(
                f"max_stream_messages_per_step must be at least 1, got {self.max_stream_messages_per_step}"
            )
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        # Accept the plain string of a CLI flag.
        object.__setattr__(self, "preemption_mode", PreemptionMode(self.preemption_mode))
