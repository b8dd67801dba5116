"""The command line every benchmark starts from: its module docstring as the help, and
where it writes its results."""

import argparse
from pathlib import Path


def benchmark_parser(doc: str | None, json_default: str | None = None) -> argparse.ArgumentParser:
    """A parser that shows `doc` as written; with json_default, a --json option for the
    results file, defaulting to that name."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if json_default is not None:
        parser.add_argument("--json", type=Path, default=Path(json_default), help="where the results go")
    return parser
