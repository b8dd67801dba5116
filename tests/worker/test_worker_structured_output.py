"""Structured output on the worker (CPU, a tiny random Llama with a small byte-level
tokenizer, driven by the real scheduler): constrained completions match their regex,
choice or JSON Schema although the weights are random, free completions of the same
batches are untouched, and overlapped steps and preemption (whose sequences come back
with their generated tokens) give every completion the tokens it gets alone."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from pagedserve.v1 import common_pb2
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from gpu_worker.structured_output import allowed_tokens
from tests.support.engine_loop import run_engine
from tests.support.small_tokenizer import build_tokenizer
from tests.support.tiny_llama import EOS_TOKEN_ID, TINY_DIMS

VOCAB_SIZE = 420
REGEX = r"[a-z]{2,5}( [a-z]{2,5}){1,3}"
CHOICES = ["alpha", "beta", "gamma delta"]
SCHEMA = {
    "type": "object",
    "properties": {"k": {"enum": ["x", "yz"]}, "v": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["k", "v"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_llama_with_tokenizer")
    LlamaForCausalLM(LlamaConfig(**{**TINY_DIMS, "vocab_size": VOCAB_SIZE})).eval().save_pretrained(directory)
    tokenizer = build_tokenizer(VOCAB_SIZE)
    assert tokenizer.id_to_token(EOS_TOKEN_ID) == "<|im_end|>"
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def _requests() -> list[tuple[str, list[int], common_pb2.SamplingParams]]:
    rng = random.Random(3)
    constraints = [
        common_pb2.StructuredOutput(regex=REGEX),
        common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=CHOICES)),
        common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA)),
        None,
    ]
    requests = []
    for i in range(8):
        prompt = [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randrange(2, 20))]
        sampling = common_pb2.SamplingParams(max_tokens=40, seed=50 + i, temperature=1.0 if i % 2 else 0.0)
        constraint = constraints[i % len(constraints)]
        if constraint is not None:
            sampling.structured_output.CopyFrom(constraint)
        if i == 2:
            sampling.n = 2
        requests.append((f"r{i}", prompt, sampling))
    return requests


def _run(model_dir: Path, requests, **engine) -> dict[tuple[str, int], list[int]]:
    return run_engine(model_dir, requests, EOS_TOKEN_ID, **engine).tokens


def test_constrained_completions_match_and_survive_overlap_and_preemption(model_dir: Path) -> None:
    requests = _requests()
    alone: dict[tuple[str, int], list[int]] = {}
    for request in requests:
        alone.update(_run(model_dir, [request]))
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for (request_id, _), tokens in alone.items():
        sampling = next(s for r, _, s in requests if r == request_id)
        kind = sampling.structured_output.WhichOneof("constraint")
        if kind is None:
            continue
        assert tokens[-1] == EOS_TOKEN_ID, (request_id, tokens)
        text = tokenizer.decode(tokens[:-1], skip_special_tokens=False)
        if kind == "regex":
            assert re.fullmatch(REGEX, text), text
        elif kind == "choice":
            assert text in CHOICES, text
        else:
            jsonschema.validate(json.loads(text), SCHEMA)
    # Both completions of the n = 2 request, the second forked from the first's prompt.
    assert ("r2", 1) in alone
    # Unconstrained completions batched with constrained ones get their own tokens, and
    # constrained ones whose steps overlap or that are preempted get theirs.
    assert _run(model_dir, requests, steps_in_flight=2) == alone
    for mode in ("recompute", "swap"):
        assert (
            _run(model_dir, requests, steps_in_flight=2, num_kv_blocks=16, preemption_mode=mode) == alone
        ), mode


def test_bitmask_bits_become_allowed_tokens() -> None:
    # Bit b of word w is token 32 w + b; the sign bit too.
    words = torch.tensor([[0b1011, -(1 << 31)], [0, 1]], dtype=torch.int32)
    wide = allowed_tokens(words, 80)
    assert wide.shape == (2, 80)
    assert wide[0].nonzero().flatten().tolist() == [0, 1, 3, 63]
    assert wide[1].nonzero().flatten().tolist() == [32]
    # Cut to the vocabulary: the logits' width.
    assert allowed_tokens(words, 40)[0].nonzero().flatten().tolist() == [0, 1, 3]


def test_a_model_eos_past_the_tokenizers_ids_leaves_grammars_working(tmp_path: Path) -> None:
    """Padded embeddings: the model's EOS id is past the tokenizer's vocabulary. The
    grammar ends on the tokenizer's own EOS instead of failing every constrained step."""
    from gpu_worker.structured_output import GrammarMasks

    tokenizer = build_tokenizer()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size() + 64
    masks = GrammarMasks(tmp_path / "tokenizer.json", vocab_size, (vocab_size - 1,))
    sampling = common_pb2.SamplingParams(structured_output=common_pb2.StructuredOutput(regex="[ab]+"))
    masks.add(7, sampling, [])
    assert 7 in masks
    allowed = torch.isfinite(masks.masked(torch.zeros(1, vocab_size), [7]))[0]
    text_of = {i: tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size())}
    assert allowed.any() and all(
        re.fullmatch("[ab]+", text_of[i]) for i in allowed.nonzero().flatten().tolist()
    )
