"""The request bodies of the OpenAI API as pydantic models: what FastAPI parses and
checks before a handler runs, and what the OpenAPI schema describes. Parameters OpenAI
defines that pagedserve does not implement yet are declared, so that a request using
one is refused by name (UnsupportedParameterError) instead of silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import InvalidArgumentError

MAX_SEED = (1 << 64) - 1
# Token ids travel as int32.
MAX_TOKEN_ID = (1 << 31) - 1

# Prompts one completions request may batch.
MAX_BATCHED_PROMPTS = 64

# Counts travel as int32.
PositiveInt = Annotated[int, Field(ge=1, le=MAX_TOKEN_ID)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class UnsupportedParameterError(InvalidArgumentError):
    """A parameter of the OpenAI API that this server does not implement."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "is not supported by this server")


class StreamOptions(BaseModel):
    # Send one more chunk before [DONE] with the whole request's usage and no choices.
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str | None = None
    description: str | None = None
    # "schema" would shadow a BaseModel attribute.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    # Whether the output must follow the schema exactly: it always does here.
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    """What both endpoints take to sample, with OpenAI's names and ranges."""

    # Unknown fields are ignored, as OpenAI's own server does with newer clients' fields.
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    user: str | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    # Token id (as a string, JSON's only key type) → value added to its logit.
    logit_bias: dict[str, float] | None = None
    # Extensions that vLLM's API has too.
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOKEN_ID)] = 0
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)] = 0
    skip_special_tokens: bool = True
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    # Structured output: OpenAI's response_format, and vLLM's guided_* constraints.
    response_format: ResponseFormat | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    # Lark's EBNF syntax (SamplingParams.structured_output.grammar).
    guided_grammar: str | None = None

    def token_logit_bias(self) -> dict[int, float]:
        """logit_bias with its keys as token ids; raises InvalidArgumentError for a key
        that is not one."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise InvalidArgumentError("logit_bias", f"keys must be token ids, got {key!r}") from None
            if not 0 <= token_id <= MAX_TOKEN_ID:
                raise InvalidArgumentError(f"logit_bias[{key}]", f"token id must be in [0, {MAX_TOKEN_ID}]")
            bias[token_id] = value
        return bias

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def refuse_unsupported(self) -> None:
        """Raises UnsupportedParameterError for the first parameter given a value that
        changes the output in a way this server does not implement."""
        for name, value, neutral in self._unsupported_values():
            if value != neutral:
                raise UnsupportedParameterError(name)

    def _unsupported_values(self) -> list[tuple[str, Any, Any]]:
        return []


class CompletionRequest(SamplingFields):
    # Text, token ids, or a batch of either: each prompt gets n choices.
    prompt: (
        str
        | Annotated[list[str], Field(max_length=MAX_BATCHED_PROMPTS)]
        | list[TokenId]
        | Annotated[list[list[TokenId]], Field(max_length=MAX_BATCHED_PROMPTS)]
    )
    # OpenAI's default for completions.
    max_tokens: PositiveInt | None = 16
    # Prepend the prompt to each choice's text (and, with logprobs, its tokens'
    # logprobs). Not with stream.
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: PositiveInt | None = None
    suffix: str | None = None

    def _unsupported_values(self) -> list[tuple[str, Any, Any]]:
        return [
            *super()._unsupported_values(),
            ("echo", self.echo and self.stream, False),
            ("best_of", self.best_of if self.best_of != self.n else None, None),
            ("suffix", self.suffix or None, None),
        ]


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    # max_completion_tokens is OpenAI's newer name; when both are given it wins.
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None

    def num_logprobs(self) -> int | None:
        """Top tokens per position to return logprobs for; None: no logprobs."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgumentError("top_logprobs", "requires logprobs to be true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _unsupported_values(self) -> list[tuple[str, Any, Any]]:
        return [
            *super()._unsupported_values(),
            ("tools", self.tools or None, None),
        ]
