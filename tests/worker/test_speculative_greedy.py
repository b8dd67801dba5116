"""Greedy decoding with speculation gives exactly the tokens of greedy decoding without:
n-gram prompt lookup, the embedded model as its own draft, and a different tiny random
draft with the same vocabulary; batched, under preemption, with prefix-cache hits, n > 1,
a stop token inside a run of accepted tokens, and a penalized request (which never
speculates) in the same batch. The real scheduler drives the real model runner in this
process (tests/support/speculative_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from pagedserve.v1 import common_pb2
from tokenizers import Tokenizer

from services.common.speculative import SpeculativeConfig
from services.scheduler.config import SchedulerConfig
from tests.support.speculative_runs import Run, generate, make_runner

pytestmark = pytest.mark.slow

DOCUMENT = (
    "The committee met on Tuesday to review the budget for the new library. The budget for the "
    "new library includes funds for books, computers and a reading room for children."
)
TEXTS = [
    f"Copy the text.\nText: {DOCUMENT}\nCopy: The committee met on Tuesday",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
    f"Copy the text.\nText: {DOCUMENT}\nCopy: The budget",
    f"Repeat: {DOCUMENT}\nRepeat: The committee",
]
MAX_TOKENS = 16
# Speculate in every step, whatever the acceptance, so that every path runs.
ALWAYS = dict(speculative_min_accepted_tokens=0.0)
PLAIN = SchedulerConfig(speculative_max_batch_size=0)


def _greedy(**fields: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **fields)


@pytest.fixture(scope="module")
def prompts(embedded_model_dir: Path) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(embedded_model_dir / "tokenizer.json"))
    return [tokenizer.encode(text).ids for text in TEXTS]


@pytest.fixture(scope="module")
def ngram_runner(embedded_model_dir: Path):
    return make_runner(embedded_model_dir, SpeculativeConfig(method="ngram", num_speculative_tokens=4))


@pytest.fixture(scope="module")
def reference(ngram_runner, prompts: list[list[int]]) -> Run:
    # The speculating worker, with a scheduler that never gives it lookahead slots.
    plain = generate(ngram_runner, prompts, [_greedy()] * len(prompts), PLAIN)
    assert not plain.speculation
    return plain


def _stop_token(reference: Run) -> int:
    """A token that request 1's plain run first generates past its middle."""
    tokens = reference.tokens[1][0]
    return next(t for i, t in enumerate(tokens) if i >= MAX_TOKENS // 2 and t not in tokens[:i])


def _samplings(reference: Run) -> list[common_pb2.SamplingParams]:
    """Request 1 stops at a token that its plain run generates mid-way; request 2 draws
    two completions; request 3 is penalized."""
    stop = _stop_token(reference)
    return [
        _greedy(),
        _greedy(stop_token_ids=[stop]),
        _greedy(n=2),
        _greedy(repetition_penalty=1.3),
    ]


def _expected(reference: Run, penalized: Run) -> list[dict[int, list[int]]]:
    tokens = reference.tokens
    stop = _stop_token(reference)
    return [
        tokens[0],
        {0: tokens[1][0][: tokens[1][0].index(stop) + 1]},
        {0: tokens[2][0], 1: tokens[2][0]},
        penalized.tokens[3],
    ]


@pytest.fixture(scope="module")
def penalized(ngram_runner, prompts: list[list[int]], reference: Run) -> Run:
    return generate(ngram_runner, prompts, _samplings(reference), PLAIN)


def _check(run: Run, reference: Run, penalized: Run) -> None:
    assert run.tokens == _expected(reference, penalized)
    proposed = sum(p for p, _ in run.speculation)
    accepted = sum(a for _, a in run.speculation)
    assert proposed > 0 and accepted > 0, run.speculation


def test_ngram_is_exact_batched_and_preempted(ngram_runner, prompts, reference, penalized) -> None:
    # Too few blocks for the four requests' prompts, outputs and lookahead at once.
    config = SchedulerConfig(num_kv_blocks=8, **ALWAYS)
    run = generate(ngram_runner, prompts, _samplings(reference), config)
    _check(run, reference, penalized)
    assert run.scheduler.num_preemptions > 0


def test_ngram_is_exact_with_prefix_hits(ngram_runner, prompts, reference, penalized) -> None:
    # Two at a time: the second copy finds the first one's prompt blocks cached.
    run = generate(ngram_runner, prompts, _samplings(reference), SchedulerConfig(max_num_seqs=2, **ALWAYS))
    _check(run, reference, penalized)
    assert run.num_cached_tokens[2] > 0


def test_the_model_as_its_own_draft_is_exact_and_accepts_all(
    embedded_model_dir: Path, prompts, reference, penalized
) -> None:
    runner = make_runner(
        embedded_model_dir, SpeculativeConfig(draft_model_path=embedded_model_dir, num_speculative_tokens=3)
    )
    run = generate(runner, prompts, _samplings(reference), SchedulerConfig(num_kv_blocks=16, **ALWAYS))
    _check(run, reference, penalized)
    # The same model proposes what it would choose: every proposal is accepted.
    assert all(proposed == accepted for proposed, accepted in run.speculation)


def test_a_tiny_random_draft_is_exact(
    embedded_model_dir: Path, tmp_path_factory, prompts, reference, penalized
) -> None:
    target = transformers.AutoConfig.from_pretrained(embedded_model_dir)
    torch.manual_seed(0)
    draft = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=target.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            eos_token_id=target.eos_token_id,
        )
    )
    draft_dir = tmp_path_factory.mktemp("draft")
    draft.save_pretrained(draft_dir)
    runner = make_runner(
        embedded_model_dir, SpeculativeConfig(draft_model_path=draft_dir, num_speculative_tokens=2)
    )
    run = generate(runner, prompts, _samplings(reference), SchedulerConfig(**ALWAYS))
    assert run.tokens == _expected(reference, penalized)
    assert sum(p for p, _ in run.speculation) > 0
