"""The online serving benchmark's request sets: token-id prompts and output lengths, drawn
from a seed so that every run of a sweep sends requests of the same lengths. Each run
renames the ids its own way (`for_run`), so that no run finds another's prompts in the
server's prefix cache."""

from __future__ import annotations

import random
from dataclasses import dataclass

# Prompts are drawn from these ids: inside every vocabulary the benchmarks serve, and
# clear of the low ids where special tokens live.
FIRST_TOKEN_ID, LAST_TOKEN_ID = 100, 10_000


@dataclass(frozen=True)
class ServingRequest:
    prompt_token_ids: list[int]
    output_len: int


@dataclass(frozen=True)
class DatasetSpec:
    """Which set and its lengths; fields a set does not use are ignored."""

    name: str
    num_prompts: int
    # random: lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)], as
    # vLLM's `bench serve --dataset-name random` draws them.
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    # shared-prefix: num_prefixes system prompts of prefix_len tokens, each request one of
    # them followed by input_len tokens of its own.
    num_prefixes: int = 4
    prefix_len: int = 512
    seed: int = 0


def _tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.randint(FIRST_TOKEN_ID, LAST_TOKEN_ID) for _ in range(count)]


def _around(rng: random.Random, length: int, range_ratio: float) -> int:
    low = max(1, int(length * (1 - range_ratio)))
    return rng.randint(low, max(low, int(length * (1 + range_ratio))))


def _uniform(spec: DatasetSpec, low: int, high: int) -> list[ServingRequest]:
    rng = random.Random(spec.seed)
    return [
        ServingRequest(_tokens(rng, rng.randint(low, high)), rng.randint(low, high))
        for _ in range(spec.num_prompts)
    ]


def _random(spec: DatasetSpec) -> list[ServingRequest]:
    rng = random.Random(spec.seed)
    return [
        ServingRequest(
            _tokens(rng, _around(rng, spec.input_len, spec.range_ratio)),
            _around(rng, spec.output_len, spec.range_ratio),
        )
        for _ in range(spec.num_prompts)
    ]


def _shared_prefix(spec: DatasetSpec) -> list[ServingRequest]:
    rng = random.Random(spec.seed)
    prefixes = [_tokens(rng, spec.prefix_len) for _ in range(spec.num_prefixes)]
    return [
        ServingRequest(rng.choice(prefixes) + _tokens(rng, spec.input_len), spec.output_len)
        for _ in range(spec.num_prompts)
    ]


DATASETS = {
    "random": _random,
    # nano-vllm's bench.py lengths: prompt and output each uniform in [100, 1024].
    "nano-vllm": lambda spec: _uniform(spec, 100, 1024),
    # Chat-like turns: prompt and output each uniform in [20, 200].
    "short": lambda spec: _uniform(spec, 20, 200),
    "shared-prefix": _shared_prefix,
}


def build_dataset(spec: DatasetSpec) -> list[ServingRequest]:
    if spec.name not in DATASETS:
        raise ValueError(f"unknown dataset {spec.name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[spec.name](spec)


def for_run(requests: list[ServingRequest], run_index: int) -> list[ServingRequest]:
    """`requests` with every prompt id renamed by a permutation of the id range drawn for
    run `run_index`: the lengths, and the prefixes requests share, stay as they were, and
    a prompt of one run is no prefix-cache hit for another run's."""
    ids = list(range(FIRST_TOKEN_ID, LAST_TOKEN_ID + 1))
    renamed = ids.copy()
    random.Random(f"run {run_index}").shuffle(renamed)
    rename = dict(zip(ids, renamed))
    return [ServingRequest([rename[t] for t in r.prompt_token_ids], r.output_len) for r in requests]
