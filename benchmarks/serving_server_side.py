"""Where a serving run's latency tail comes from: the scheduler's own histograms of the
gaps between a request's tokens and of its steps (services/scheduler/metrics.py), read
from its /metrics before and after each rate, beside the gaps the client saw. A tail the
scheduler shows comes from the steps (the device, the worker, the scheduler's planning); a
tail only the client shows comes later, in the tokenizer, the streams or the client.

Histograms count by bucket, so the shares are of gaps above a bucket's bound."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

from services.common.metrics import PREFIX

# Upper bounds of the scheduler's step buckets (services/common/metrics.py STEP_BUCKETS).
THRESHOLDS_S = (0.0025, 0.005, 0.01, 0.02)
HISTOGRAMS = {
    "itl": PREFIX + "inter_token_latency_seconds",
    "step": PREFIX + "step_duration_seconds",
}
GC_PAUSES = PREFIX + "gc_pause_seconds"

# By histogram: cumulative count at each bucket's upper bound.
Snapshot = dict[str, dict[float, float]]


def _families(metrics_url: str) -> list:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        return list(text_string_to_metric_families(response.read().decode()))


def read_snapshot(metrics_url: str) -> Snapshot:
    snapshot: Snapshot = {key: {} for key in HISTOGRAMS}
    wanted = {name: key for key, name in HISTOGRAMS.items()}
    for family in _families(metrics_url):
        key = wanted.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                snapshot[key][float(sample.labels["le"])] = sample.value
    return snapshot


def read_gc_pauses(metrics_url: str) -> dict[str, dict[str, float]]:
    """A service's garbage collector pauses so far (services/common/gc_pauses.py), by
    generation: how many, their seconds, and how many lasted over 5 ms."""
    pauses: dict[str, dict[str, float]] = {}
    for family in _families(metrics_url):
        if family.name != GC_PAUSES:
            continue
        for sample in family.samples:
            row = pauses.setdefault(
                sample.labels["generation"], {"count": 0.0, "seconds": 0.0, "> 5 ms": 0.0}
            )
            if sample.name.endswith("_count"):
                row["count"] = sample.value
            elif sample.name.endswith("_sum"):
                row["seconds"] = sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == 0.005:
                row["> 5 ms"] = -sample.value
    for row in pauses.values():
        row["> 5 ms"] += row["count"]
    return pauses


def gc_pauses_between(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict:
    return {
        generation: {name: value - before.get(generation, {}).get(name, 0.0) for name, value in row.items()}
        for generation, row in after.items()
    }


def shares_above(before: Snapshot, after: Snapshot) -> dict[str, dict[str, float]]:
    """Of what each histogram counted between the snapshots: the share above each
    threshold, keyed "NAME" -> "> X ms", with "count" beside them."""
    shares = {}
    for key in HISTOGRAMS:
        counted = {bound: after[key].get(bound, 0.0) - before[key].get(bound, 0.0) for bound in after[key]}
        total = counted.get(float("inf"), 0.0)
        shares[key] = _row(total, lambda threshold: total - counted.get(threshold, total))
    return shares


def client_shares_above(gaps_s: Sequence[float]) -> dict[str, float]:
    """The same shares of the gaps the client saw between a request's messages."""
    return _row(len(gaps_s), lambda threshold: sum(gap > threshold for gap in gaps_s))


def _row(total: float, num_above: Callable[[float], float]) -> dict[str, float]:
    """ "count" and, for each threshold, the share of the `total` that lies above it."""
    row = {"count": float(total)}
    for threshold in THRESHOLDS_S:
        row[f"> {threshold * 1e3:g} ms"] = num_above(threshold) / total if total else 0.0
    return row


def describe(shares: dict[str, dict[str, float]]) -> str:
    """One line: each side's shares of gaps over each threshold."""
    parts = []
    for side, row in shares.items():
        over = "  ".join(f"{name} {share:6.2%}" for name, share in row.items() if name != "count")
        parts.append(f"{side}: {over}")
    return "    gaps " + " | ".join(parts)


def describe_gc_pauses(pauses: dict[str, dict[str, dict[str, float]]]) -> str:
    """One line: each service's collections of each generation, their total and long ones."""
    parts = [
        f"{name} gen{generation} {row['count']:.0f}× {row['seconds'] * 1e3:.1f} ms ({row['> 5 ms']:.0f} > 5 ms)"
        for name, by_generation in pauses.items()
        for generation, row in sorted(by_generation.items())
    ]
    return "    gc " + " | ".join(parts)
