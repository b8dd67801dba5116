"""The three services with n-gram speculation on the worker: greedy tokens equal HF
transformers', concurrently; stop strings end the text where they should although tokens
come several per step; seeded samples repeat; the worker's /metrics and step spans count
proposals and acceptances."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pagedserve.v1 import common_pb2, generation_pb2
from prometheus_client.parser import text_string_to_metric_families

from services.launcher import free_port
from tests.support.hf_reference import hf_greedy
from tests.support.service_stack import Stack, service_stack

DOCUMENT = (
    "The committee met on Tuesday to review the budget for the new library. The budget for the "
    "new library includes funds for books, computers and a reading room for children."
)
PROMPTS = [
    f"Copy the text.\nText: {DOCUMENT}\nCopy: The committee met",
    f"Repeat: {DOCUMENT}\nRepeat: The budget",
    "1, 2, 3, 4, 5, 6, 7,",
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def stack_and_metrics(embedded_model_dir: Path, tmp_path_factory):
    port = free_port()
    with service_stack(
        embedded_model_dir,
        tmp_path_factory.mktemp("logs"),
        worker_args=[
            "--speculative-method",
            "ngram",
            "--num-speculative-tokens",
            "4",
            "--metrics-port",
            str(port),
        ],
        scheduler_args=["--speculative-min-accepted-tokens", "0"],
    ) as stack:
        yield stack, port


def _generate(stack: Stack, prompt: str, **sampling: object) -> tuple[list[int], str, int]:
    request = generation_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(**sampling))
    tokens: list[int] = []
    text = ""
    reason = 0
    for response in stack.generation.Generate(request, timeout=300):
        tokens.extend(response.token_ids)
        text += response.text
        reason = response.finish_reason or reason
    return tokens, text, reason


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_greedy_equals_hf_and_speculation_is_counted(stack_and_metrics, hf_embedded_model) -> None:
    stack, port = stack_and_metrics
    greedy = dict(temperature=0.0, max_tokens=MAX_TOKENS)
    eos_token_ids = list(stack.generation.GetModelInfo(common_pb2.GetModelInfoRequest()).eos_token_ids)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda prompt: _generate(stack, prompt, **greedy), PROMPTS))
    for prompt, (tokens, _, _) in zip(PROMPTS, results):
        prompt_ids = list(stack.generation.Tokenize(generation_pb2.TokenizeRequest(text=prompt)).token_ids)
        assert tokens == hf_greedy(hf_embedded_model, prompt_ids, MAX_TOKENS, eos_token_ids)
    proposed = _metric(port, "pagedserve:spec_decode_num_draft_tokens_total")
    accepted = _metric(port, "pagedserve:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= proposed
    assert _metric(port, "pagedserve:spec_decode_num_accepted_tokens_per_pos_total") == accepted


def test_stop_strings_and_seeds(stack_and_metrics) -> None:
    stack, _ = stack_and_metrics
    _, full, _ = _generate(stack, PROMPTS[0], temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    stop = "library"
    assert stop in full
    _, text, reason = _generate(stack, PROMPTS[0], temperature=0.0, max_tokens=MAX_TOKENS, stop=[stop])
    assert text == full[: full.index(stop)] and reason == common_pb2.FINISH_REASON_STOP
    # Sampled with speculation: the same seed gives the same tokens, batched or not.
    sampled = dict(temperature=0.8, max_tokens=12, ignore_eos=True)
    alone = [_generate(stack, PROMPTS[0], seed=seed, **sampled)[0] for seed in range(3)]
    with ThreadPoolExecutor(3) as pool:
        together = list(
            pool.map(lambda seed: _generate(stack, PROMPTS[0], seed=seed, **sampled)[0], range(3))
        )
    assert alone == together
    assert len({tuple(tokens) for tokens in alone}) > 1
