from __future__ import annotations

import torch

from gpu_worker.sampler import Sampler, make_generator
from pagedserve.v1 import common_pb2

CPU = torch.device("cpu")


def _sample(sampler: Sampler, logits: torch.Tensor, params: list[common_pb2.SamplingParams]) -> list[int]:
    generators = [make_generator(p, CPU) for p in params]
    return sampler.sample(logits, params, generators).tolist()


def _frequencies(tokens: list[int], vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab_size).float() / len(tokens)


def test_greedy_is_exact_argmax() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    params = [common_pb2.SamplingParams(temperature=0.0)] * 8
    assert _sample(Sampler(CPU, seed=0), logits, params) == logits.argmax(dim=-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = [common_pb2.SamplingParams(temperature=1.0, top_k=1)] * 3 + [
        common_pb2.SamplingParams(temperature=1.5, top_p=1e-6)
    ] * 3
    assert _sample(Sampler(CPU, seed=0), logits, params) == logits.argmax(dim=-1).tolist()


def test_greedy_and_random_rows_mix_in_one_batch() -> None:
    logits = torch.zeros(4, 1000)
    logits[:, 7] = 0.5  # a slight favourite: greedy must pick it, sampling rarely does
    params = [common_pb2.SamplingParams(temperature=0.0), common_pb2.SamplingParams()] * 2
    tokens = _sample(Sampler(CPU, seed=0), logits, params)
    assert tokens[0] == tokens[2] == 7


def test_same_seed_same_tokens_different_seed_differs() -> None:
    logits = torch.zeros(1, 1000)

    def draw(seed: int, others: int) -> list[int]:
        # The seeded row sits in a batch with `others` unseeded rows: its stream is its own.
        params = [common_pb2.SamplingParams(seed=seed)] + [common_pb2.SamplingParams()] * others
        generators = [make_generator(p, CPU) for p in params]
        sampler = Sampler(CPU, seed=None)
        batch = logits.expand(len(params), -1)
        return [sampler.sample(batch, params, generators)[0].item() for _ in range(20)]

    assert draw(seed=42, others=0) == draw(seed=42, others=3)
    assert draw(seed=42, others=0) != draw(seed=43, others=0)


def test_shared_stream_follows_worker_seed() -> None:
    logits = torch.zeros(16, 1000)
    params = [common_pb2.SamplingParams()] * 16
    assert _sample(Sampler(CPU, seed=5), logits, params) == _sample(Sampler(CPU, seed=5), logits, params)


def test_temperature_distribution_matches_softmax() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0])
    num_draws = 20000
    params = [common_pb2.SamplingParams(temperature=0.7)] * num_draws
    tokens = _sample(Sampler(CPU, seed=0), logits.expand(num_draws, -1), params)
    expected = torch.softmax(logits / 0.7, dim=-1)
    torch.testing.assert_close(_frequencies(tokens, 4), expected, atol=0.015, rtol=0)


def test_unset_temperature_means_one() -> None:
    logits = torch.tensor([1.0, 0.0, -0.5])
    num_draws = 20000
    params = [common_pb2.SamplingParams()] * num_draws
    tokens = _sample(Sampler(CPU, seed=0), logits.expand(num_draws, -1), params)
    torch.testing.assert_close(_frequencies(tokens, 3), torch.softmax(logits, -1), atol=0.015, rtol=0)


def test_top_k_and_top_p_renormalize_what_they_keep() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    num_draws = 20000
    kept_two = torch.tensor([0.625, 0.375, 0.0, 0.0])
    sampler = Sampler(CPU, seed=0)
    for params in (common_pb2.SamplingParams(top_k=2), common_pb2.SamplingParams(top_p=0.75)):
        tokens = _sample(sampler, logits.expand(num_draws, -1), [params] * num_draws)
        torch.testing.assert_close(_frequencies(tokens, 4), kept_two, atol=0.015, rtol=0)
    # top_k 0 and -1 mean off.
    for top_k in (0, -1):
        tokens = _sample(sampler, logits.expand(num_draws, -1), [common_pb2.SamplingParams(top_k=top_k)] * num_draws)
        torch.testing.assert_close(_frequencies(tokens, 4), probs, atol=0.015, rtol=0)
