"""Fills request messages from plain Python values: optional fields from values that may
be missing, so that a field left unset stays unset (the server then applies its own
default) instead of becoming zero, and a prompt from text or from token ids."""

from collections.abc import Sequence

from google.protobuf.message import Message
from pagedserve.v1 import generation_pb2


def set_given(message: Message, **values: object) -> None:
    """Sets each field named in `values` whose value is not None; leaves the others alone."""
    for name, value in values.items():
        if value is not None:
            setattr(message, name, value)


def set_prompt(request: generation_pb2.GenerateRequest, prompt: str | Sequence[int]) -> None:
    """Text goes to `prompt`, token ids (already tokenized) to `prompt_token_ids`."""
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(prompt)
