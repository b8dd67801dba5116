import math
from collections.abc import Callable
from typing import Any

import pytest
from pagedserve.v1 import common_pb2, generation_pb2

from services.common.errors import InvalidArgumentError
from services.common.prompt_checks import check_prompt_length, check_token_ids
from services.tokenizer.frontend import FrontendConfig, RequestFrontend
from services.tokenizer.tokenizer import TextTokenizer
from services.tokenizer.validation import (
    ChatPrompt,
    SamplingLimits,
    TextPrompt,
    TokenIdsPrompt,
    prompt_source,
    validate_sampling,
)
from tests.support.small_tokenizer import write_model_dir

VOCAB_SIZE = 1000


def raised(function: Callable[..., Any], *args: Any, **kwargs: Any) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as caught:
        function(*args, **kwargs)
    return caught.value


# prompt_source


def test_each_prompt_form_is_recognised() -> None:
    assert prompt_source(generation_pb2.GenerateRequest(prompt="hi")) == TextPrompt("hi")
    assert prompt_source(generation_pb2.GenerateRequest(prompt_token_ids=[1, 2])) == TokenIdsPrompt((1, 2))
    request = generation_pb2.GenerateRequest(messages=[generation_pb2.ChatMessage(role="user", content="hi")])
    assert prompt_source(request) == ChatPrompt((("user", "hi"),))


def test_missing_prompt() -> None:
    error = raised(prompt_source, generation_pb2.GenerateRequest())
    assert error.field == "prompt"
    assert "prompt_token_ids" in str(error) and "messages" in str(error)


@pytest.mark.parametrize(
    ("request_fields", "second", "named"),
    [
        ({"prompt": "a", "prompt_token_ids": [1]}, "prompt_token_ids", "prompt and prompt_token_ids"),
        (
            {"prompt": "a", "messages": [generation_pb2.ChatMessage(role="user")]},
            "messages",
            "prompt and messages",
        ),
        (
            {"prompt": "a", "prompt_token_ids": [1], "messages": [generation_pb2.ChatMessage(role="user")]},
            "prompt_token_ids",
            "prompt, prompt_token_ids and messages",
        ),
    ],
)
def test_more_than_one_prompt_form_names_them(request_fields: dict, second: str, named: str) -> None:
    error = raised(prompt_source, generation_pb2.GenerateRequest(**request_fields))
    assert error.field == second
    assert str(error).endswith(f"got {named}")


# validate_sampling


def test_default_sampling_is_valid() -> None:
    validate_sampling(common_pb2.SamplingParams(), VOCAB_SIZE)
    validate_sampling(
        common_pb2.SamplingParams(
            temperature=0, top_p=1, top_k=-1, max_tokens=1, stop=["x"], stop_token_ids=[0, 999]
        ),
        VOCAB_SIZE,
    )


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ({"temperature": -0.5}, "sampling.temperature: must be a finite number >= 0, got -0.5"),
        ({"temperature": math.nan}, "sampling.temperature: must be a finite number >= 0, got nan"),
        ({"temperature": math.inf}, "sampling.temperature: must be a finite number >= 0, got inf"),
        ({"top_p": 1.5}, "sampling.top_p: must be in (0, 1], got 1.5"),
        ({"top_p": 0}, "sampling.top_p: must be in (0, 1], got 0"),
        ({"top_p": math.nan}, "sampling.top_p: must be in (0, 1], got nan"),
        ({"top_k": -2}, "sampling.top_k: must be -1 or 0 (off) or positive, got -2"),
        ({"max_tokens": 0}, "sampling.max_tokens: must be at least 1, got 0"),
        ({"max_tokens": -3}, "sampling.max_tokens: must be at least 1, got -3"),
        ({"stop": ["ok", ""]}, "sampling.stop[1]: must not be empty"),
        ({"stop": ["s"] * 17}, "sampling.stop: at most 16 stop strings are allowed, got 17"),
        ({"stop": ["x" * 257]}, "sampling.stop[0]: must be at most 256 characters, got 257"),
        ({"stop_token_ids": [5, 1000]}, "sampling.stop_token_ids[1]: must be in [0, 1000), got 1000"),
        ({"stop_token_ids": [-1]}, "sampling.stop_token_ids[0]: must be in [0, 1000), got -1"),
        (
            {"stop_token_ids": [1] * 65},
            "sampling.stop_token_ids: at most 64 stop token ids are allowed, got 65",
        ),
        ({"n": 0}, "sampling.n: must be in [1, 16], got 0"),
        ({"n": 17}, "sampling.n: must be in [1, 16], got 17"),
    ],
)
def test_bad_sampling_names_field_and_limit(sampling: dict, expected: str) -> None:
    error = raised(validate_sampling, common_pb2.SamplingParams(**sampling), VOCAB_SIZE)
    assert str(error) == expected
    assert expected.startswith(error.field + ":")


def test_sampling_limits_are_configurable() -> None:
    limits = SamplingLimits(max_stop_strings=2)
    error = raised(validate_sampling, common_pb2.SamplingParams(stop=["a", "b", "c"]), VOCAB_SIZE, limits)
    assert "at most 2" in str(error)


# check_token_ids


def test_token_ids_in_range() -> None:
    check_token_ids([], VOCAB_SIZE, "prompt_token_ids")
    check_token_ids([0, VOCAB_SIZE - 1], VOCAB_SIZE, "prompt_token_ids")
    error = raised(check_token_ids, [0, 3, VOCAB_SIZE, -1], VOCAB_SIZE, "prompt_token_ids")
    assert str(error) == "prompt_token_ids[2]: must be in [0, 1000), got 1000"


# check_prompt_length


def test_max_tokens_defaults_to_the_room_left() -> None:
    assert check_prompt_length(10, common_pb2.SamplingParams(), max_model_len=64) == 54
    assert check_prompt_length(10, common_pb2.SamplingParams(max_tokens=54), max_model_len=64) == 54
    assert check_prompt_length(10, common_pb2.SamplingParams(max_tokens=5), max_model_len=64) == 5


def test_prompt_plus_max_tokens_over_the_model_length() -> None:
    error = raised(check_prompt_length, 10, common_pb2.SamplingParams(max_tokens=55), max_model_len=64)
    assert error.field == "sampling.max_tokens"
    assert "10" in str(error) and "55" in str(error) and "65" in str(error) and "64" in str(error)


@pytest.mark.parametrize("num_prompt_tokens", [64, 100])
def test_prompt_that_leaves_no_room(num_prompt_tokens: int) -> None:
    error = raised(
        check_prompt_length, num_prompt_tokens, common_pb2.SamplingParams(), 64, "prompt_token_ids"
    )
    assert error.field == "prompt_token_ids"
    assert str(num_prompt_tokens) in str(error) and "64" in str(error)


def test_empty_prompt_after_tokenization() -> None:
    error = raised(check_prompt_length, 0, common_pb2.SamplingParams(), 64, "messages")
    assert str(error) == "messages: has no tokens"


# The frontend, end to end over the small tokenizer


@pytest.fixture(scope="module")
def frontend(tmp_path_factory: pytest.TempPathFactory) -> RequestFrontend:
    tokenizer = TextTokenizer.from_model_dir(write_model_dir(tmp_path_factory.mktemp("small_model")))
    return RequestFrontend(tokenizer, FrontendConfig(max_model_len=64, vocab_size=tokenizer.vocab_size))


def test_prepare_text_prompt(frontend: RequestFrontend) -> None:
    request = generation_pb2.GenerateRequest(
        request_id="r1", prompt="Hello world", sampling={"temperature": 0}
    )
    prepared = frontend.prepare_generate(request)
    assert prepared.request_id == "r1"
    assert prepared.prompt_token_ids == frontend.tokenizer.encode("Hello world")
    assert prepared.sampling.max_tokens == 64 - len(prepared.prompt_token_ids)
    assert prepared.sampling.HasField("temperature") and prepared.sampling.temperature == 0
    # The caller's message is left as it was.
    assert not request.sampling.HasField("max_tokens")


def test_prepare_chat_prompt_and_generated_request_ids(frontend: RequestFrontend) -> None:
    request = generation_pb2.GenerateRequest(messages=[generation_pb2.ChatMessage(role="user", content="hi")])
    first, second = frontend.prepare_generate(request), frontend.prepare_generate(request)
    expected = frontend.tokenizer.encode(frontend.tokenizer.render_chat([("user", "hi")]))
    assert first.prompt_token_ids == expected
    assert first.request_id and first.request_id != second.request_id


def test_prepare_token_ids_prompt(frontend: RequestFrontend) -> None:
    request = generation_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7], sampling={"max_tokens": 3})
    prepared = frontend.prepare_generate(request)
    assert prepared.prompt_token_ids == [5, 6, 7]
    assert prepared.sampling.max_tokens == 3


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"prompt_token_ids": [1, 420]}, "prompt_token_ids[1]"),
        ({"prompt": "x" * 80}, "prompt"),
        ({"prompt": "hi", "sampling": {"max_tokens": 64}}, "sampling.max_tokens"),
        ({"prompt": "hi", "sampling": {"top_p": 2}}, "sampling.top_p"),
        ({"messages": [generation_pb2.ChatMessage(role="bot", content="hi")]}, "messages[0].role"),
        ({"request_id": "r" * 257, "prompt": "hi"}, "request_id"),
    ],
)
def test_prepare_rejects_bad_requests(frontend: RequestFrontend, request_fields: dict, field: str) -> None:
    error = raised(frontend.prepare_generate, generation_pb2.GenerateRequest(**request_fields))
    assert error.field == field


def test_tokenize_and_detokenize(frontend: RequestFrontend) -> None:
    response = frontend.tokenize(generation_pb2.TokenizeRequest(text="hi<|im_end|>"))
    assert response.text == "hi<|im_end|>"
    user_hi = generation_pb2.ChatMessage(role="user", content="hi")
    chat = frontend.tokenize(generation_pb2.TokenizeRequest(messages=[user_hi]))
    assert chat.text == frontend.tokenizer.render_chat([("user", "hi")])
    assert list(chat.token_ids) == frontend.tokenizer.encode(chat.text)

    # skip_special_tokens unset means true.
    assert frontend.detokenize(generation_pb2.DetokenizeRequest(token_ids=response.token_ids)).text == "hi"
    kept = generation_pb2.DetokenizeRequest(token_ids=response.token_ids, skip_special_tokens=False)
    assert frontend.detokenize(kept).text == "hi<|im_end|>"
    assert (
        raised(frontend.detokenize, generation_pb2.DetokenizeRequest(token_ids=[-5])).field == "token_ids[0]"
    )
    both = generation_pb2.TokenizeRequest(
        text="a", messages=[generation_pb2.ChatMessage(role="user", content="b")]
    )
    assert raised(frontend.tokenize, both).field == "messages"


def test_new_detokenizer_applies_stop_strings(frontend: RequestFrontend) -> None:
    detokenizer = frontend.new_detokenizer(common_pb2.SamplingParams(stop=["world"]))
    assert detokenizer.add(frontend.tokenizer.encode("Hello world")) == "Hello "
    assert detokenizer.stopped


# min_p and logit_bias


@pytest.mark.parametrize("min_p", [-0.1, 1.5, math.nan])
def test_min_p_outside_zero_one_is_refused(min_p: float) -> None:
    error = raised(validate_sampling, common_pb2.SamplingParams(min_p=min_p), VOCAB_SIZE)
    assert error.field == "sampling.min_p"
    assert "[0, 1]" in str(error)


@pytest.mark.parametrize(
    ("logit_bias", "field", "limit"),
    [
        ({VOCAB_SIZE: 1.0}, f"sampling.logit_bias[{VOCAB_SIZE}]", f"[0, {VOCAB_SIZE})"),
        ({-1: 1.0}, "sampling.logit_bias[-1]", f"[0, {VOCAB_SIZE})"),
        ({5: 100.5}, "sampling.logit_bias[5]", "[-100, 100]"),
        ({5: math.nan}, "sampling.logit_bias[5]", "[-100, 100]"),
    ],
)
def test_bad_logit_bias_is_refused_naming_the_token(logit_bias: dict, field: str, limit: str) -> None:
    error = raised(validate_sampling, common_pb2.SamplingParams(logit_bias=logit_bias), VOCAB_SIZE)
    assert error.field == field
    assert limit in str(error)


def test_too_many_logit_bias_entries_are_refused() -> None:
    limits = SamplingLimits(max_logit_bias_entries=2)
    sampling = common_pb2.SamplingParams(logit_bias={1: 1.0, 2: 1.0, 3: 1.0})
    error = raised(validate_sampling, sampling, VOCAB_SIZE, limits)
    assert error.field == "sampling.logit_bias"
    validate_sampling(
        common_pb2.SamplingParams(logit_bias={1: -100.0, 2: 100.0}, min_p=0.1), VOCAB_SIZE, limits
    )


@pytest.mark.parametrize(
    ("fields", "field", "limit"),
    [
        ({"presence_penalty": 2.5}, "sampling.presence_penalty", "[-2, 2]"),
        ({"frequency_penalty": -3.0}, "sampling.frequency_penalty", "[-2, 2]"),
        ({"frequency_penalty": math.nan}, "sampling.frequency_penalty", "[-2, 2]"),
        ({"repetition_penalty": 0.0}, "sampling.repetition_penalty", "(0, 2]"),
        ({"repetition_penalty": 2.5}, "sampling.repetition_penalty", "(0, 2]"),
        ({"logprobs": 21}, "sampling.logprobs", "[0, 20]"),
    ],
)
def test_penalties_and_logprobs_out_of_range_are_refused(fields: dict, field: str, limit: str) -> None:
    error = raised(validate_sampling, common_pb2.SamplingParams(**fields), VOCAB_SIZE)
    assert error.field == field
    assert limit in str(error)


def test_min_tokens_must_not_exceed_max_tokens() -> None:
    error = raised(validate_sampling, common_pb2.SamplingParams(min_tokens=5, max_tokens=4), VOCAB_SIZE)
    assert error.field == "sampling.min_tokens"
    validate_sampling(common_pb2.SamplingParams(min_tokens=4, max_tokens=4), VOCAB_SIZE)


def test_texts_too_long_to_fit_a_sequence_are_refused_before_tokenizing(frontend: RequestFrontend) -> None:
    limit = 64 * frontend.tokenizer.max_token_chars
    assert frontend.tokenizer.max_token_chars >= max(len(frontend.tokenizer.decode([i])) for i in range(100))
    too_long = "a" * (limit + 1)
    error = raised(frontend.prepare_generate, generation_pb2.GenerateRequest(prompt=too_long))
    assert str(error) == (
        f"prompt: has {limit + 1} characters, more than the {limit} that can fit a sequence "
        f"(64 tokens of at most {frontend.tokenizer.max_token_chars} characters each)"
    )
    chat = [generation_pb2.ChatMessage(role="user", content=too_long)]
    assert (
        raised(frontend.prepare_generate, generation_pb2.GenerateRequest(messages=chat)).field == "messages"
    )
    assert raised(frontend.tokenize, generation_pb2.TokenizeRequest(text=too_long)).field == "text"
    assert raised(frontend.tokenize, generation_pb2.TokenizeRequest(messages=chat)).field == "messages"
    # At the bound the text is tokenized, and then found too long in tokens.
    assert (
        raised(frontend.prepare_generate, generation_pb2.GenerateRequest(prompt="a" * limit)).field
        == "prompt"
    )


def test_detokenize_takes_at_most_a_sequences_ids(frontend: RequestFrontend) -> None:
    assert frontend.detokenize(generation_pb2.DetokenizeRequest(token_ids=[5] * 64)).text
    error = raised(frontend.detokenize, generation_pb2.DetokenizeRequest(token_ids=[5] * 65))
    assert str(error) == "token_ids: at most 64 ids (the longest sequence) are allowed, got 65"
