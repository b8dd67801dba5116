"""The tokenizer's counts of where requests went and which moved, per engine."""

from prometheus_client import CollectorRegistry, Counter

from services.common.metrics import PREFIX


class RoutingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._decisions = Counter(
            PREFIX + "routing_decisions",
            "Requests (and moves) sent to an engine, by engine and reason (prefix, least_loaded).",
            ["engine", "reason"],
            registry=registry,
        )
        self._migrations = Counter(
            PREFIX + "request_migrations",
            "Requests moved away from an engine that failed under them, by that engine.",
            ["engine"],
            registry=registry,
        )

    def on_routed(self, engine: str, reason: str) -> None:
        self._decisions.labels(engine=engine, reason=reason).inc()

    def on_migrated(self, engine: str) -> None:
        self._migrations.labels(engine=engine).inc()
