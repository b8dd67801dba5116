"""The prompts' arithmetic that the throughput benchmark's bound adds to the memory
roofline, against the operations PyTorch's flop counter sees in HF's Llama forward over
the same prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.workload import Workload, prefill_flops
from tests.support.tiny_llama import TINY_DIMS


@pytest.mark.hf
def test_prefill_flops_count_every_projection_and_causal_attention(tmp_path: Path) -> None:
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY_DIMS, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    prompt = list(range(1, 12))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.tensor([prompt]))
    n, layers, q = len(prompt), config.num_hidden_layers, config.num_attention_heads * config.head_dim
    lm_head = 2 * n * config.hidden_size * config.vocab_size
    # Eager attention multiplies every query with every key, masked after; a causal
    # kernel computes the n (n + 1) / 2 visible pairs.
    every_pair, visible_pairs = n * n, n * (n + 1) / 2
    attention_per_pair = layers * 2 * 2 * q
    expected = counter.get_total_flops() - lm_head - attention_per_pair * (every_pair - visible_pairs)
    assert prefill_flops(Workload([prompt], [1]), tmp_path) == pytest.approx(expected, rel=1e-9)
