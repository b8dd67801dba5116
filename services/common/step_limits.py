"""The size of one engine's steps, which its scheduler and its worker must agree on.

The worker is built for its limits (CUDA graphs, activation memory, staging buffers) and
reports them in its WorkerInfo; the scheduler adopts them, or stays below them when told
to. The standard limits are written here once, for both sides; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.v1 import worker_pb2


class StepLimitsError(ValueError):
    """A scheduler was told to run larger steps than its worker is built for."""


@dataclass(frozen=True)
class StepLimits:
    # Most sequences in one step (the batch's seats).
    max_num_seqs: int = 256
    # Most tokens computed in one step, all sequences together.
    max_num_batched_tokens: int = 8192
    # Steps on their way to the worker or running there before the oldest one's result is
    # back. The worker launches this many at once (gpu_worker/step_pipeline.py); a
    # scheduler may send more, and those wait at the worker until one finishes.
    max_steps_in_flight: int = 3

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_steps_in_flight"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

    def worker_info_fields(self) -> dict[str, int]:
        """The WorkerInfo fields that report these limits."""
        return {
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_steps_launched": self.max_steps_in_flight,
        }

    @classmethod
    def from_worker_info(cls, info: worker_pb2.WorkerInfo) -> StepLimits:
        """The limits a worker reports; raises StepLimitsError when it reports none."""
        fields = cls().worker_info_fields()
        missing = [name for name in fields if not info.HasField(name)]
        if missing:
            raise StepLimitsError(
                f"the worker does not report {', '.join(missing)}; it is older than this scheduler"
            )
        return cls(info.max_num_seqs, info.max_num_batched_tokens, info.max_steps_launched)
