"""SamplingParams of the offline API: the public SamplingParams message's fields as a
dataclass, with vLLM's defaults (16 tokens unless told otherwise)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedserve.v1 import common_pb2

from services.common.proto_fields import set_given


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the completion must match (common.proto's StructuredOutput), vLLM's names: set
    one of them."""

    # A JSON Schema, as a dict or as JSON text.
    json: Mapping[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: Sequence[str] | None = None
    # Lark's EBNF, from the rule `start`.
    grammar: str | None = None

    def to_proto(self) -> common_pb2.StructuredOutput:
        if self.json is not None:
            schema = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return common_pb2.StructuredOutput(json_schema=schema)
        if self.regex is not None:
            return common_pb2.StructuredOutput(regex=self.regex)
        if self.choice is not None:
            return common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=list(self.choice)))
        if self.grammar is not None:
            return common_pb2.StructuredOutput(grammar=self.grammar)
        return common_pb2.StructuredOutput(json_object=self.json_object)


@dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen; each field as common.proto's SamplingParams
    documents it."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    # None: up to the model's maximum length.
    max_tokens: int | None = 16
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    # None: a random seed.
    seed: int | None = None
    n: int = 1
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    # Top tokens per position whose log-probabilities come back; None: none.
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def to_proto(self) -> common_pb2.SamplingParams:
        sampling = common_pb2.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            n=self.n,
            logit_bias=dict(self.logit_bias),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            skip_special_tokens=self.skip_special_tokens,
        )
        set_given(sampling, max_tokens=self.max_tokens, seed=self.seed, logprobs=self.logprobs)
        if self.structured_outputs is not None:
            sampling.structured_output.CopyFrom(self.structured_outputs.to_proto())
        return sampling
