"""The three services as separate processes, compared token for token with HF transformers
on the embedded model: concurrently, and with a KV pool too small for all at once."""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2

from tests.support.hf_reference import hf_greedy
from tests.support.service_stack import Stack, service_stack

MAX_TOKENS = 24

LONG_TEXT = (
    "Paged attention stores the key and value vectors of every sequence in fixed-size "
    "blocks, so that memory is allocated on demand and shared between sequences. " * 4
)

PROMPTS: list[dict] = [
    {"prompt": "The capital of France is"},
    {"prompt": "1, 2, 3, 4, 5,"},
    {"prompt": "def fibonacci(n):\n    "},
    {"prompt": LONG_TEXT + "In short,"},
    {"prompt": "Hi"},
    {"messages": [{"role": "user", "content": "Name three colours of the rainbow."}]},
    {
        "messages": [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ]
    },
    {"messages": [{"role": "user", "content": LONG_TEXT + "Summarise this."}]},
    {"prompt_token_ids": [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 198]},
]


def _request(index: int, spec: dict, max_tokens: int = MAX_TOKENS) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id=f"req-{index}",
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens),
        **spec,
    )


def _collect(stack: Stack, request: generation_pb2.GenerateRequest) -> tuple[list[int], str, list]:
    token_ids: list[int] = []
    text = ""
    responses = list(stack.generation.Generate(request, timeout=300))
    for response in responses:
        assert response.request_id == request.request_id
        token_ids.extend(response.token_ids)
        text += response.text
    return token_ids, text, responses


def _prompt_ids(stack: Stack, spec: dict) -> list[int]:
    if "prompt_token_ids" in spec:
        return spec["prompt_token_ids"]
    return list(
        stack.generation.Tokenize(
            generation_pb2.TokenizeRequest(text=spec.get("prompt", ""), messages=spec.get("messages", []))
        ).token_ids
    )


def _assert_matches_hf(stack: Stack, hf_model) -> None:
    model = stack.generation.GetModelInfo(common_pb2.GetModelInfoRequest())
    requests = [_request(i, spec) for i, spec in enumerate(PROMPTS)]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: _collect(stack, r), requests))
    for spec, (token_ids, text, responses) in zip(PROMPTS, results):
        prompt_ids = _prompt_ids(stack, spec)
        expected = hf_greedy(hf_model, prompt_ids, MAX_TOKENS, list(model.eos_token_ids))
        assert token_ids == expected, spec
        last = responses[-1]
        stopped = expected[-1] in model.eos_token_ids
        assert last.finish_reason == (
            common_pb2.FINISH_REASON_STOP if stopped else common_pb2.FINISH_REASON_LENGTH
        )
        assert last.usage.prompt_tokens == len(prompt_ids)
        assert last.usage.completion_tokens == len(expected)
        assert text == stack.generation.Detokenize(generation_pb2.DetokenizeRequest(token_ids=token_ids)).text
    # Long prompts really spanned several blocks.
    assert max(len(_prompt_ids(stack, spec)) for spec in PROMPTS) > 4 * 16


def _settled_stats(stack: Stack) -> scheduler_pb2.SchedulerStats:
    """Stats once every block is back: a request stopped by a token may still be computed
    by the step in flight after it, which holds its blocks until it returns."""
    deadline = time.monotonic() + 10
    while True:
        stats = stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest())
        if stats.num_free_blocks == stats.num_total_blocks or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


@pytest.mark.hf
def test_concurrent_greedy_matches_hf(stack: Stack, hf_embedded_model) -> None:
    _assert_matches_hf(stack, hf_embedded_model)
    stats = _settled_stats(stack)
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_running == stats.num_waiting == 0


@pytest.mark.hf
def test_preemption_keeps_tokens_unchanged(
    embedded_model_dir: Path, hf_embedded_model, tmp_path: Path
) -> None:
    # 20 blocks of 16 tokens: the longest request fits alone, all of them together do not.
    with service_stack(embedded_model_dir, tmp_path, scheduler_args=["--num-kv-blocks", "20"]) as small:
        _assert_matches_hf(small, hf_embedded_model)
        stats = _settled_stats(small)
        assert stats.num_total_blocks == 20
        assert stats.num_preemptions > 0
        assert stats.num_free_blocks == stats.num_total_blocks


def test_cancelled_stream_returns_its_blocks(stack: Stack) -> None:
    request = generation_pb2.GenerateRequest(
        request_id="to-cancel",
        prompt=LONG_TEXT,
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True),
    )
    call = stack.generation.Generate(request, timeout=300)
    next(call)
    busy = stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest())
    assert busy.num_running == 1
    assert busy.num_free_blocks < busy.num_total_blocks
    call.cancel()
    deadline = time.monotonic() + 10
    while True:
        stats = stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest())
        if stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0:
            break
        assert time.monotonic() < deadline, f"blocks not returned: {stats}"
        time.sleep(0.05)
