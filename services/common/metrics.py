"""Prometheus metrics over HTTP (`/metrics`), one port per service process. Names carry the
`pagedserve:` prefix and vLLM's meanings."""

from prometheus_client import CollectorRegistry, start_http_server

from pagedserve.v1 import common_pb2

PREFIX = "pagedserve:"

# Buckets for request-level latencies (seconds), from interactive to long generations.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
# Buckets for per-token and per-step times (seconds).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


def serve_metrics(registry: CollectorRegistry, port: int | None, host: str = "0.0.0.0") -> None:
    """Serves `registry` on http://host:port/metrics from a background thread; no port, no
    server."""
    if port:
        start_http_server(port, addr=host, registry=registry)


def finish_reason_label(finish_reason: int) -> str:
    """"stop", "length", "abort": as metric labels and span attributes spell it."""
    return common_pb2.FinishReason.Name(finish_reason).removeprefix("FINISH_REASON_").lower()
