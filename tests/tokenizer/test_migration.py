"""A request moved between engines mid-stream: what the next engine gets, and that the
client's stream, spliced from several engines, is the stream of an undisturbed run."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pagedserve.v1 import common_pb2, scheduler_pb2

from services.common.errors import InvalidArgumentError, RemoteError, UnavailableError
from services.tokenizer.migration import MigrationConfig, ResumableRequest, is_engine_failure
from services.tokenizer.routing import NoEngineError

PROMPT = [5, 6, 7]


def _submit(max_tokens: int, min_tokens: int = 0, n: int = 1) -> scheduler_pb2.SubmitRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, seed=9, n=n)
    return scheduler_pb2.SubmitRequest(request_id="r", prompt_token_ids=PROMPT, sampling=sampling)


def _next_token(sequence: list[int]) -> int:
    """A deterministic model: greedy decoding is a function of the whole sequence."""
    return (sum(t * (i + 1) for i, t in enumerate(sequence)) * 31 + len(sequence)) % 1000


def _engine_outputs(
    submit: scheduler_pb2.SubmitRequest, chunks: list[int]
) -> list[scheduler_pb2.SubmitResponse]:
    """What an engine streams for `submit`: its tokens in messages of `chunks` tokens,
    up to its max_tokens."""
    sequence = list(submit.prompt_token_ids)
    left = submit.sampling.max_tokens
    outputs = []
    for size in chunks:
        size = min(size, left)
        if size == 0:
            break
        tokens = []
        for _ in range(size):
            tokens.append(_next_token(sequence))
            sequence.append(tokens[-1])
        left -= size
        outputs.append(scheduler_pb2.SubmitResponse(token_ids=tokens))
    return outputs


def test_the_next_engine_continues_from_the_streamed_tokens():
    request = ResumableRequest(_submit(max_tokens=10, min_tokens=4), MigrationConfig())
    assert request.submit_request().prompt_token_ids == PROMPT
    request.on_output(scheduler_pb2.SubmitResponse(token_ids=[1, 2, 3]))
    request.migrate(UnavailableError("stream broke"))
    resumed = request.submit_request()
    assert list(resumed.prompt_token_ids) == [*PROMPT, 1, 2, 3]
    assert resumed.num_resumed_tokens == 3
    assert (resumed.sampling.max_tokens, resumed.sampling.min_tokens, resumed.sampling.seed) == (7, 1, 9)


def test_past_the_limit_the_request_fails_naming_it():
    request = ResumableRequest(_submit(max_tokens=10), MigrationConfig(max_migrations=1))
    request.migrate(UnavailableError("first"))
    with pytest.raises(UnavailableError, match="moved to another engine 1 times, the limit"):
        request.migrate(UnavailableError("second"))


def test_a_request_of_several_completions_does_not_move_mid_stream():
    request = ResumableRequest(_submit(max_tokens=10, n=2), MigrationConfig())
    request.on_output(scheduler_pb2.SubmitResponse(token_ids=[1]))
    with pytest.raises(UnavailableError, match="n=2"):
        request.migrate(UnavailableError("stream broke"))


def test_only_engine_failures_move_a_request():
    assert is_engine_failure(UnavailableError("stream broke"))
    assert is_engine_failure(RemoteError(14, "worker rank 0 failed"))
    assert not is_engine_failure(RemoteError(3, "bad"))
    assert not is_engine_failure(InvalidArgumentError("x", "bad"))
    assert not is_engine_failure(NoEngineError("none"))


@given(
    max_tokens=st.integers(1, 40),
    runs=st.lists(st.lists(st.integers(1, 5), max_size=12), min_size=1, max_size=4),
)
def test_the_spliced_stream_equals_an_undisturbed_one(max_tokens, runs):
    """Each run: an engine streams messages of the given sizes, then fails (or, for the
    last run, finishes). The client's tokens are those of one engine running throughout."""
    undisturbed = [t for o in _engine_outputs(_submit(max_tokens), [max_tokens]) for t in o.token_ids]
    request = ResumableRequest(_submit(max_tokens), MigrationConfig(max_migrations=len(runs)))
    client: list[int] = []
    for chunks in runs:
        for output in _engine_outputs(request.submit_request(), chunks):
            request.on_output(output)
            client.extend(output.token_ids)
        if len(client) == max_tokens:
            break
        request.migrate(UnavailableError("engine failed"))
    for output in _engine_outputs(request.submit_request(), [max_tokens]):
        if len(client) < max_tokens:
            request.on_output(output)
            client.extend(output.token_ids)
    assert client == undisturbed
    assert request.generated == undisturbed
