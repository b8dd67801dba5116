"""The OpenAI-compatible HTTP API, driven by the official `openai` client (and curl once)
against the three services as processes with the embedded model: generation equal to HF
transformers' and to the gRPC API's, streaming equal to whole answers, usage, n with a
seed, stop strings, batched prompts, errors, and a client that leaves."""

import json
import subprocess
import time

import openai
import pytest
from pagedserve.v1 import generation_pb2, scheduler_pb2

from tests.support.hf_reference import hf_greedy
from tests.support.http_api import CHAT, LONG_PROMPT, MAX_TOKENS, MODEL, PROMPT, grpc_text
from tests.support.service_stack import Stack


def test_models_lists_the_model_by_its_directory_name(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [model.id for model in models] == [MODEL]


@pytest.mark.hf
def test_completion_equals_hf_greedy(client: openai.OpenAI, http_stack: Stack, hf_embedded_model) -> None:
    prompt_ids = list(http_stack.generation.Tokenize(generation_pb2.TokenizeRequest(text=PROMPT)).token_ids)
    expected_ids = hf_greedy(hf_embedded_model, prompt_ids, MAX_TOKENS, [2])
    expected = http_stack.generation.Detokenize(generation_pb2.DetokenizeRequest(token_ids=expected_ids)).text
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert completion.choices[0].text == expected
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == len(expected_ids)
    # Token ids give the same answer as the text they stand for.
    by_ids = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=MAX_TOKENS, temperature=0)
    assert by_ids.choices[0].text == expected


def test_chat_equals_grpc_and_streams_the_same_text(client: openai.OpenAI, http_stack: Stack) -> None:
    expected = grpc_text(http_stack, messages=[generation_pb2.ChatMessage(**m) for m in CHAT])
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_completion_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    # The usage chunk comes last, with no choices.
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_stream_equals_whole(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len(chunks) > 1
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"


def test_usage_counts_cached_prompt_tokens(client: openai.OpenAI) -> None:
    first = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    # Every full block of the prompt but the one holding its last token is reused.
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    assert again.usage.total_tokens == again.usage.prompt_tokens + again.usage.completion_tokens


def test_n_with_a_seed_is_reproducible(client: openai.OpenAI) -> None:
    def sample() -> list[str]:
        completion = client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=MAX_TOKENS,
            temperature=1.0,
            n=2,
            seed=7,
            extra_body={"ignore_eos": True},
        )
        assert [choice.index for choice in completion.choices] == [0, 1]
        assert completion.usage.completion_tokens == 2 * MAX_TOKENS
        return [choice.text for choice in completion.choices]

    first = sample()
    assert sample() == first
    # Each completion draws its own random stream.
    assert first[0] != first[1]


def test_stop_string_cuts_the_text(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=MAX_TOKENS, temperature=0)
    assert " 6" in free.choices[0].text
    stopped = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=MAX_TOKENS, temperature=0, stop=[" 6"]
    )
    assert stopped.choices[0].text == free.choices[0].text.split(" 6")[0]
    assert stopped.choices[0].finish_reason == "stop"


def test_batched_prompts_answer_each_prompt(client: openai.OpenAI) -> None:
    prompts = [PROMPT, "1, 2, 3, 4,"]
    singles = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        for p in prompts
    ]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=MAX_TOKENS, temperature=0)
    assert [choice.text for choice in sorted(batch.choices, key=lambda c: c.index)] == singles


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop[0]"),
        ({"prompt": [1, 10**9]}, "prompt[1]"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"100000000": 1}}, "logit_bias[100000000]"),
        ({"logit_bias": {"5": 101}}, "logit_bias[5]"),
        ({"extra_body": {"min_p": 2}}, "min_p"),
    ],
)
def test_bad_parameters_get_400_naming_them(client: openai.OpenAI, arguments: dict, param: str) -> None:
    request = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **arguments}
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**request)
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == param
    assert refused.value.body["type"] == "invalid_request_error"
    assert param.split("[")[0] in refused.value.body["message"]


def test_bad_chat_message_gets_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
    assert refused.value.body["param"] == "messages[0].role"


def test_unknown_model_gets_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-9", messages=CHAT, max_tokens=2)
    assert refused.value.body["code"] == "model_not_found"
    assert refused.value.body["param"] == "model"


def test_curl_gets_a_completion_and_json_errors(http_stack: Stack) -> None:
    def curl(body: str) -> tuple[int, dict]:
        output = subprocess.run(
            [
                "curl",
                "-sS",
                "-w",
                "\n%{http_code}",
                f"{http_stack.http_url}/completions",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
        text, _, status = output.rpartition("\n")
        return int(status), json.loads(text)

    status, body = curl(json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0}))
    assert status == 200
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 3
    status, body = curl("{not json")
    assert status == 400 and "message" in body["error"]


def test_health_and_metrics(http_stack: Stack) -> None:
    base = http_stack.http_url.removesuffix("/v1")
    health = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/health"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert health.stdout == "200"
    metrics = subprocess.run(
        ["curl", "-s", f"{base}/metrics"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pagedserve:grpc_server_handled_total" in metrics.stdout
    # Earlier tests' requests, counted by route and status.
    assert 'pagedserve:http_requests_total{route="/v1/completions",status="200"}' in metrics.stdout
    assert 'pagedserve:http_requests_total{route="/v1/completions",status="400"}' in metrics.stdout


def test_client_that_leaves_aborts_its_request(client: openai.OpenAI, http_stack: Stack) -> None:
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=2000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    assert http_stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest()).num_running == 1
    stream.close()
    deadline = time.monotonic() + 30
    while http_stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest()).num_running:
        assert time.monotonic() < deadline, "the request kept running after its client left"
        time.sleep(0.1)
