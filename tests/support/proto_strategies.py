"""Hypothesis strategies for any protobuf message, built from its descriptor: every field
may be set or left out, with values that reach past each limit (extreme and negative
integers, NaN and infinite floats, unknown enum numbers, special tokens in text) as well
as ordinary ones, so that a fuzzed request gets past validation often enough to run."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# Small values pass validation and generate a few tokens; extremes test the bounds.
_SMALL = st.integers(-3, 8)

_TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["user", "assistant", "system", "tool", "<|im_start|>", "<|im_end|>", "Hello", ""]),
)


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    return st.one_of(
        _SMALL.filter(lambda value: low <= value <= high),
        st.sampled_from([low, high]),
        st.integers(low, high),
    )


_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: _integers(*INT32),
    FieldDescriptor.TYPE_SINT32: _integers(*INT32),
    FieldDescriptor.TYPE_SFIXED32: _integers(*INT32),
    FieldDescriptor.TYPE_INT64: _integers(*INT64),
    FieldDescriptor.TYPE_SINT64: _integers(*INT64),
    FieldDescriptor.TYPE_SFIXED64: _integers(*INT64),
    FieldDescriptor.TYPE_UINT32: _integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: _integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: _integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: _integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FLOAT: st.one_of(st.floats(-3, 3, width=32), st.floats(width=32)),
    FieldDescriptor.TYPE_DOUBLE: st.one_of(st.floats(-3, 3), st.floats()),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: _TEXT,
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=24),
}


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_ENUM:
        numbers = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), _integers(*INT32))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _fields(field.message_type, depth + 1)
    return _SCALARS[field.type]


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(field):
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(_value(key, depth), _value(value, depth), max_size=4)
    if field.is_repeated:
        return st.lists(_value(field, depth), max_size=6)
    return _value(field, depth)


def _fields(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """The fields to set, by name; nested messages as dicts of theirs, three levels deep."""
    if depth > 3:
        return st.just({})
    return st.fixed_dictionaries({}, optional={f.name: _field(f, depth) for f in descriptor.fields})


def _fill(message: Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if _is_map(field):
            for key, item in value.items():
                if isinstance(item, dict):
                    _fill(target[key], item)
                else:
                    target[key] = item
        elif field.is_repeated and field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                _fill(target.add(), item)
        elif field.is_repeated:
            target.extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            _fill(target, value)
            target.SetInParent()
        else:
            setattr(message, name, value)


def messages(message_type: type[Message]) -> st.SearchStrategy[Message]:
    """Messages of `message_type` with any subset of its fields set, at any depth."""

    def build(values: dict[str, Any]) -> Message:
        message = message_type()
        _fill(message, values)
        return message

    return _fields(message_type.DESCRIPTOR).map(build)
