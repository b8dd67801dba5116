"""What the public API's handlers do before and after talking to the scheduler, as plain
methods over protobuf messages, so that the servicer only forwards calls."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from pagedserve.v1 import common_pb2, generation_pb2

from services.common.errors import InvalidArgumentError
from services.common.prompt_checks import check_prompt_length, check_token_ids
from services.common.structured_output import check_structured_output
from services.tokenizer.completion import Completions
from services.tokenizer.detokenizer import IncrementalDetokenizer
from services.tokenizer.sampling_defaults import apply_sampling_defaults
from services.tokenizer.tokenizer import TextTokenizer
from services.tokenizer.validation import (
    ChatPrompt,
    SamplingLimits,
    TextPrompt,
    check_request_id,
    check_text_fits,
    prompt_source,
    validate_sampling,
)


@dataclass(frozen=True)
class FrontendConfig:
    # Longest sequence, prompt and completion together, in tokens.
    max_model_len: int
    # Valid token ids are [0, vocab_size): the rows of the model's embedding, which may
    # exceed the tokenizer's vocabulary.
    vocab_size: int
    sampling_limits: SamplingLimits = field(default_factory=SamplingLimits)
    max_request_id_chars: int = 256
    # Used where a request leaves a field unset: the model's generation_config.json.
    sampling_defaults: common_pb2.SamplingParams = field(default_factory=common_pb2.SamplingParams)


@dataclass(frozen=True)
class PreparedRequest:
    """A validated Generate request, ready for the scheduler."""

    request_id: str
    prompt_token_ids: list[int]
    # The request's sampling with max_tokens always set, to the number of tokens the
    # request may actually generate.
    sampling: common_pb2.SamplingParams


class RequestFrontend:
    def __init__(self, tokenizer: TextTokenizer, config: FrontendConfig) -> None:
        self._tokenizer = tokenizer
        self._config = config

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._tokenizer

    def prepare_generate(self, request: generation_pb2.GenerateRequest) -> PreparedRequest:
        """Validates the request and tokenizes its prompt; raises InvalidArgumentError."""
        request_id = request.request_id if request.request_id else uuid.uuid4().hex
        check_request_id(request_id, self._config.max_request_id_chars)
        source = prompt_source(request)
        validate_sampling(request.sampling, self._config.vocab_size, self._config.sampling_limits)
        if request.sampling.HasField("structured_output"):
            check_structured_output(request.sampling.structured_output)
        if isinstance(source, TextPrompt):
            prompt_token_ids = self._encode(source.text, source.field)
        elif isinstance(source, ChatPrompt):
            prompt_token_ids = self._encode(self._render_chat(source.messages), source.field)
        else:
            check_token_ids(source.token_ids, self._config.vocab_size, source.field)
            prompt_token_ids = list(source.token_ids)
        max_tokens = check_prompt_length(
            len(prompt_token_ids), request.sampling, self._config.max_model_len, source.field
        )
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        apply_sampling_defaults(sampling, self._config.sampling_defaults)
        sampling.max_tokens = max_tokens
        return PreparedRequest(request_id, prompt_token_ids, sampling)

    def new_detokenizer(self, sampling: common_pb2.SamplingParams) -> IncrementalDetokenizer:
        """Turns one completion's generated ids into text, cut at its stop strings."""
        skip_special_tokens = (
            sampling.skip_special_tokens if sampling.HasField("skip_special_tokens") else True
        )
        return IncrementalDetokenizer(self._tokenizer, skip_special_tokens, stop=tuple(sampling.stop))

    def new_completions(self, prepared: PreparedRequest) -> Completions:
        """Text streams for each of the request's n completions."""
        n = prepared.sampling.n if prepared.sampling.HasField("n") else 1
        return Completions(
            prepared.request_id,
            len(prepared.prompt_token_ids),
            n,
            lambda: self.new_detokenizer(prepared.sampling),
        )

    def tokenize(self, request: generation_pb2.TokenizeRequest) -> generation_pb2.TokenizeResponse:
        """The text, or the conversation as its chat template writes it, and its ids; as
        long as a sequence may be at most, as for a prompt."""
        if request.text and request.messages:
            raise InvalidArgumentError("messages", "only one of text and messages may be given")
        if request.messages:
            field = "messages"
            text = self._render_chat([(message.role, message.content) for message in request.messages])
        else:
            field = "text"
            text = request.text
        return generation_pb2.TokenizeResponse(token_ids=self._encode(text, field), text=text)

    def detokenize(self, request: generation_pb2.DetokenizeRequest) -> generation_pb2.DetokenizeResponse:
        max_ids = self._config.max_model_len
        if len(request.token_ids) > max_ids:
            raise InvalidArgumentError(
                "token_ids",
                f"at most {max_ids} ids (the longest sequence) are allowed, got {len(request.token_ids)}",
            )
        check_token_ids(request.token_ids, self._config.vocab_size, "token_ids")
        skip_special_tokens = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = self._tokenizer.decode(request.token_ids, skip_special_tokens=skip_special_tokens)
        return generation_pb2.DetokenizeResponse(text=text)

    def _encode(self, text: str, field: str) -> list[int]:
        self._check_fits(len(text), field)
        return self._tokenizer.encode(text)

    def _render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        self._check_fits(sum(len(role) + len(content) for role, content in messages), "messages")
        return self._tokenizer.render_chat(messages)

    def _check_fits(self, num_chars: int, field: str) -> None:
        check_text_fits(num_chars, field, self._config.max_model_len, self._tokenizer.max_token_chars)
