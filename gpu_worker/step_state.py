"""What the worker keeps per sequence between steps, and per step between its launch and
its result."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pagedserve.v1 import worker_pb2

from gpu_worker.input_batch import DeviceToken
from gpu_worker.prompt_logprobs import ScoredPrompt
from gpu_worker.sampler import SequenceSampling
from gpu_worker.speculative.decoding import VerifiedStep


@dataclass
class SequenceState:
    # Tokens the host knows: the prompt, then each sampled token once its step finished.
    token_ids: list[int]
    num_computed_tokens: int
    sampling: SequenceSampling
    block_table: list[int] = field(default_factory=list)
    # Tokens sampled by launched steps that have not finished, and the newest of them.
    num_pending_tokens: int = 0
    newest_pending_token: DeviceToken | None = None


@dataclass
class LaunchedStep:
    """A step whose work is queued on the device."""

    step_id: int
    start_ns: int
    # (seq_id, its state, how many tokens it draws) of each sampling sequence, in batch order.
    samples: list[tuple[int, SequenceState, int]] = field(default_factory=list)
    # The draws, in host memory once `copied` has completed (or at once, on CPU).
    host_tokens: torch.Tensor | None = None
    # The draws' logprobs (sampled, top ids, top values), when a sequence asked for them.
    host_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    copied: torch.cuda.Event | None = None
    device: torch.device | None = None
    # Prompt logprobs computed by the step (PromptLogprobs), in host memory once copied.
    prompt_scores: list[ScoredPrompt] = field(default_factory=list)
    # Batch index of each sample, and the verification of speculating sequences: set
    # when the step speculates, to merge both into the result in batch order.
    sample_index: list[int] = field(default_factory=list)
    verified: VerifiedStep | None = None
    # Whether the forward replayed a captured CUDA graph (False: launched eagerly).
    replayed_graph: bool = False
    # The step's result once built, and when (time.perf_counter()).
    result: worker_pb2.StepResult | None = None
    result_at_s: float = 0.0

    def wait(self) -> None:
        """Blocks until the draws are in host memory; safe from any thread."""
        if self.copied is not None:
            with torch.cuda.device(self.device):
                self.copied.synchronize()
