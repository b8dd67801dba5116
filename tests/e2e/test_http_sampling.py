"""Sampling through the OpenAI-compatible HTTP API, driven by the official `openai` client
against the three services as processes with the embedded model: logit bias, min_p,
logprobs, penalties and min_tokens, each checked against HF transformers' logits or the
definition it implements."""

import openai
import pytest
from pagedserve.v1 import common_pb2, generation_pb2

from tests.support.hf_reference import hf_greedy
from tests.support.http_api import CHAT, MAX_TOKENS, MODEL, PROMPT
from tests.support.service_stack import Stack


@pytest.mark.hf
def test_logit_bias_moves_the_pick_as_on_hf_logits(
    client: openai.OpenAI, http_stack: Stack, hf_embedded_model
) -> None:
    import torch

    prompt_ids = list(http_stack.generation.Tokenize(generation_pb2.TokenizeRequest(text=PROMPT)).token_ids)
    with torch.no_grad():
        logits = hf_embedded_model(torch.tensor([prompt_ids])).logits[0, -1]
    banned, boosted = int(logits.argmax()), int(logits.topk(5).indices[4])
    bias = {banned: -100.0, boosted: 2.0}
    biased = logits.clone()
    for token_id, value in bias.items():
        biased[token_id] += value
    expected = http_stack.generation.Detokenize(
        generation_pb2.DetokenizeRequest(token_ids=[int(biased.argmax())])
    ).text
    answer = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=1,
        temperature=0,
        logit_bias={str(token_id): value for token_id, value in bias.items()},
    )
    assert answer.choices[0].text == expected
    # The gRPC API takes the same parameter and gives the same token.
    request = generation_pb2.GenerateRequest(
        prompt=PROMPT, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=1, logit_bias=bias)
    )
    assert [t for m in http_stack.generation.Generate(request, timeout=300) for t in m.token_ids] == [
        int(biased.argmax())
    ]


def test_min_p_one_samples_the_greedy_answer(client: openai.OpenAI) -> None:
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    sampled = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=1.0, seed=3, extra_body={"min_p": 1.0}
    )
    assert sampled.choices[0].text == greedy.choices[0].text


@pytest.mark.hf
def test_logprobs_equal_hf_log_softmax(client: openai.OpenAI, http_stack: Stack, hf_embedded_model) -> None:
    import torch

    prompt_ids = list(http_stack.generation.Tokenize(generation_pb2.TokenizeRequest(text=PROMPT)).token_ids)
    generated = hf_greedy(hf_embedded_model, prompt_ids, 4, [2])
    with torch.no_grad():
        logits = hf_embedded_model(torch.tensor([prompt_ids + generated])).logits[0]
    reference = torch.log_softmax(logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(generated)], dim=-1)
    expected = reference.gather(1, torch.tensor(generated)[:, None]).squeeze(1).tolist()

    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    logprobs = answer.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(expected, abs=1e-3)
    for position, top in enumerate(logprobs.top_logprobs):
        assert sorted(top.values(), reverse=True) == pytest.approx(
            reference[position].topk(3).values.tolist(), abs=1e-3
        )
    texts = [
        http_stack.generation.Detokenize(
            generation_pb2.DetokenizeRequest(token_ids=[t], skip_special_tokens=False)
        ).text
        for t in generated
    ]
    assert logprobs.tokens == texts
    assert "".join(texts) == answer.choices[0].text

    # The gRPC API returns the same numbers with its tokens.
    request = generation_pb2.GenerateRequest(
        prompt=PROMPT, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=4, logprobs=3)
    )
    grpc_logprobs = [
        lp.logprob for m in http_stack.generation.Generate(request, timeout=300) for lp in m.logprobs
    ]
    assert grpc_logprobs == pytest.approx(logprobs.token_logprobs, abs=1e-4)


def test_chat_logprobs_whole_and_streamed(client: openai.OpenAI) -> None:
    request = {
        "model": MODEL,
        "messages": CHAT,
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(**request)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        # Greedy: the sampled token is the likeliest.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.bytes == list(entry.token.encode())
    streamed = [
        entry
        for chunk in client.chat.completions.create(**request, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    # The repeat reads the prompt's KV from the prefix cache: equal up to rounding.
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**{**request, "logprobs": False})
    assert refused.value.body["param"] == "top_logprobs"


@pytest.mark.hf
def test_penalties_change_greedy_output_as_defined_on_hf_logits(
    client: openai.OpenAI, http_stack: Stack, hf_embedded_model
) -> None:
    import torch

    prompt = "1, 2, 3, 4,"
    prompt_ids = list(http_stack.generation.Tokenize(generation_pb2.TokenizeRequest(text=prompt)).token_ids)
    frequency, presence, repetition = 0.8, 0.4, 1.3
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            logits = hf_embedded_model(torch.tensor([prompt_ids + generated])).logits[0, -1]
            for token in set(prompt_ids) | set(generated):
                logits[token] = (
                    logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
                )
            for token in set(generated):
                logits[token] -= frequency * generated.count(token) + presence
            generated.append(int(logits.argmax()))
    expected = http_stack.generation.Detokenize(generation_pb2.DetokenizeRequest(token_ids=generated)).text

    answer = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        frequency_penalty=frequency,
        presence_penalty=presence,
        extra_body={"repetition_penalty": repetition, "ignore_eos": True},
    )
    assert answer.choices[0].text == expected
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert plain.choices[0].text != expected


def test_min_tokens_and_special_tokens(client: openai.OpenAI) -> None:
    short = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=40, temperature=0
    )
    assert short.choices[0].finish_reason == "stop"
    natural = short.usage.completion_tokens
    longer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=natural + 3,
        temperature=0,
        extra_body={"min_tokens": natural + 3},
    )
    assert longer.usage.completion_tokens == natural + 3
    assert longer.choices[0].finish_reason == "length"
    # The end-of-turn token the model ended with shows when special tokens are kept.
    shown = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=40,
        temperature=0,
        extra_body={"skip_special_tokens": False},
    )
    assert shown.choices[0].message.content == short.choices[0].message.content + "<|im_end|>"
