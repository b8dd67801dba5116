"""logit_bias and min_p in the sampler, checked against the formulas written out in plain
PyTorch: biased greedy picks exactly, and sampled distributions by their frequencies."""

from __future__ import annotations

import torch
from pagedserve.v1 import common_pb2

from gpu_worker.sampler import Sampler, SequenceSampling

CPU = torch.device("cpu")
NUM_DRAWS = 20000


def _sample(logits: torch.Tensor, params: list[common_pb2.SamplingParams]) -> list[int]:
    rows = [SequenceSampling.from_proto(p, 0, fallback_seed=i) for i, p in enumerate(params)]
    return [tokens[0] for tokens in Sampler(CPU, seed=0).sample(logits, rows, [0] * len(rows))]


def _frequencies(tokens: list[int], vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab_size).float() / len(tokens)


def _reference_biased(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    biased = logits.clone()
    for token_id, value in bias.items():
        biased[..., token_id] += value
    return biased


def _reference_min_p(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    kept = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    return kept / kept.sum()


def test_logit_bias_moves_greedy_picks_as_the_formula_says() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=generator)
    biases = [{}, {7: 100.0}, {int(logits[2].argmax()): -100.0}, {3: 0.5, 9: -0.25}, {}, {49: 3.0}]
    params = [common_pb2.SamplingParams(temperature=0, logit_bias=bias) for bias in biases]
    expected = [int(_reference_biased(row, bias).argmax()) for row, bias in zip(logits, biases)]
    assert _sample(logits, params) == expected
    assert expected[1] == 7
    assert expected[2] != int(logits[2].argmax())


def test_logit_bias_shifts_the_sampled_distribution() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0])
    bias = {3: 2.0, 0: -1.0}
    params = [
        common_pb2.SamplingParams(seed=seed, temperature=0.8, logit_bias=bias) for seed in range(NUM_DRAWS)
    ]
    tokens = _sample(logits.expand(NUM_DRAWS, -1), params)
    expected = torch.softmax(_reference_biased(logits, bias) / 0.8, dim=-1)
    torch.testing.assert_close(_frequencies(tokens, 4), expected, atol=0.015, rtol=0)


def test_min_p_keeps_tokens_at_least_min_p_times_the_likeliest() -> None:
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log()
    for min_p, temperature in ((0.3, 1.0), (0.2, 1.0), (0.5, 0.7)):
        params = _seeded(min_p=min_p, temperature=temperature)
        tokens = _sample(logits.expand(NUM_DRAWS, -1), params)
        expected = _reference_min_p(torch.softmax(logits / temperature, dim=-1), min_p)
        torch.testing.assert_close(_frequencies(tokens, 5), expected, atol=0.015, rtol=0)


def test_min_p_applies_before_top_k_and_mixes_with_plain_rows() -> None:
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log()
    filtered = _seeded(min_p=0.2, top_k=2)
    plain = _seeded()
    tokens = _sample(logits.expand(2 * NUM_DRAWS, -1), [p for pair in zip(filtered, plain) for p in pair])
    after_min_p = _reference_min_p(probs, 0.2)
    top_two = torch.where(after_min_p >= after_min_p.topk(2).values[-1], after_min_p, torch.zeros_like(probs))
    torch.testing.assert_close(_frequencies(tokens[0::2], 5), top_two / top_two.sum(), atol=0.015, rtol=0)
    torch.testing.assert_close(_frequencies(tokens[1::2], 5), probs, atol=0.015, rtol=0)


def test_min_p_zero_and_one() -> None:
    logits = torch.tensor([0.2, 0.1, 0.0])
    # 0 is off; 1 keeps only the likeliest token (greedy, but through the sampling path).
    assert set(_sample(logits.expand(200, -1), _seeded(200, min_p=1.0))) == {0}
    assert set(_sample(logits.expand(2000, -1), _seeded(2000, min_p=0.0))) == {0, 1, 2}


def _seeded(num: int = NUM_DRAWS, **fields) -> list[common_pb2.SamplingParams]:
    return [common_pb2.SamplingParams(seed=seed, **fields) for seed in range(num)]


def test_logprobs_are_the_raw_logits_log_softmax_for_every_draw() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=generator)
    params = [
        common_pb2.SamplingParams(temperature=0, logprobs=3, logit_bias={5: 4.0}),
        common_pb2.SamplingParams(seed=1, temperature=0.5, top_k=4),
        common_pb2.SamplingParams(seed=2, n=2, logprobs=1),
    ]
    rows = [SequenceSampling.from_proto(p, 0, fallback_seed=i) for i, p in enumerate(params)]
    sampled = Sampler(CPU, seed=0).sample_on_device(logits, rows, [0, 0, 0])
    assert sampled.logprobs is not None
    # The most any row asked for, for every draw; the third row drew two tokens.
    expected_rows = logits[[0, 1, 2, 2]]
    expected = torch.log_softmax(expected_rows, dim=-1)
    tokens = sampled.tokens
    torch.testing.assert_close(sampled.logprobs.sampled, expected.gather(1, tokens[:, None]).squeeze(1))
    torch.testing.assert_close(sampled.logprobs.top_values, expected.topk(3).values)
    assert torch.equal(sampled.logprobs.top_ids, expected.topk(3).indices)
    # Greedy with a bias picks by the biased logits, but reports the model's own logprobs.
    assert int(tokens[0]) == int(_reference_biased(logits[0], {5: 4.0}).argmax())


def test_no_logprobs_unless_asked() -> None:
    rows = [SequenceSampling.from_proto(common_pb2.SamplingParams(temperature=0), 0, fallback_seed=0)]
    assert Sampler(CPU, seed=0).sample_on_device(torch.randn(1, 8), rows, [0]).logprobs is None


def test_stop_tokens_are_masked_until_min_tokens() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 2] = 5.0  # EOS, the likeliest
    logits[:, 3] = 4.0  # a stop token id of the request
    logits[:, 4] = 1.0
    params = common_pb2.SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    # Prompt of 6 tokens: positions 6 and 7 are outputs 1 and 2 (masked), 8 is output 3.
    rows = [SequenceSampling.from_proto(params, 0, fallback_seed=0, num_prompt_tokens=6)] * 2
    sampler = Sampler(CPU, seed=0, eos_token_ids=[2])
    assert sampler.sample(logits, rows, [7, 8]) == [[4], [2]]
    sampled = sampler.sample_on_device(logits, rows, [6, 6])
    assert sampled.tokens.tolist() == [4, 4]
    # No min_tokens: nothing masked.
    plain = [SequenceSampling.from_proto(common_pb2.SamplingParams(temperature=0), 0, fallback_seed=0)]
    assert sampler.sample(logits[:1], plain, [6]) == [[2]]
