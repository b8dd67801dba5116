"""Which engine a request goes to: the one whose prefix cache holds the longest run of the
prompt's leading full blocks, unless that engine is overloaded; else the least loaded.

An engine's load is its running plus waiting requests as it last reported them, plus the
requests this frontend sent it since (so that a burst between two reports spreads). It is
overloaded when its load exceeds the least loaded engine's by more than
`balance_abs_requests` and is more than `balance_rel` times it. Ties go by rendezvous
hashing of the prompt's first block and the engine's address, so that every frontend
process sends a prefix no engine holds yet to the same engine, and distinct prompts spread
evenly."""

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import xxhash

from services.common.errors import UnavailableError


class NoEngineError(UnavailableError):
    """No engine takes requests now."""


@dataclass(frozen=True)
class RoutingConfig:
    # How much more loaded than the least loaded engine, in requests and as a ratio (both
    # must be exceeded), an engine may be and still get the requests it holds a prefix of.
    balance_abs_requests: int = 8
    balance_rel: float = 1.5
    # Cached prefixes shorter than this many blocks do not count.
    min_match_blocks: int = 1
    # "prefix": the rule above; "round_robin": each engine in turn, blind to prefixes and
    # load (the baseline that benchmarks/prefix_routing.py compares with).
    policy: str = "prefix"


@dataclass(frozen=True)
class EngineView:
    """What routing knows of one engine that takes requests."""

    engine_id: str
    load: int
    # Routing keys of the blocks its prefix cache holds (services/common/block_hash.py).
    cached_keys: AbstractSet[int]


@dataclass(frozen=True)
class RouteDecision:
    engine_id: str
    # "prefix": the longest cached prefix; "least_loaded": none cached, or too loaded.
    reason: str
    # Leading full blocks of the prompt the engine holds.
    matched_blocks: int
    load: int


def matched_blocks(prompt_keys: Sequence[int], cached_keys: AbstractSet[int]) -> int:
    """How many leading blocks of the prompt are cached: the chained keys of a run of
    blocks name the whole prefix, so the run ends at the first key not held."""
    count = 0
    for key in prompt_keys:
        if key not in cached_keys:
            break
        count += 1
    return count


def rendezvous_weight(engine_id: str, affinity: int) -> int:
    return xxhash.xxh3_64_intdigest(engine_id.encode(), seed=affinity & 0xFFFF_FFFF_FFFF_FFFF)


def overload_threshold(min_load: int, config: RoutingConfig) -> float:
    """The highest load that is not overloaded, given the least loaded engine's."""
    return max(min_load + config.balance_abs_requests, min_load * config.balance_rel)


def route(
    prompt_keys: Sequence[int], affinity: int, engines: Sequence[EngineView], config: RoutingConfig
) -> RouteDecision:
    """The engine for a prompt whose full blocks have `prompt_keys`; `affinity` breaks
    ties (the first block's key, or a hash of a shorter prompt). Raises UnavailableError
    when there is no engine."""
    if not engines:
        raise NoEngineError("no engine is serving; retry once one is")
    min_load = min(engine.load for engine in engines)
    threshold = overload_threshold(min_load, config)
    matches = {engine.engine_id: matched_blocks(prompt_keys, engine.cached_keys) for engine in engines}
    fit = [engine for engine in engines if engine.load <= threshold]
    best = max(
        fit,
        key=lambda e: (matches[e.engine_id], -e.load, rendezvous_weight(e.engine_id, affinity), e.engine_id),
    )
    if matches[best.engine_id] >= config.min_match_blocks:
        return RouteDecision(best.engine_id, "prefix", matches[best.engine_id], best.load)
    least = max(engines, key=lambda e: (-e.load, rendezvous_weight(e.engine_id, affinity), e.engine_id))
    return RouteDecision(least.engine_id, "least_loaded", matches[least.engine_id], least.load)
