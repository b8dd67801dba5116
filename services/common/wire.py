"""Finds which string field of an undecodable request holds invalid UTF-8, so that the
client's error names the field instead of saying "could not parse"."""

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal.decoder import _DecodeVarint

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LENGTH_DELIMITED, _WIRE_FIXED32 = 0, 1, 2, 5


def find_invalid_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path (e.g. "messages[1].content") of the first string field whose bytes are
    not UTF-8, or None if there is none or the bytes are malformed in another way."""
    counts: dict[str, int] = {}
    position = 0
    try:
        while position < len(data):
            key, position = _DecodeVarint(data, position)
            number, wire_type = key >> 3, key & 7
            if wire_type == _WIRE_VARINT:
                _, position = _DecodeVarint(data, position)
                continue
            if wire_type in (_WIRE_FIXED64, _WIRE_FIXED32):
                position += 8 if wire_type == _WIRE_FIXED64 else 4
                continue
            if wire_type != _WIRE_LENGTH_DELIMITED:
                return None
            length, position = _DecodeVarint(data, position)
            payload, position = data[position : position + length], position + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            path: str = prefix + field.name
            if field.is_repeated:
                index = counts.get(field.name, 0)
                counts[field.name] = index + 1
                path = f"{path}[{index}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    return path
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = find_invalid_utf8_field(field.message_type, payload, path + ".")
                if found is not None:
                    return found
    except (IndexError, ValueError):
        return None
    return None
