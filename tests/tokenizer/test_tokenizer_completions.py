"""The tokenizer service's side of n completions: one text stream per index, each with its
own stop strings and usage, the request done when all are."""

import pytest
from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2

from services.common.errors import UnavailableError
from services.tokenizer.frontend import FrontendConfig, RequestFrontend
from services.tokenizer.tokenizer import TextTokenizer
from tests.support.small_tokenizer import write_model_dir

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH


@pytest.fixture(scope="module")
def frontend(tmp_path_factory: pytest.TempPathFactory) -> RequestFrontend:
    tokenizer = TextTokenizer.from_model_dir(write_model_dir(tmp_path_factory.mktemp("small_model")))
    return RequestFrontend(tokenizer, FrontendConfig(max_model_len=64, vocab_size=tokenizer.vocab_size))


def _response(
    frontend: RequestFrontend, text: str, index: int, finish_reason: int = 0, cached_tokens: int = 0
) -> scheduler_pb2.SubmitResponse:
    response = scheduler_pb2.SubmitResponse(
        token_ids=frontend.tokenizer.encode(text), index=index, finish_reason=finish_reason
    )
    response.usage.cached_tokens = cached_tokens
    return response


def test_each_completion_streams_and_finishes_on_its_own(frontend: RequestFrontend) -> None:
    request = generation_pb2.GenerateRequest(
        request_id="r", prompt="Hello", sampling=common_pb2.SamplingParams(n=2, stop=["world"], max_tokens=9)
    )
    completions = frontend.new_completions(frontend.prepare_generate(request))
    first = completions.on_tokens(_response(frontend, "Hello", 1))
    assert first is not None and (first.index, first.text) == (1, "Hello")
    # A stop string ends completion 0; what the scheduler still sends for it is dropped.
    stopped = completions.on_tokens(_response(frontend, "Hi world", 0, cached_tokens=3))
    assert stopped is not None and stopped.index == 0 and stopped.finish_reason == STOP
    assert stopped.text == "Hi " and stopped.usage.cached_tokens == 3
    assert completions.on_tokens(_response(frontend, "more", 0)) is None
    assert not completions.finished
    last = completions.on_tokens(_response(frontend, " there", 1, finish_reason=LENGTH, cached_tokens=3))
    assert last is not None and last.index == 1 and last.finish_reason == LENGTH
    assert (last.usage.prompt_tokens, last.usage.cached_tokens) == (
        len(frontend.tokenizer.encode("Hello")),
        3,
    )
    assert last.usage.completion_tokens == len(frontend.tokenizer.encode("Hello")) + len(
        frontend.tokenizer.encode(" there")
    )
    assert completions.finished


def test_a_completion_index_out_of_range_is_the_peers_fault(frontend: RequestFrontend) -> None:
    completions = frontend.new_completions(
        frontend.prepare_generate(generation_pb2.GenerateRequest(prompt="Hi"))
    )
    with pytest.raises(UnavailableError):
        completions.on_tokens(_response(frontend, "x", 1))
