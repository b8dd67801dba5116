"""Prometheus metrics over HTTP (`/metrics`), one port per service process. Names carry the
`pagedserve:` prefix and vLLM's meanings."""

import bisect
import itertools
import threading
from collections.abc import Iterator, Sequence

from pagedserve.v1 import common_pb2
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

PREFIX = "pagedserve:"

# Buckets for request-level latencies (seconds), from interactive to long generations.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
# Buckets for per-token and per-step times (seconds).
STEP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)


def serve_metrics(registry: CollectorRegistry, port: int | None, host: str = "0.0.0.0") -> None:
    """Serves `registry` on http://host:port/metrics from a background thread; no port, no
    server."""
    if port:
        start_http_server(port, addr=host, registry=registry)


def finish_reason_label(finish_reason: common_pb2.FinishReason) -> str:
    """ "stop", "length", "abort": as metric labels and span attributes spell it."""
    name: str = common_pb2.FinishReason.Name(finish_reason)
    return name.removeprefix("FINISH_REASON_").lower()


class CountedHistogram(Collector):
    """A Prometheus histogram that takes one value seen `count` times in one call: tokens
    that arrive together share one inter-token gap, and a call per token would cost more
    than the rest of a token's bookkeeping."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._upper_bounds = [*buckets, float("inf")]
        self._counts = [0] * len(self._upper_bounds)
        self._sum = 0.0
        # Scrapes read from the metrics server's thread.
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        index = bisect.bisect_left(self._upper_bounds, value)
        with self._lock:
            self._counts[index] += count
            self._sum += value * count

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets = [
            (floatToGoString(bound), cumulative)  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
            for bound, cumulative in zip(self._upper_bounds, itertools.accumulate(counts))
        ]
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=total)
