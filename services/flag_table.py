"""Command-line options written as rows of a table (flag, type, default, help), for the
many options that need nothing more of argparse than those four."""

import argparse
from collections.abc import Callable
from typing import Any, NamedTuple


class Flag(NamedTuple):
    name: str
    # None: the value stays a string.
    type: Callable[[str], Any] | None
    default: object
    help: str


def add_flags(parser: argparse.ArgumentParser, *flags: Flag) -> None:
    for flag in flags:
        options: dict[str, Any] = {"default": flag.default, "help": flag.help}
        if flag.type is not None:
            options["type"] = flag.type
        parser.add_argument(flag.name, **options)
