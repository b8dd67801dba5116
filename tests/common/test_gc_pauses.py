"""The garbage collector's pauses of generations 1 and 2 reach the histogram while it is
installed, and nothing does once it is removed."""

import gc

from prometheus_client import CollectorRegistry

from services.common.gc_pauses import GcPauses


def _count(registry: CollectorRegistry, generation: str) -> float:
    value = registry.get_sample_value("pagedserve:gc_pause_seconds_count", {"generation": generation})
    return value or 0.0


def _sum(registry: CollectorRegistry, generation: str) -> float:
    value = registry.get_sample_value("pagedserve:gc_pause_seconds_sum", {"generation": generation})
    return value or 0.0


def test_full_collections_are_timed_while_installed() -> None:
    registry = CollectorRegistry()
    pauses = GcPauses(registry)
    pauses.install()
    try:
        gc.collect(2)
        gc.collect(1)
        gc.collect(0)
    finally:
        pauses.uninstall()
    assert _count(registry, "2") >= 1
    assert _count(registry, "1") >= 1
    assert _sum(registry, "2") > 0
    # Young collections are not recorded.
    assert _count(registry, "0") == 0

    counted = _count(registry, "2")
    gc.collect(2)
    assert _count(registry, "2") == counted
    pauses.uninstall()  # a second removal is harmless
