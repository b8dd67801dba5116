"""The routing rule: longest cached prefix unless overloaded, else least loaded."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import UnavailableError
from services.tokenizer.routing import (
    EngineView,
    RoutingConfig,
    matched_blocks,
    overload_threshold,
    route,
)

CONFIG = RoutingConfig(balance_abs_requests=4, balance_rel=1.5)
PROMPT = [11, 12, 13, 14]


def _engine(name: str, load: int, cached: list[int]) -> EngineView:
    return EngineView(name, load, frozenset(cached))


def test_longest_cached_prefix_wins():
    engines = [_engine("a", 0, [11]), _engine("b", 2, [11, 12, 13]), _engine("c", 1, [])]
    decision = route(PROMPT, PROMPT[0], engines, CONFIG)
    assert (decision.engine_id, decision.reason, decision.matched_blocks) == ("b", "prefix", 3)


def test_only_a_leading_run_counts():
    # Blocks 2 and 3 without block 1 are another prompt's: their chained keys differ.
    assert matched_blocks(PROMPT, frozenset([12, 13, 14])) == 0
    assert matched_blocks(PROMPT, frozenset([11, 12, 14])) == 2


def test_an_overloaded_engine_loses_its_prefix_to_the_next_best():
    engines = [_engine("a", 20, [11, 12, 13]), _engine("b", 2, [11]), _engine("c", 0, [])]
    decision = route(PROMPT, PROMPT[0], engines, CONFIG)
    assert (decision.engine_id, decision.reason, decision.matched_blocks) == ("b", "prefix", 1)


def test_no_prefix_anywhere_goes_to_the_least_loaded():
    engines = [_engine("a", 3, [99]), _engine("b", 1, []), _engine("c", 2, [])]
    decision = route(PROMPT, PROMPT[0], engines, CONFIG)
    assert (decision.engine_id, decision.reason) == ("b", "least_loaded")


def test_no_engine_is_unavailable():
    with pytest.raises(UnavailableError, match="no engine"):
        route(PROMPT, 0, [], CONFIG)


def test_equal_engines_spread_distinct_prompts():
    engines = [_engine(f"10.0.0.{i}:50052", 0, []) for i in range(2)]
    chosen = {route([key], key, engines, CONFIG).engine_id for key in range(64)}
    assert len(chosen) == 2


views = st.builds(
    EngineView,
    engine_id=st.text(alphabet="abcdef0123456789:.", min_size=1, max_size=12),
    load=st.integers(0, 64),
    cached_keys=st.frozensets(st.integers(0, 12), max_size=12),
)
engine_lists = st.lists(views, min_size=1, max_size=6, unique_by=lambda e: e.engine_id)
prompts = st.lists(st.integers(0, 12), max_size=8, unique=True)


@given(prompts, engine_lists, st.integers(0, 2**64 - 1), st.randoms())
def test_the_choice_is_the_same_whatever_the_order_of_engines(prompt, engines, affinity, rng):
    # Frontends list engines in the order they found them; all must agree.
    shuffled = list(engines)
    rng.shuffle(shuffled)
    assert route(prompt, affinity, engines, CONFIG) == route(prompt, affinity, shuffled, CONFIG)


@given(prompts, engine_lists, st.integers(0, 2**64 - 1))
def test_the_choice_is_never_overloaded_and_follows_the_rule(prompt, engines, affinity):
    decision = route(prompt, affinity, engines, CONFIG)
    min_load = min(e.load for e in engines)
    threshold = overload_threshold(min_load, CONFIG)
    assert decision.load <= threshold
    fit_matches = [matched_blocks(prompt, e.cached_keys) for e in engines if e.load <= threshold]
    if max(fit_matches) >= CONFIG.min_match_blocks:
        assert decision.reason == "prefix"
        assert decision.matched_blocks == max(fit_matches)
    else:
        assert decision.reason == "least_loaded"
        assert decision.load == min_load
