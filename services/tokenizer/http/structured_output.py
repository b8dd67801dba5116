"""The HTTP API's structured-output parameters → SamplingParams.structured_output, and
back from its fields to the parameter a client wrote, for errors: OpenAI's
response_format (json_object, json_schema) and vLLM's guided_regex, guided_choice and
guided_grammar. At most one may constrain a request."""

from __future__ import annotations

import json

from pagedserve.v1 import common_pb2

from services.common.errors import InvalidArgumentError
from services.common.structured_output import FIELD
from services.tokenizer.http.protocol import SamplingFields

# SamplingParams.structured_output's fields → the HTTP parameter each comes from.
_PARAM_OF_FIELD = {
    "json_schema": "response_format.json_schema.schema",
    "json_object": "response_format",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
}


def structured_output_of(body: SamplingFields) -> common_pb2.StructuredOutput | None:
    """The body's constraint; None when it has none. Raises InvalidArgumentError naming
    the parameter when it is incomplete or a second constraint is given."""
    constraints: list[tuple[str, common_pb2.StructuredOutput]] = []
    response_format = body.response_format
    if response_format is not None and response_format.type == "json_object":
        constraints.append(("response_format", common_pb2.StructuredOutput(json_object=True)))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise InvalidArgumentError("response_format.json_schema", "is required when type is json_schema")
        schema = response_format.json_schema.json_schema
        if schema is None:
            raise InvalidArgumentError("response_format.json_schema.schema", "is required")
        constraints.append(("response_format", common_pb2.StructuredOutput(json_schema=json.dumps(schema))))
    if body.guided_regex is not None:
        constraints.append(("guided_regex", common_pb2.StructuredOutput(regex=body.guided_regex)))
    if body.guided_choice is not None:
        choices = common_pb2.Choices(choices=body.guided_choice)
        constraints.append(("guided_choice", common_pb2.StructuredOutput(choice=choices)))
    if body.guided_grammar is not None:
        constraints.append(("guided_grammar", common_pb2.StructuredOutput(grammar=body.guided_grammar)))
    if len(constraints) > 1:
        names = ", ".join(name for name, _ in constraints)
        raise InvalidArgumentError(constraints[1][0], f"only one constraint may be given, got {names}")
    return constraints[0][1] if constraints else None


def structured_output_param(field: str) -> str | None:
    """The HTTP parameter that a structured_output field (as an InvalidArgumentError of
    the request names it) came from; None for other fields."""
    prefix = f"{FIELD}."
    if not field.startswith(prefix):
        return None
    name = field.removeprefix(prefix)
    kind = name.split("[", 1)[0]
    param = _PARAM_OF_FIELD.get(kind)
    return None if param is None else param + name.removeprefix(kind)
