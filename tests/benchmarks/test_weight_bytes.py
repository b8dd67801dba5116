"""The weights a decode step reads, as the throughput benchmark's roofline counts them,
against the parameters of HF's models: every weight once for a large batch; for a mixture
of experts at one sequence, only the experts one token is routed to."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.workload import model_weight_bytes, step_weight_bytes
from tests.support.tiny_architectures import build_tiny_model


def _saved(model_type: str, directory: Path) -> tuple[dict[str, int], int]:
    """The model's parameter counts by name, and the embedding's (which a decode step
    reads a few rows of: the roofline counts it only as the tied LM head)."""
    model = build_tiny_model(model_type)
    model.save_pretrained(directory)
    counts = {name: param.numel() for name, param in model.named_parameters()}
    return counts, model.get_input_embeddings().weight.numel()


@pytest.mark.hf
@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", "mixtral"])
def test_a_large_batch_reads_every_weight_once(model_type: str, tmp_path: Path) -> None:
    counts, embedding = _saved(model_type, tmp_path)
    # Tied weights appear once among the parameters, an untied LM head beside the embedding.
    expected = sum(counts.values()) - (embedding if "lm_head.weight" in counts else 0)
    assert model_weight_bytes(tmp_path, 2) == 2 * expected
    # 10,000 sequences route to every expert.
    assert step_weight_bytes(tmp_path, 2)(10_000) == pytest.approx(2 * expected, rel=1e-9)


@pytest.mark.hf
def test_one_sequence_reads_only_its_tokens_experts(tmp_path: Path) -> None:
    counts, _ = _saved("qwen3_moe", tmp_path)
    # Layer 0 routes each token to 2 of 4 experts; layer 1 is dense.
    expert_params = sum(n for name, n in counts.items() if ".mlp.experts." in name)
    one_expert = expert_params // 4
    every_weight = model_weight_bytes(tmp_path, 2)
    assert step_weight_bytes(tmp_path, 2)(1) == pytest.approx(every_weight - 2 * 2 * one_expert)
    # Two sequences touch 4 (1 - (1/2)^2) = 3 experts on average.
    assert step_weight_bytes(tmp_path, 2)(2) == pytest.approx(every_weight - 2 * 1 * one_expert)
