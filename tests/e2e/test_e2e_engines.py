"""Two engines behind two tokenizer processes on one port (`pagedserve serve --engines 2
--tokenizers 2`), on CPU with the embedded model: repeats of a long prompt meet their
cached prefix whichever tokenizer serves them, distinct concurrent prompts spread over
both engines, and when one engine's worker is killed mid-stream its requests move to the
other and finish with exactly the tokens of an undisturbed run."""

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from tests.support.service_stack import Stack, service_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BLOCK_SIZE = 16
LONG_TEXT = (
    "Paged attention stores the key and value vectors of every sequence in fixed-size "
    "blocks, so that memory is allocated on demand and shared between sequences. " * 3
)


@pytest.fixture(scope="module")
def engines_stack(embedded_model_dir: Path, tmp_path_factory):
    flags = ["--engines", "2", "--tokenizers", "2"]
    with service_stack(embedded_model_dir, tmp_path_factory.mktemp("engines"), serve_flags=flags) as stack:
        yield stack


def _stats(address: str) -> scheduler_pb2.SchedulerStats:
    with grpc.insecure_channel(address) as channel:
        return scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)


def _generate_on_new_connection(stack: Stack, request: generation_pb2.GenerateRequest) -> list:
    """A connection of its own, which the kernel gives to either tokenizer process."""
    with grpc.insecure_channel(stack.public_address) as channel:
        return list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=300))


def _greedy(max_tokens: int, **prompt) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return generation_pb2.GenerateRequest(sampling=sampling, **prompt)


def test_repeats_of_a_long_prompt_find_it_cached(engines_stack: Stack):
    request = _greedy(4, prompt=LONG_TEXT)
    usages = [_generate_on_new_connection(engines_stack, request)[-1].usage for _ in range(4)]
    full_blocks = (usages[0].prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert full_blocks >= 3 * BLOCK_SIZE
    assert [usage.cached_tokens >= full_blocks for usage in usages[1:]] == [True] * 3, usages


def test_distinct_concurrent_prompts_use_both_engines(engines_stack: Stack):
    before = [_stats(address).num_prompt_tokens for address in engines_stack.scheduler_addresses]
    requests = [_greedy(8, prompt=f"Request {i}: tell me about the number {i * 7919}.") for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda r: _generate_on_new_connection(engines_stack, r), requests))
    assert all(sum(len(m.token_ids) for m in messages) == 8 for messages in results)
    after = [_stats(address).num_prompt_tokens for address in engines_stack.scheduler_addresses]
    assert len(after) == 2
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def _stream(stack: Stack, request: generation_pb2.GenerateRequest, started: threading.Barrier) -> list[int]:
    tokens: list[int] = []
    for message in stack.generation.Generate(request, timeout=300):
        if not tokens and message.token_ids:
            started.wait(timeout=120)
        tokens.extend(message.token_ids)
    return tokens


def test_a_killed_worker_moves_its_requests_to_the_other_engine(engines_stack: Stack):
    max_tokens = 32
    requests = [
        _greedy(max_tokens, prompt=f"Story {i}: once upon a time, a {word}")
        for i, word in enumerate(["cat", "dog", "king", "river", "robot", "tree", "ship", "star"])
    ]
    with ThreadPoolExecutor(8) as pool:
        undisturbed = list(pool.map(lambda r: _collect_tokens(engines_stack, r), requests))
    assert all(len(tokens) == max_tokens for tokens in undisturbed)
    # Every stream has its first tokens before the kill; the kill comes with them still going.
    started = threading.Barrier(len(requests) + 1)
    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(_stream, engines_stack, request, started) for request in requests]
        started.wait(timeout=120)
        engines_stack.processes["engine1-worker"].kill()
        disturbed = [stream.result() for stream in streams]
    assert disturbed == undisturbed
    assert (
        "failed"
        in (engines_stack.log_dir / "tokenizer.log").read_text()
        + (engines_stack.log_dir / "tokenizer1.log").read_text()
    )


def _collect_tokens(stack: Stack, request: generation_pb2.GenerateRequest) -> list[int]:
    return [t for message in stack.generation.Generate(request, timeout=300) for t in message.token_ids]
