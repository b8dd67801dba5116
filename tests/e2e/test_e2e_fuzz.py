"""Protobuf-level fuzzing of every method of the public API on one stack: messages with any
fields set to any values (tests/support/proto_strategies.py), and random bytes as the
payload. Every call ends with OK or a refusal that says what was wrong
(INVALID_ARGUMENT, RESOURCE_EXHAUSTED), never INTERNAL or UNKNOWN; no process crashes; and
once the calls are over no KV block is left in use. A 64-token model length, and at most
4 tokens and 2 completions for a message that passes validation, keep the requests that
get through quick on a CPU."""

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2

from tests.support.proto_strategies import messages
from tests.support.service_stack import Stack, service_stack

SERVICE = "pagedserve.v1.Generation"
# Method -> (request type, whether it streams its answer).
METHODS: dict[str, tuple[type[Message], bool]] = {
    "Generate": (generation_pb2.GenerateRequest, True),
    "Tokenize": (generation_pb2.TokenizeRequest, False),
    "Detokenize": (generation_pb2.DetokenizeRequest, False),
    "GetModelInfo": (common_pb2.GetModelInfoRequest, False),
}
EXAMPLES = {"Generate": 800, "Tokenize": 400, "Detokenize": 400, "GetModelInfo": 50}
RANDOM_PAYLOADS_PER_METHOD = 250
EXPLICIT_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
CALL_TIMEOUT_S = 120


def _fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
    )


@pytest.fixture(scope="module")
def fuzz_stack(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    with service_stack(
        embedded_model_dir, tmp_path_factory.mktemp("grpc-fuzz"), worker_args=["--max-model-len", "64"]
    ) as running:
        yield running


@pytest.fixture(scope="module")
def channel(fuzz_stack: Stack) -> grpc.Channel:
    with grpc.insecure_channel(fuzz_stack.public_address) as open_channel:
        yield open_channel


def _caller(channel: grpc.Channel, method: str) -> Callable[[bytes], grpc.StatusCode]:
    """Sends serialized bytes to `method`, reads the whole answer, returns the status."""
    path = f"/{SERVICE}/{method}"
    streams = METHODS[method][1]
    call = channel.unary_stream(path) if streams else channel.unary_unary(path)

    def send(payload: bytes) -> grpc.StatusCode:
        try:
            answer = call(payload, timeout=CALL_TIMEOUT_S)
            if streams:
                list(answer)
        except grpc.RpcError as error:
            assert error.code() in EXPLICIT_REFUSALS, f"{method}: {error.code().name}: {error.details()}"
            assert error.details(), f"{method}: {error.code().name} without a message"
            return error.code()
        return grpc.StatusCode.OK

    return send


def _outcomes(
    channel: grpc.Channel,
    method: str,
    examples: int,
    payloads: st.SearchStrategy[Any],
    serialize: Callable[[Any], bytes],
) -> Counter[str]:
    """How many of `examples` calls of `method`, each with a payload drawn from `payloads`,
    ended with each status code."""
    send = _caller(channel, method)
    outcomes: Counter[str] = Counter()

    @_fuzz_settings(examples)
    @given(payloads)
    def fuzz(payload: Any) -> None:
        outcomes[send(serialize(payload)).name] += 1

    fuzz()
    return outcomes


def _quick(request: Message) -> Message:
    """Bounds what makes a request that passes validation slow on a CPU: at most 4 tokens
    (the default is all the model length leaves) and 2 completions. Values validation
    refuses are left as drawn."""
    if isinstance(request, generation_pb2.GenerateRequest):
        sampling = request.sampling
        if not sampling.HasField("max_tokens") or 4 < sampling.max_tokens <= 64:
            sampling.max_tokens = 4
        if 2 < sampling.n <= 16:
            sampling.n = 2
    return request


def _assert_no_block_in_use(stack: Stack) -> None:
    # Blocks come free once the steps in flight that used them return.
    deadline = time.monotonic() + 30
    while True:
        stats = stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest())
        idle = (stats.num_running, stats.num_waiting, stats.num_swapped) == (0, 0, 0)
        if idle and stats.num_free_blocks == stats.num_total_blocks:
            return
        assert time.monotonic() < deadline, f"blocks still in use after the calls ended: {stats}"
        time.sleep(0.1)


def _assert_unharmed(stack: Stack) -> None:
    """What fuzzing must leave: every KV block free and every service process running."""
    _assert_no_block_in_use(stack)
    assert all(process.poll() is None for process in stack.processes.values())


@pytest.mark.parametrize("method", METHODS)
def test_fuzzed_messages_get_an_answer_or_an_explicit_refusal(
    fuzz_stack: Stack, channel: grpc.Channel, method: str
) -> None:
    outcomes = _outcomes(
        channel,
        method,
        EXAMPLES[method],
        messages(METHODS[method][0]),
        lambda request: _quick(request).SerializeToString(),
    )
    print(f"{method}: {dict(outcomes)}")
    if METHODS[method][0].DESCRIPTOR.fields:
        # Distinct messages (one with no fields has a single form).
        assert sum(outcomes.values()) >= EXAMPLES[method] // 2
    if method != "GetModelInfo":
        # The strategies reach past validation as well as into it.
        assert outcomes["OK"] and outcomes["INVALID_ARGUMENT"], outcomes
    _assert_unharmed(fuzz_stack)


@pytest.mark.parametrize("method", METHODS)
def test_random_bytes_get_an_answer_or_an_explicit_refusal(
    fuzz_stack: Stack, channel: grpc.Channel, method: str
) -> None:
    outcomes = _outcomes(channel, method, RANDOM_PAYLOADS_PER_METHOD, st.binary(max_size=256), bytes)
    print(f"{method} (random bytes): {dict(outcomes)}")
    _assert_unharmed(fuzz_stack)


def test_still_serving_after_fuzzing(fuzz_stack: Stack) -> None:
    request = generation_pb2.GenerateRequest(prompt="Hi", sampling=common_pb2.SamplingParams(max_tokens=3))
    final = list(fuzz_stack.generation.Generate(request, timeout=CALL_TIMEOUT_S))[-1]
    assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
