"""What the pipeline stages of one engine hand each other every step.

Every rank receives every step from the scheduler and builds the same batch, so the stages
exchange only tensors: each stage but the first receives the previous stage's residual
stream ([T, hidden]) and each stage but the last sends its own to the next. The last stage
samples; its draws go to every stage by one broadcast over the pipeline group, so that each
stage's sequences advance alike and the first stage can embed the draws in the next step
(on the device, like any draw the host has not read yet). Under tensor parallelism each
tensor-parallel rank exchanges with its counterparts in the other stages: the activations
are whole on every rank of a stage after its all-reduce.

On a single stage every method returns at once and moves nothing.
"""

from __future__ import annotations

import torch

from gpu_worker.parallel.groups import ParallelContext


class StageExchange:
    def __init__(
        self, parallel: ParallelContext, hidden_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.parallel = parallel
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device

    def receive_activations(self, num_tokens: int) -> torch.Tensor | None:
        """The previous stage's output for a step of num_tokens; None on the first stage."""
        if self.parallel.is_first_stage:
            return None
        buffer = torch.empty(num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        return self.parallel.recv_from_previous_stage(buffer)

    def send_activations(self, activations: torch.Tensor) -> None:
        if not self.parallel.is_last_stage:
            self.parallel.send_to_next_stage(activations)

    def share_draws(self, draws: torch.Tensor) -> torch.Tensor:
        """The last stage's draws, in `draws` on every stage (a buffer of their size on the
        stages before it)."""
        if self.parallel.num_stages > 1:
            self.parallel.pp.broadcast(draws, self.parallel.num_stages - 1)
        return draws
