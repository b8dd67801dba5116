"""Checks of public requests against the model's and the server's limits. Each failure
raises InvalidArgumentError naming the field and the limit it broke, which the server
turns into INVALID_ARGUMENT.

Text fields need no UTF-8 check here: protobuf `string` fields must hold valid UTF-8,
and the gRPC server rejects a message that breaks this while parsing it, before any
handler runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.v1 import generation_pb2

from services.common.errors import InvalidArgumentError

# The sampling checks are the scheduler's too; the frontend takes them from here.
from services.common.sampling_checks import SamplingLimits as SamplingLimits
from services.common.sampling_checks import check_request_id as check_request_id
from services.common.sampling_checks import validate_sampling as validate_sampling

PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")


@dataclass(frozen=True)
class TextPrompt:
    text: str
    field: str = "prompt"


@dataclass(frozen=True)
class TokenIdsPrompt:
    token_ids: tuple[int, ...]
    field: str = "prompt_token_ids"


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    field: str = "messages"


PromptSource = TextPrompt | TokenIdsPrompt | ChatPrompt


def prompt_source(request: generation_pb2.GenerateRequest) -> PromptSource:
    """The one prompt form the request uses. proto3 cannot tell an empty prompt or list
    from an absent one, so empty counts as not given."""
    given = [
        name
        for name, present in zip(
            PROMPT_FIELDS, (bool(request.prompt), bool(request.prompt_token_ids), bool(request.messages))
        )
        if present
    ]
    if not given:
        raise InvalidArgumentError("prompt", "one of prompt, prompt_token_ids or messages is required")
    if len(given) > 1:
        raise InvalidArgumentError(
            given[1],
            f"only one of prompt, prompt_token_ids and messages may be given; got {_join_names(given)}",
        )
    if given[0] == "prompt":
        return TextPrompt(request.prompt)
    if given[0] == "prompt_token_ids":
        return TokenIdsPrompt(tuple(request.prompt_token_ids))
    return ChatPrompt(tuple((message.role, message.content) for message in request.messages))


def check_text_fits(num_chars: int, field: str, max_model_len: int, max_token_chars: int) -> None:
    """Refuses, before tokenizing it, a text too long to fit a sequence in any tokenization:
    tokenizing a huge text costs seconds and much memory only to find that out."""
    limit = max_model_len * max_token_chars
    if num_chars > limit:
        raise InvalidArgumentError(
            field,
            f"has {num_chars} characters, more than the {limit} that can fit a sequence "
            f"({max_model_len} tokens of at most {max_token_chars} characters each)",
        )


def _join_names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
