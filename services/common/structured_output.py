"""Structured output's constraints (SamplingParams.structured_output) as llguidance
grammars: the tokenizer service checks each one before its request is queued, and the
worker builds a matcher from the same grammar for every constrained sequence.

llguidance, not xgrammar: its core is a Rust extension that imports neither torch nor
transformers, so the tokenizer service (which never imports torch) can compile and
check a constraint with the same engine the worker applies it with; xgrammar's package
imports torch at import time. llguidance also builds a grammar lazily (an Earley parser
over a lexer), so a new schema costs well under a millisecond instead of an up-front
compile per schema and vocabulary, and it is one of the grammar engines vLLM and SGLang
ship.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import llguidance
from pagedserve.v1 import common_pb2

from services.common.errors import InvalidArgumentError

if TYPE_CHECKING:
    # Declared in the extension's type stub only.
    from llguidance._lib import JsonCompileOptions

FIELD = "sampling.structured_output"

# JSON is written without whitespace between tokens unless a schema asks for it (its
# "x-guidance" object wins over these defaults): a small model left free to add
# whitespace may add it until max_tokens.
_JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}

# Distinct constraints whose grammar text is kept: repeated schemas (the common case for
# one application's requests) are converted and checked once.
_CACHED_GRAMMARS = 512


@dataclass(frozen=True)
class StructuredOutputLimits:
    """Bounds on a constraint's size: each is compiled on the request path."""

    max_json_schema_chars: int = 65_536
    max_regex_chars: int = 4_096
    max_grammar_chars: int = 65_536
    max_choices: int = 256
    max_choice_chars: int = 1_024


def constraint_kind(spec: common_pb2.StructuredOutput) -> str | None:
    """Which constraint the spec sets (json_schema, json_object, regex, choice, grammar);
    None: none, free text."""
    kind: str | None = spec.WhichOneof("constraint")
    if kind == "json_object" and not spec.json_object:
        return None
    return kind


def check_structured_output(
    spec: common_pb2.StructuredOutput, limits: StructuredOutputLimits = StructuredOutputLimits()
) -> None:
    """Raises InvalidArgumentError naming the constraint's field when it is malformed,
    too large or does not compile."""
    kind = constraint_kind(spec)
    if kind is None:
        return
    _check_size(spec, kind, limits)
    field = f"{FIELD}.{kind}"
    try:
        error = _grammar_error(grammar_of(spec))
    except InvalidArgumentError:
        raise
    except (ValueError, RecursionError) as failure:
        # llguidance refuses what it cannot read (a schema nested too deeply) this way.
        error = str(failure) or type(failure).__name__
    if error:
        raise InvalidArgumentError(field, f"does not compile: {error}")


def grammar_of(spec: common_pb2.StructuredOutput) -> str:
    """The llguidance grammar (its JSON form) of a spec that sets a constraint; raises
    InvalidArgumentError when the constraint cannot even be read (a schema that is not
    JSON). Cached by the spec's bytes."""
    return _grammar_of_bytes(spec.SerializeToString(deterministic=True))


@lru_cache(maxsize=_CACHED_GRAMMARS)
def _grammar_of_bytes(serialized: bytes) -> str:
    spec = common_pb2.StructuredOutput.FromString(serialized)
    kind = spec.WhichOneof("constraint")
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(_schema_object(spec.json_schema), _JSON_DEFAULTS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, _JSON_DEFAULTS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        # Lark string literals take JSON's escapes, so any string is one literal.
        alternatives = " | ".join(json.dumps(choice) for choice in spec.choice.choices)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    if kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(spec.grammar)
    raise ValueError(f"no constraint in {spec}")


@lru_cache(maxsize=_CACHED_GRAMMARS)
def _grammar_error(grammar: str) -> str:
    """Why the grammar does not compile; empty when it does. Checked without the
    vocabulary: the grammar's own syntax, schema keywords and regexes are what a request
    can get wrong."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
    return messages[0].strip() if is_error and messages else ""


def _schema_object(text: str) -> dict[str, Any]:
    field = f"{FIELD}.json_schema"
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidArgumentError(field, f"is not valid JSON: {error}") from error
    except RecursionError as error:
        raise InvalidArgumentError(field, "is nested too deeply") from error
    if not isinstance(schema, dict):
        raise InvalidArgumentError(field, f"must be a JSON object, got {type(schema).__name__}")
    return schema


def _check_size(spec: common_pb2.StructuredOutput, kind: str, limits: StructuredOutputLimits) -> None:
    field = f"{FIELD}.{kind}"
    text_limits = {
        "json_schema": limits.max_json_schema_chars,
        "regex": limits.max_regex_chars,
        "grammar": limits.max_grammar_chars,
    }
    if kind in text_limits:
        text = getattr(spec, kind)
        if not text:
            raise InvalidArgumentError(field, "must not be empty")
        if len(text) > text_limits[kind]:
            raise InvalidArgumentError(
                field, f"must be at most {text_limits[kind]} characters, got {len(text)}"
            )
    if kind == "choice":
        choices = spec.choice.choices
        if not 1 <= len(choices) <= limits.max_choices:
            raise InvalidArgumentError(
                field, f"must hold 1 to {limits.max_choices} strings, got {len(choices)}"
            )
        for index, choice in enumerate(choices):
            if not 1 <= len(choice) <= limits.max_choice_chars:
                raise InvalidArgumentError(
                    f"{field}[{index}]",
                    f"must be 1 to {limits.max_choice_chars} characters, got {len(choice)}",
                )
