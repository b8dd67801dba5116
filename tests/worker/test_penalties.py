"""Presence, frequency and repetition penalties, checked against their definitions written
out per token in plain Python: OpenAI's for presence and frequency (output tokens only),
HF transformers' for repetition (prompt and output, divide positive logits, multiply
negative ones)."""

from __future__ import annotations

import torch
from pagedserve.v1 import common_pb2

from gpu_worker.penalties import NO_ROW, PenaltyTable
from gpu_worker.sampler import Sampler, SequenceSampling

CPU = torch.device("cpu")
VOCAB = 30


def _reference(
    logits: torch.Tensor, prompt: list[int], output: list[int], params: SequenceSampling
) -> torch.Tensor:
    penalized = logits.clone()
    for token in set(prompt) | set(output):
        value = penalized[token]
        penalized[token] = (
            value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
        )
    for token in set(output):
        penalized[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return penalized


def test_penalties_follow_their_definitions_row_by_row() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=generator)
    histories = [([1, 2, 3], [4, 4, 5]), ([7, 7], []), ([2], [9, 9, 9, 2]), ([3], [3])]
    params = [
        common_pb2.SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        common_pb2.SamplingParams(repetition_penalty=1.5),
        common_pb2.SamplingParams(frequency_penalty=-0.3, repetition_penalty=0.8, presence_penalty=1.0),
        common_pb2.SamplingParams(),  # no penalty: no row
    ]
    samplings = [SequenceSampling.from_proto(p, 0, fallback_seed=0) for p in params]
    table = PenaltyTable(VOCAB, CPU, capacity=2)  # grows past its first capacity
    for seq_id, ((prompt, output), sampling) in enumerate(zip(histories, samplings)):
        if sampling.has_penalties:
            table.add(seq_id, prompt + output, len(prompt))
    rows = table.rows([0, 1, 2, 3])
    assert rows[3] == NO_ROW
    penalized = table.apply(logits, samplings, rows)
    for row, ((prompt, output), sampling) in enumerate(zip(histories, samplings)):
        torch.testing.assert_close(penalized[row], _reference(logits[row], prompt, output, sampling))


def test_sampled_tokens_count_toward_the_next_step() -> None:
    params = common_pb2.SamplingParams(temperature=0, frequency_penalty=2.0)
    rows = [SequenceSampling.from_proto(params, 0, fallback_seed=0)]
    table = PenaltyTable(VOCAB, CPU)
    table.add(7, [1, 2], 2)
    sampler = Sampler(CPU, seed=0)
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6], logits[0, 8] = 3.0, 2.5, 0.9
    drawn = []
    for position in range(4):
        sampled = sampler.sample_on_device(logits, rows, [2 + position], table, table.rows([7]))
        drawn.append(int(sampled.tokens[0]))
    # 5 (3.0), then 6 (2.5 beats 3.0 - 2), then 5 (1.0 beats 0.5 and 0.9), then 8 (0.9).
    assert drawn == [5, 6, 5, 8]


def test_removed_sequences_free_their_rows() -> None:
    table = PenaltyTable(VOCAB, CPU, capacity=1)
    table.add(1, [3, 4], 1)
    table.remove(1)
    table.add(2, [5], 1)
    assert table.rows([1, 2]) == [NO_ROW, 0]
    table.clear()
    assert not table
