"""Structured output through the OpenAI-compatible HTTP API and gRPC, against the three
services as processes with the embedded model: JSON Schemas, JSON objects, regexes and
choices are honoured, batched beside free requests whose tokens they leave alone, and a
constraint that does not compile is refused by name before it is queued."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import jsonschema
import openai
import pytest
from pagedserve.v1 import common_pb2, generation_pb2

from tests.support.http_api import MODEL
from tests.support.service_stack import Stack

pytestmark = pytest.mark.e2e

# Enough tokens for every schema below: each bounds its strings and arrays, so that a
# greedy answer ends well before this.
MAX_TOKENS = 160

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}

SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("Describe a person as JSON.", PERSON),
    (
        "Give a city and its population as JSON.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "population": {"type": "integer", "minimum": 1000, "maximum": 40000000},
            },
            "required": ["city", "population"],
        },
    ),
    (
        "List three colours as JSON.",
        {
            "type": "object",
            "properties": {
                "colours": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 12},
                    "minItems": 3,
                    "maxItems": 3,
                }
            },
            "required": ["colours"],
        },
    ),
    (
        "Is the sky blue? Answer as JSON.",
        {
            "type": "object",
            "properties": {"answer": {"enum": ["yes", "no", "maybe"]}},
            "required": ["answer"],
        },
    ),
    (
        "Rate this film from 1 to 5 as JSON.",
        {
            "type": "object",
            "properties": {
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                "liked": {"type": "boolean"},
            },
            "required": ["rating", "liked"],
        },
    ),
    (
        "Describe a book with its author as JSON.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 30},
                "author": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 20},
                        "born": {"type": "integer", "minimum": 1000, "maximum": 2020},
                    },
                    "required": ["name", "born"],
                },
            },
            "required": ["title", "author"],
        },
    ),
    (
        "Give a temperature reading as JSON.",
        {
            "type": "object",
            "properties": {
                "celsius": {"type": "number", "minimum": -50, "maximum": 60},
                "unit": {"const": "C"},
            },
            "required": ["celsius", "unit"],
        },
    ),
    (
        "Give two points as JSON.",
        {
            "type": "object",
            "properties": {
                "points": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "x": {"type": "integer", "minimum": -9, "maximum": 9},
                            "y": {"type": "integer", "minimum": -9, "maximum": 9},
                        },
                        "required": ["x", "y"],
                    },
                    "minItems": 2,
                    "maxItems": 2,
                }
            },
            "required": ["points"],
        },
    ),
    (
        "Name a primary colour as JSON.",
        {"type": "string", "enum": ["red", "green", "blue"]},
    ),
    (
        "Give a list of small numbers as JSON.",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 99},
            "minItems": 1,
            "maxItems": 5,
        },
    ),
    (
        "Describe a pet, which may have no name, as JSON.",
        {
            "type": "object",
            "properties": {
                "species": {"enum": ["cat", "dog", "fish"]},
                "name": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]},
                "legs": {"type": "integer", "minimum": 0, "maximum": 4},
            },
            "required": ["species", "name", "legs"],
        },
    ),
]


def _closed(schema: Any) -> Any:
    """The schema with every object closed to properties it does not name: an open object
    lets a small model add properties until max_tokens."""
    if isinstance(schema, dict):
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            _closed(value)
    elif isinstance(schema, list):
        for value in schema:
            _closed(value)
    return schema


for _, _schema in SCHEMAS:
    _closed(_schema)

FREE_PROMPTS = ["Name three colours of the rainbow.", "What is the capital of France?"]


def _chat(client: openai.OpenAI, content: str, **params: Any) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        **{"temperature": 0, "max_tokens": MAX_TOKENS, **params},
    )


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_schemas_hold_when_batched_with_free_requests(client: openai.OpenAI) -> None:
    # Thirteen completions at once wait for the slowest: on a busy CPU, longer than one.
    client = client.with_options(timeout=900)
    alone = {
        prompt: _chat(client, prompt, max_tokens=12).choices[0].message.content for prompt in FREE_PROMPTS
    }
    with ThreadPoolExecutor(len(SCHEMAS) + len(FREE_PROMPTS)) as pool:
        constrained = [
            pool.submit(_chat, client, prompt, response_format=_schema_format(schema))
            for prompt, schema in SCHEMAS
        ]
        free = {prompt: pool.submit(_chat, client, prompt, max_tokens=12) for prompt in FREE_PROMPTS}
        for (prompt, schema), answer in zip(SCHEMAS, constrained):
            choice = answer.result().choices[0]
            assert choice.finish_reason == "stop", (prompt, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), schema)
        # The constrained rows' masks leave the other rows of their batches alone.
        assert {prompt: f.result().choices[0].message.content for prompt, f in free.items()} == alone


def test_json_object_is_parseable_and_streams_the_same_text(client: openai.OpenAI) -> None:
    prompt = "Describe the planet Mars as a JSON object with a few fields."
    params = {"response_format": {"type": "json_object"}, "max_tokens": 40}
    whole = _chat(client, prompt, **params).choices[0]
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, stream=True, **params
        )
        if chunk.choices
    )
    assert streamed == whole.message.content
    if whole.finish_reason == "stop":
        assert isinstance(json.loads(whole.message.content), dict)
    else:  # cut short by max_tokens: still a prefix of an object
        assert whole.message.content.startswith("{")


def test_n_sampled_completions_each_follow_the_schema(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        temperature=1.0,
        seed=5,
        n=3,
        max_tokens=MAX_TOKENS,
        response_format=_schema_format(PERSON),
    )
    assert len(answer.choices) == 3
    for choice in answer.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_regex_and_choice_constrain_completions(client: openai.OpenAI) -> None:
    pattern = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d)"
    dated = client.completions.create(
        model=MODEL,
        prompt="The first moon landing happened on",
        max_tokens=20,
        temperature=0,
        extra_body={"guided_regex": pattern},
    ).choices[0]
    assert dated.finish_reason == "stop" and re.fullmatch(pattern, dated.text), dated.text
    choices = ["Paris", "London", "Berlin", "Rome"]
    picked = _chat(client, "Which city is the capital of Italy?", extra_body={"guided_choice": choices})
    assert picked.choices[0].message.content in choices


def test_grpc_structured_output_gives_the_http_tokens(client: openai.OpenAI, http_stack: Stack) -> None:
    prompt = "Describe a person as JSON."
    # The SDK's completions method has no response_format argument; the API takes it.
    over_http = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"response_format": _schema_format(PERSON)},
    )
    sampling = common_pb2.SamplingParams(
        temperature=0,
        max_tokens=MAX_TOKENS,
        structured_output=common_pb2.StructuredOutput(json_schema=json.dumps(PERSON)),
    )
    messages = list(
        http_stack.generation.Generate(
            generation_pb2.GenerateRequest(prompt=prompt, sampling=sampling), timeout=300
        )
    )
    text = "".join(message.text for message in messages)
    assert text == over_http.choices[0].text
    jsonschema.validate(json.loads(text), PERSON)


def test_a_schema_that_does_not_compile_is_refused_by_name(client: openai.OpenAI) -> None:
    bad = {"type": "object", "properties": {"age": {"type": "integr"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(client, "Hi", response_format=_schema_format(bad))
    error = refused.value.body
    assert refused.value.status_code == 400
    assert error["param"] == "response_format.json_schema.schema"
    assert "integr" in error["message"]
    with pytest.raises(openai.BadRequestError) as missing:
        _chat(client, "Hi", response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert missing.value.body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as both:
        _chat(client, "Hi", response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"})
    assert both.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as bad_regex:
        _chat(client, "Hi", extra_body={"guided_regex": "(unclosed"})
    assert bad_regex.value.body["param"] == "guided_regex"


def test_grpc_refuses_a_broken_constraint_with_invalid_argument(http_stack: Stack) -> None:
    for spec, field in [
        (common_pb2.StructuredOutput(json_schema="{not json"), "sampling.structured_output.json_schema"),
        (common_pb2.StructuredOutput(regex="(unclosed"), "sampling.structured_output.regex"),
        (
            common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=["a", ""])),
            "sampling.structured_output.choice[1]",
        ),
        (common_pb2.StructuredOutput(grammar="start: undefined_rule"), "sampling.structured_output.grammar"),
    ]:
        request = generation_pb2.GenerateRequest(
            prompt="Hi", sampling=common_pb2.SamplingParams(max_tokens=4, structured_output=spec)
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(http_stack.generation.Generate(request, timeout=60))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in refused.value.details(), refused.value.details()
