"""Bad input through the public API: INVALID_ARGUMENT naming the field and the limit, and
the server keeps serving."""

import grpc
import pytest
from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2

from tests.support.service_stack import Stack


def _sampling(**fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**fields)


def _hello(**sampling) -> generation_pb2.GenerateRequest:
    """The prompt "Hello" with the sampling fields given: each case sets one out of bounds."""
    return generation_pb2.GenerateRequest(prompt="Hello", sampling=_sampling(**sampling))


BAD_REQUESTS = {
    "no prompt": (generation_pb2.GenerateRequest(), ["prompt"]),
    "prompt and token ids": (
        generation_pb2.GenerateRequest(prompt="Hello", prompt_token_ids=[1, 2]),
        ["prompt", "prompt_token_ids"],
    ),
    "too long for the model": (_hello(max_tokens=9000), ["max_tokens", "8192"]),
    "max_tokens zero": (_hello(max_tokens=0), ["sampling.max_tokens", "1"]),
    "max_tokens negative": (_hello(max_tokens=-3), ["sampling.max_tokens"]),
    "negative temperature": (_hello(temperature=-0.5), ["sampling.temperature", "0"]),
    "top_p zero": (_hello(top_p=0.0), ["sampling.top_p", "(0, 1]"]),
    "top_p above one": (_hello(top_p=1.5), ["sampling.top_p", "(0, 1]"]),
    "top_k below -1": (_hello(top_k=-2), ["sampling.top_k", "-1"]),
    "token id past the vocabulary": (
        generation_pb2.GenerateRequest(prompt_token_ids=[1, 49152]),
        ["prompt_token_ids[1]", "49152"],
    ),
    "negative token id": (generation_pb2.GenerateRequest(prompt_token_ids=[-1]), ["prompt_token_ids[0]"]),
    "unknown chat role": (
        generation_pb2.GenerateRequest(messages=[generation_pb2.ChatMessage(role="wizard", content="hi")]),
        ["messages[0].role", "user"],
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_invalid_argument(stack: Stack, case: str) -> None:
    request, expected_words = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as raised:
        list(stack.generation.Generate(request, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in expected_words:
        assert word in raised.value.details()


@pytest.mark.parametrize(
    "field_bytes, field",
    [
        (generation_pb2.GenerateRequest(prompt="XX"), "prompt"),
        (
            generation_pb2.GenerateRequest(messages=[generation_pb2.ChatMessage(role="user", content="XX")]),
            "messages[0].content",
        ),
    ],
)
def test_invalid_utf8_names_the_field(stack: Stack, field_bytes, field: str) -> None:
    # Python's protobuf refuses to build such a message, so the bytes are patched on the wire.
    raw = field_bytes.SerializeToString().replace(b"XX", b"\xff\xfe")
    with grpc.insecure_channel(stack.public_address) as channel:
        generate = channel.unary_stream(
            "/pagedserve.v1.Generation/Generate",
            request_serializer=lambda data: data,
            response_deserializer=generation_pb2.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as raised:
            list(generate(raw, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"{field}:")
    assert "UTF-8" in raised.value.details()


def test_good_request_after_bad_ones(stack: Stack) -> None:
    for request, _ in BAD_REQUESTS.values():
        with pytest.raises(grpc.RpcError):
            list(stack.generation.Generate(request, timeout=30))
    responses = list(
        stack.generation.Generate(
            generation_pb2.GenerateRequest(
                prompt="The capital of France is", sampling=_sampling(temperature=0, max_tokens=5)
            ),
            timeout=60,
        )
    )
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert responses[-1].usage.completion_tokens == 5
    stats = stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest())
    assert stats.num_free_blocks == stats.num_total_blocks


def test_scheduler_refuses_bad_token_ids_itself(stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        list(
            stack.scheduler.Submit(
                scheduler_pb2.SubmitRequest(request_id="x", prompt_token_ids=[5, 10**6]), timeout=30
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_token_ids[1]" in raised.value.details()


def test_a_request_id_already_in_flight_is_refused(stack: Stack) -> None:
    running = stack.generation.Generate(
        generation_pb2.GenerateRequest(
            request_id="twice",
            prompt="Count to a thousand:",
            sampling=_sampling(max_tokens=2000, ignore_eos=True),
        ),
        timeout=120,
    )
    next(running)  # it is in flight now
    with pytest.raises(grpc.RpcError) as raised:
        list(
            stack.generation.Generate(
                generation_pb2.GenerateRequest(request_id="twice", prompt="Hi"), timeout=30
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("request_id:")
    running.cancel()
