"""Fills a message's optional fields from values that may be missing, so that a field left
unset stays unset (the server then applies its own default) instead of becoming zero."""

from google.protobuf.message import Message


def set_given(message: Message, **values: object) -> None:
    """Sets each field named in `values` whose value is not None; leaves the others alone."""
    for name, value in values.items():
        if value is not None:
            setattr(message, name, value)
