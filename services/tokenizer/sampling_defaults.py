"""The sampling defaults a model ships in generation_config.json (Llama 3 and Qwen ask for
temperature 0.6-0.7 and a top_p, for example), used where a request leaves a field unset.

Only the fields that shape the distribution are taken, as other servers do; `do_sample` is
ignored, so a request that wants greedy tokens says temperature 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pagedserve.v1 import common_pb2

from services.common.errors import InvalidArgumentError
from services.common.sampling_checks import validate_sampling

# Fields of generation_config.json that become request defaults; the names are the same
# in SamplingParams.
DEFAULTED_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

GENERATION_CONFIG_CHOICES = ("auto", "none")


def read_sampling_defaults(model_dir: Path, vocab_size: int) -> common_pb2.SamplingParams:
    """The defaults in `model_dir`/generation_config.json (none when the file is absent);
    raises ValueError naming the file and the field when a value is out of range."""
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return common_pb2.SamplingParams()
    raw: dict[str, Any] = json.loads(path.read_text())
    defaults = common_pb2.SamplingParams()
    for name in DEFAULTED_FIELDS:
        value = raw.get(name)
        if value is None:
            continue
        if name == "top_k":
            defaults.top_k = int(value)
        else:
            setattr(defaults, name, float(value))
    try:
        validate_sampling(defaults, vocab_size)
    except InvalidArgumentError as error:
        raise ValueError(f"{path}: {error}") from error
    return defaults


def apply_sampling_defaults(sampling: common_pb2.SamplingParams, defaults: common_pb2.SamplingParams) -> None:
    """Fills the fields `sampling` leaves unset from `defaults`. top_k has no presence: 0
    means unset, so a request turns a default top_k off with -1."""
    for name in DEFAULTED_FIELDS:
        if name == "top_k":
            if sampling.top_k == 0 and defaults.top_k != 0:
                sampling.top_k = defaults.top_k
        elif defaults.HasField(name) and not sampling.HasField(name):
            setattr(sampling, name, getattr(defaults, name))


def describe(defaults: common_pb2.SamplingParams) -> str:
    """`temperature=0.6 top_p=0.9`, for the start-up log; `none` when empty."""
    parts = [f"{field.name}={value:g}" for field, value in defaults.ListFields()]
    return " ".join(parts) or "none"
