"""Prompt logprobs against the three services as processes with the embedded model: on
gRPC (sampling.prompt_logprobs) and on the completions API (echo with logprobs), equal to
HF transformers' log-softmax of the same prompt, also when the prompt's prefix is cached
(tests/worker/test_worker_prompt_logprobs.py covers chunks, overlap and preemption)."""

from __future__ import annotations

import openai
import pytest
from pagedserve.v1 import common_pb2, generation_pb2

from tests.support.http_api import LONG_PROMPT, MODEL
from tests.support.service_stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.hf]

# Within float32 rounding of a different kernel order.
TOLERANCE = 1e-3


def _hf_prompt_logprobs(
    hf_model, token_ids: list[int], num_top: int
) -> tuple[list[float], list[list[float]]]:
    """Of tokens 1.. given those before: the token's and the num_top best, per position."""
    import torch

    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([token_ids])).logits[0, :-1].float(), dim=-1)
    targets = torch.tensor(token_ids[1:])
    picked = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
    return picked, logprobs.topk(num_top, dim=-1).values.tolist()


def _grpc_prompt_logprobs(stack: Stack, prompt: str, num_top: int) -> list[common_pb2.TokenLogprobs]:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=num_top)
    messages = list(
        stack.generation.Generate(
            generation_pb2.GenerateRequest(prompt=prompt, sampling=sampling), timeout=300
        )
    )
    assert sum(bool(m.prompt_logprobs) for m in messages) == 1
    return [entry for m in messages for entry in m.prompt_logprobs]


def test_grpc_prompt_logprobs_equal_hf_even_with_a_cached_prefix(
    http_stack: Stack, hf_embedded_model
) -> None:
    prompt_ids = list(
        http_stack.generation.Tokenize(generation_pb2.TokenizeRequest(text=LONG_PROMPT)).token_ids
    )
    expected, expected_top = _hf_prompt_logprobs(hf_embedded_model, prompt_ids, 2)
    # The second time the prompt's blocks are cached; its logprobs are computed again.
    for _ in range(2):
        entries = _grpc_prompt_logprobs(http_stack, LONG_PROMPT, 2)
        assert [e.logprob for e in entries] == pytest.approx(expected, abs=TOLERANCE)
        assert [list(e.top_logprobs) for e in entries] == [
            pytest.approx(t, abs=TOLERANCE) for t in expected_top
        ]
        # The best token's own entry is the top one's.
        for entry, token_id in zip(entries, prompt_ids[1:]):
            if entry.top_token_ids[0] == token_id:
                assert entry.top_logprobs[0] == pytest.approx(entry.logprob, abs=1e-6)


def test_echo_with_logprobs_scores_the_prompt(
    client: openai.OpenAI, http_stack: Stack, hf_embedded_model
) -> None:
    prompt = "The capital of France is Paris, and the capital of Italy is"
    prompt_ids = list(http_stack.generation.Tokenize(generation_pb2.TokenizeRequest(text=prompt)).token_ids)
    expected, _ = _hf_prompt_logprobs(hf_embedded_model, prompt_ids, 1)
    answer = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1
    )
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=1)
    choice, generated = answer.choices[0], plain.choices[0]
    assert choice.text == prompt + generated.text
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    num_prompt = len(prompt_ids)
    assert logprobs.token_logprobs[1:num_prompt] == pytest.approx(expected, abs=TOLERANCE)
    assert logprobs.token_logprobs[num_prompt:] == pytest.approx(generated.logprobs.token_logprobs, abs=1e-5)
    assert logprobs.text_offset[num_prompt] == len(prompt)
    # Echo alone: the prompt's text before the completion's.
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + generated.text
