"""The flags that choose how a worker reads and stores its weights, on `pagedserve worker`
and `pagedserve serve`, and what a bad value gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import build_parser, worker_config
from services.worker_flags import forwarded_weight_flags

MODEL = Path("/models/m")


def test_worker_flags_set_quantization_and_load_format() -> None:
    args = build_parser().parse_args(
        ["worker", "--model", str(MODEL), "--quantization", "fp8", "--load-format", "dummy"]
    )
    config = worker_config(args)
    assert (config.quantization, config.load_format) == ("fp8", "dummy")


def test_serve_takes_the_flags_and_passes_them_on() -> None:
    args = build_parser().parse_args(["serve", "--model", str(MODEL), "--quantization", "awq"])
    flags = forwarded_weight_flags(args)
    worker = build_parser().parse_args(["worker", "--model", str(MODEL), *flags])
    assert worker_config(worker).quantization == "awq"
    assert worker_config(worker).load_format == "safetensors"


def test_unknown_quantization_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--model", str(MODEL), "--quantization", "int3"])
    assert "--quantization: invalid choice: 'int3'" in capsys.readouterr().err
