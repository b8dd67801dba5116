from __future__ import annotations

import torch
from pagedserve.v1 import common_pb2

from gpu_worker.sampler import Sampler, SequenceSampling, exponential_noise

CPU = torch.device("cpu")


def _rows(params: list[common_pb2.SamplingParams], index: int = 0) -> list[SequenceSampling]:
    return [SequenceSampling.from_proto(p, index, fallback_seed=i) for i, p in enumerate(params)]


def _sample(
    logits: torch.Tensor,
    params: list[common_pb2.SamplingParams],
    positions: list[int] | None = None,
    index: int = 0,
) -> list[int]:
    positions = positions if positions is not None else [0] * len(params)
    return [tokens[0] for tokens in Sampler(CPU, seed=0).sample(logits, _rows(params, index), positions)]


def _frequencies(tokens: list[int], vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab_size).float() / len(tokens)


def _seeded(num: int, **fields) -> list[common_pb2.SamplingParams]:
    """num requests with seeds 0..num-1: independent draws from the same distribution."""
    return [common_pb2.SamplingParams(seed=seed, **fields) for seed in range(num)]


def test_greedy_is_exact_argmax() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    params = [common_pb2.SamplingParams(temperature=0.0)] * 8
    assert _sample(logits, params) == logits.argmax(dim=-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = [common_pb2.SamplingParams(temperature=1.0, top_k=1, seed=s) for s in range(3)] + [
        common_pb2.SamplingParams(temperature=1.5, top_p=1e-6, seed=s) for s in range(3)
    ]
    assert _sample(logits, params) == logits.argmax(dim=-1).tolist()


def test_greedy_and_random_rows_mix_in_one_batch() -> None:
    logits = torch.zeros(4, 1000)
    logits[:, 7] = 0.5  # a slight favourite: greedy must pick it, sampling rarely does
    params = [common_pb2.SamplingParams(temperature=0.0), common_pb2.SamplingParams(seed=1)] * 2
    tokens = _sample(logits, params)
    assert tokens[0] == tokens[2] == 7


def test_a_draw_is_a_function_of_seed_position_and_index_only() -> None:
    """Whatever shares the batch, and wherever the row sits in it, a seeded row at a
    position draws the same token: what makes tokens survive batching and preemption."""
    vocab = 1000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(2))
    seeded = common_pb2.SamplingParams(seed=42, temperature=1.0)
    alone = _sample(logits, [seeded], positions=[17])
    others = [common_pb2.SamplingParams(seed=s) for s in range(5)]
    batch = torch.cat([torch.randn(5, vocab), logits])
    in_batch = _sample(batch, others + [seeded], positions=[3, 9, 17, 17, 0, 17])
    assert in_batch[-1] == alone[0]
    # Other seeds, positions and completion indices draw independently.
    draws = {
        "seed": [_sample(logits, [common_pb2.SamplingParams(seed=s)], [17])[0] for s in range(40)],
        "position": [_sample(logits, [seeded], [p])[0] for p in range(40)],
        "index": [_sample(logits, [seeded], [17], index=i)[0] for i in range(40)],
    }
    assert all(len(set(tokens)) > 20 for tokens in draws.values())


def test_noise_is_exponential_and_pure() -> None:
    seeds, positions, indices = (torch.tensor(v) for v in ([1, 1, 2, -5], [5, 5, 5, 5], [0, 0, 0, 3]))
    noise = exponential_noise(seeds, positions, indices, 200_000)
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.isfinite(noise).all() and (noise > 0).all()
    torch.testing.assert_close(noise.mean(dim=1), torch.ones(4), atol=0.01, rtol=0)
    torch.testing.assert_close(noise.var(dim=1), torch.ones(4), atol=0.03, rtol=0)


def test_n_samples_draw_one_token_per_completion_index() -> None:
    logits = torch.zeros(2, 1000)
    params = common_pb2.SamplingParams(seed=7, n=4)
    row = SequenceSampling.from_proto(params, index=0, fallback_seed=0)
    greedy = SequenceSampling.from_proto(common_pb2.SamplingParams(temperature=0), index=0, fallback_seed=0)
    draws = Sampler(CPU).sample(logits, [row, greedy], positions=[5, 5])
    assert [len(tokens) for tokens in draws] == [4, 1]
    assert len(set(draws[0])) == 4
    # Completion i of the fork draws what a lone completion i would at that position.
    for index, token in enumerate(draws[0]):
        lone = SequenceSampling.from_proto(common_pb2.SamplingParams(seed=7), index, fallback_seed=0)
        assert Sampler(CPU).sample(logits[:1], [lone], [5]) == [[token]]
    assert row.after_sample().num_samples == 1


def test_a_sequence_without_a_seed_uses_the_workers_fallback() -> None:
    sampler = Sampler(CPU, seed=5)
    assert sampler.fallback_seed(1) != sampler.fallback_seed(2)
    assert sampler.fallback_seed(1) == Sampler(CPU, seed=5).fallback_seed(1)


def test_temperature_distribution_matches_softmax() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0])
    num_draws = 20000
    tokens = _sample(logits.expand(num_draws, -1), _seeded(num_draws, temperature=0.7))
    expected = torch.softmax(logits / 0.7, dim=-1)
    torch.testing.assert_close(_frequencies(tokens, 4), expected, atol=0.015, rtol=0)


def test_successive_positions_of_one_sequence_follow_the_distribution() -> None:
    logits = torch.tensor([0.3, 0.0, -0.4])
    num_draws = 20000
    params = [common_pb2.SamplingParams(seed=3)] * num_draws
    tokens = _sample(logits.expand(num_draws, -1), params, positions=list(range(num_draws)))
    torch.testing.assert_close(_frequencies(tokens, 3), torch.softmax(logits, -1), atol=0.015, rtol=0)


def test_unset_temperature_means_one() -> None:
    logits = torch.tensor([1.0, 0.0, -0.5])
    num_draws = 20000
    tokens = _sample(logits.expand(num_draws, -1), _seeded(num_draws))
    torch.testing.assert_close(_frequencies(tokens, 3), torch.softmax(logits, -1), atol=0.015, rtol=0)


def test_top_k_and_top_p_renormalize_what_they_keep() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    num_draws = 20000
    kept_two = torch.tensor([0.625, 0.375, 0.0, 0.0])
    for fields in ({"top_k": 2}, {"top_p": 0.75}):
        tokens = _sample(logits.expand(num_draws, -1), _seeded(num_draws, **fields))
        torch.testing.assert_close(_frequencies(tokens, 4), kept_two, atol=0.015, rtol=0)
    # top_k 0 and -1 mean off.
    for top_k in (0, -1):
        tokens = _sample(logits.expand(num_draws, -1), _seeded(num_draws, top_k=top_k))
        torch.testing.assert_close(_frequencies(tokens, 4), probs, atol=0.015, rtol=0)
