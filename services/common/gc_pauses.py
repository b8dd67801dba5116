"""How long Python's garbage collector stops a service process, as a histogram by
generation (`pagedserve:gc_pause_seconds{generation}`).

A collection of the older generations walks every tracked object the process made since
start-up, with the event loop and any step in flight waiting for it: a candidate for an
inter-token latency tail that no span shows. Generation 0 runs thousands of times a second
in a busy tokenizer and is short; only generations 1 and 2 are recorded, so a young
collection costs the callback a lookup."""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from services.common.metrics import PREFIX, STEP_BUCKETS

RECORDED_GENERATIONS = (1, 2)


class GcPauses:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            PREFIX + "gc_pause_seconds",
            "Pauses of the garbage collector's generation 1 and 2 collections",
            ["generation"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self._started_at = 0.0

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        generation = info["generation"]
        if generation not in RECORDED_GENERATIONS:
            return
        if phase == "start":
            self._started_at = time.perf_counter()
        else:
            self.histogram.labels(str(generation)).observe(time.perf_counter() - self._started_at)

    def install(self) -> None:
        gc.callbacks.append(self._on_collection)

    def uninstall(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
