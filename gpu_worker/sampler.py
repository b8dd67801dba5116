"""Turns one step's logits into one token per sampled sequence.

Rows with temperature 0 take the exact argmax of their logits. The other rows are scaled
by temperature, filtered by top-k then top-p, and sampled with the exponential race
(argmax of p / E with E ~ Exp(1)), which draws exactly from p and needs one batched
noise tensor instead of a per-row multinomial. A sequence with its own seed draws its noise
from its own generator, so its tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagedserve.v1 import common_pb2

# Temperatures at or below this are greedy: dividing by them would overflow anyway.
_GREEDY_TEMPERATURE = 1e-5


def make_generator(sampling: common_pb2.SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private random stream for a request that brings a seed; None means the shared one."""
    if not sampling.HasField("seed"):
        return None
    generator = torch.Generator(device=device)
    # torch seeds are signed 64-bit; keep the low 63 bits of the request's uint64.
    generator.manual_seed(sampling.seed & ((1 << 63) - 1))
    return generator


class Sampler:
    def __init__(self, device: torch.device, seed: int | None = None) -> None:
        self.device = device
        self.shared_generator = torch.Generator(device=device)
        if seed is None:
            self.shared_generator.seed()
        else:
            self.shared_generator.manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[common_pb2.SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """logits: [num_rows, vocab]; params and generators: one per row. Returns [num_rows] int64."""
        assert logits.shape[0] == len(params) == len(generators)
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        temperatures = [p.temperature if p.HasField("temperature") else 1.0 for p in params]
        random_rows = [i for i, t in enumerate(temperatures) if t > _GREEDY_TEMPERATURE]
        if not random_rows:
            return tokens

        row_index = torch.tensor(random_rows, device=logits.device)
        scaled = logits[row_index] / torch.tensor(
            [temperatures[i] for i in random_rows], device=logits.device
        ).unsqueeze(1)
        scaled = self._filter_top_k_top_p(scaled, [params[i] for i in random_rows])
        probs = torch.softmax(scaled, dim=-1)
        noise = self._exponential_noise(probs.shape, [generators[i] for i in random_rows])
        tokens[row_index] = (probs / noise).argmax(dim=-1)
        return tokens

    @staticmethod
    def _filter_top_k_top_p(
        logits: torch.Tensor, params: Sequence[common_pb2.SamplingParams]
    ) -> torch.Tensor:
        vocab_size = logits.shape[-1]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        top_p = [p.top_p if p.HasField("top_p") else 1.0 for p in params]
        if all(k == vocab_size for k in top_k) and all(p >= 1.0 for p in top_p):
            return logits  # skip the vocabulary sort when no row filters

        sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab_size, device=logits.device)
        top_k_tensor = torch.tensor(top_k, device=logits.device)
        sorted_logits.masked_fill_(ranks[None, :] >= top_k_tensor[:, None], float("-inf"))
        # Top-p applies to what top-k kept. Keep a token while the mass before it is below
        # top_p: the smallest prefix whose probability reaches top_p, never empty.
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        top_p_tensor = torch.tensor(top_p, device=logits.device, dtype=logits.dtype)
        outside_nucleus = mass_before >= top_p_tensor[:, None]
        outside_nucleus[:, 0] = False
        sorted_logits.masked_fill_(outside_nucleus, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, sorted_index, sorted_logits)

    def _exponential_noise(
        self, shape: torch.Size, generators: Sequence[torch.Generator | None]
    ) -> torch.Tensor:
        noise = torch.empty(shape, device=self.device)
        noise.exponential_(generator=self.shared_generator)
        for row, generator in enumerate(generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
        # A zero draw would make 0 / 0 = NaN for a filtered-out token.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)
