"""Structured-output constraints as grammars: what compiles, and a refusal naming the
field and the limit for what does not."""

import json

import llguidance
import pytest
from pagedserve.v1 import common_pb2

from services.common.errors import InvalidArgumentError
from services.common.structured_output import (
    StructuredOutputLimits,
    check_structured_output,
    constraint_kind,
    grammar_of,
)
from tests.support.small_tokenizer import build_tokenizer

Spec = common_pb2.StructuredOutput


def _nested_schema(depth: int) -> str:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return json.dumps(schema)


@pytest.fixture(scope="module")
def vocabulary() -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(build_tokenizer().to_str())


def _accepts(vocabulary: llguidance.LLTokenizer, spec: Spec, text: str) -> bool:
    matcher = llguidance.LLMatcher(vocabulary, grammar_of(spec), log_level=0)
    return matcher.consume_tokens(vocabulary.tokenize_str(text)) and matcher.is_accepting()


def test_each_kind_of_constraint_accepts_its_language(vocabulary) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"]}
    cases = [
        (Spec(json_schema=json.dumps(schema)), '{"n":7}', '{"n":10}'),
        (Spec(json_object=True), '{"a":[1,2]}', "[1,2]"),
        (Spec(regex=r"\d{3}-\d{2}"), "123-45", "12-345"),
        (Spec(choice=common_pb2.Choices(choices=["yes", 'say "no"'])), 'say "no"', "say no"),
        (Spec(grammar='start: "a" b\nb: "b"+'), "abbb", "ba"),
    ]
    for spec, accepted, refused in cases:
        check_structured_output(spec)
        assert _accepts(vocabulary, spec, accepted), spec
        assert not _accepts(vocabulary, spec, refused), spec


def test_no_constraint_is_free_text() -> None:
    assert constraint_kind(Spec()) is None
    assert constraint_kind(Spec(json_object=False)) is None
    check_structured_output(Spec())


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (Spec(json_schema="{oops"), "json_schema", "not valid JSON"),
        (Spec(json_schema="[1]"), "json_schema", "must be a JSON object"),
        (Spec(json_schema=json.dumps({"type": "strng"})), "json_schema", "strng"),
        (Spec(regex="(a"), "regex", "does not compile"),
        (Spec(grammar="start: missing"), "grammar", "missing"),
        (Spec(choice=common_pb2.Choices()), "choice", "1 to 256"),
        (Spec(choice=common_pb2.Choices(choices=["a", ""])), "choice[1]", "1 to 1024 characters"),
        (Spec(regex="a" * 5000), "regex", "at most 4096 characters"),
        (Spec(json_schema=_nested_schema(200)), "json_schema", "does not compile"),
        (Spec(json_schema="[" * 5000 + "]" * 5000), "json_schema", "nested too deeply"),
    ],
)
def test_a_broken_constraint_is_refused_by_name(spec: Spec, field: str, words: str) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        check_structured_output(spec, StructuredOutputLimits())
    assert refused.value.field == f"sampling.structured_output.{field}"
    assert words in str(refused.value)
