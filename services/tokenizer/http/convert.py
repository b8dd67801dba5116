"""OpenAI request bodies → the public gRPC API's GenerateRequest, so that HTTP requests
take the same validation, tokenizing and generation path as gRPC ones."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pagedserve.v1 import common_pb2, generation_pb2

from services.common.errors import InvalidArgumentError
from services.common.proto_fields import set_given, set_prompt
from services.tokenizer.http.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from services.tokenizer.http.structured_output import structured_output_of, structured_output_param


def sampling_of(
    body: SamplingFields, max_tokens: int | None, logprobs: int | None = None
) -> common_pb2.SamplingParams:
    sampling = common_pb2.SamplingParams(
        top_k=body.top_k,
        stop=body.stop_strings(),
        stop_token_ids=body.stop_token_ids or [],
        ignore_eos=body.ignore_eos,
        n=body.n,
        logit_bias=body.token_logit_bias(),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        min_tokens=body.min_tokens,
        skip_special_tokens=body.skip_special_tokens,
    )
    set_given(
        sampling,
        repetition_penalty=body.repetition_penalty,
        min_p=body.min_p,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        max_tokens=max_tokens,
        logprobs=logprobs,
    )
    structured_output = structured_output_of(body)
    if structured_output is not None:
        sampling.structured_output.CopyFrom(structured_output)
    return sampling


def completion_requests(body: CompletionRequest, request_id: str) -> list[generation_pb2.GenerateRequest]:
    """One request per prompt of the body (a batch has several), ids `request_id-i`."""
    body.refuse_unsupported()
    with _representable():
        return _completion_requests(body, request_id)


def _completion_requests(body: CompletionRequest, request_id: str) -> list[generation_pb2.GenerateRequest]:
    sampling = sampling_of(body, body.max_tokens, body.logprobs)
    if body.echo and body.logprobs is not None:
        sampling.prompt_logprobs = body.logprobs
    prompts = _prompt_list(body.prompt)
    requests = []
    for index, prompt in enumerate(prompts):
        request = generation_pb2.GenerateRequest(
            request_id=request_id if len(prompts) == 1 else f"{request_id}-{index}", sampling=sampling
        )
        set_prompt(request, prompt)
        requests.append(request)
    return requests


def chat_request(body: ChatCompletionRequest, request_id: str) -> generation_pb2.GenerateRequest:
    body.refuse_unsupported()
    with _representable():
        return _chat_request(body, request_id)


def _chat_request(body: ChatCompletionRequest, request_id: str) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id=request_id,
        messages=[
            generation_pb2.ChatMessage(role=message.template_role(), content=message.text())
            for message in body.messages
        ],
        sampling=sampling_of(body, body.max_new_tokens(), body.num_logprobs()),
    )


@contextmanager
def _representable() -> Iterator[None]:
    """JSON strings may hold unpaired UTF-16 surrogates, which are not text and which
    protobuf strings (UTF-8) refuse."""
    try:
        yield
    except InvalidArgumentError:
        raise
    except (ValueError, UnicodeError) as error:
        raise InvalidArgumentError("body", f"holds a value that is not valid text: {error}") from error


def openai_param(field: str) -> str:
    """The OpenAI parameter that a GenerateRequest field (as an InvalidArgumentError names
    it) came from."""
    structured = structured_output_param(field)
    if structured is not None:
        return structured
    if field.startswith("sampling."):
        return field.removeprefix("sampling.")
    if field.startswith("prompt_token_ids"):
        return "prompt" + field.removeprefix("prompt_token_ids")
    return field


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    # An empty list is one empty prompt, which validation refuses by name.
    return list(prompt) or [""]  # type: ignore[arg-type]
