"""Scheduler settings, passed in explicitly; nothing here reads the environment or disk."""

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    # Most sequences holding KV blocks at once (the batch's seats).
    max_num_seqs: int = 256
    # Most tokens computed in one step, all sequences together. Prompts longer than what is
    # left of it are computed in chunks over several steps.
    max_num_batched_tokens: int = 8192
    # Caps the KV block pool below what the worker holds (tests, small machines).
    # None: use every block the worker holds.
    num_kv_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
