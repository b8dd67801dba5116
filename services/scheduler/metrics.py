"""The scheduler's Prometheus metrics, with vLLM's meanings.

Queue lengths, KV usage and the cumulative counters are read from the scheduler's own
stats when Prometheus scrapes, so they have one source of truth; latencies are observed as
requests progress."""

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from pagedserve.v1 import common_pb2, scheduler_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.metrics import (
    LATENCY_BUCKETS,
    PREFIX,
    STEP_BUCKETS,
    CountedHistogram,
    finish_reason_label,
)
from services.scheduler.outputs import RequestOutput


class _StatsCollector(Collector):
    def __init__(self, read_stats: Callable[[], scheduler_pb2.SchedulerStats]) -> None:
        self._read_stats = read_stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._read_stats()
        gauges = {
            "num_requests_running": ("Requests advancing each step.", stats.num_running),
            "num_requests_waiting": ("Requests queued, preempted ones included.", stats.num_waiting),
            "num_requests_swapped": ("Requests whose KV is swapped out to CPU.", stats.num_swapped),
            "kv_cache_usage_perc": (
                "Fraction of KV blocks in use, 0 to 1.",
                1.0 - stats.num_free_blocks / stats.num_total_blocks if stats.num_total_blocks else 0.0,
            ),
        }
        for name, (documentation, value) in gauges.items():
            yield GaugeMetricFamily(PREFIX + name, documentation, value=value)
        counters = {
            "prefix_cache_queries": (
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries,
            ),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
            "prompt_tokens": ("Prompt tokens of admitted requests.", stats.num_prompt_tokens),
            "generation_tokens": ("Generated tokens.", stats.num_generation_tokens),
        }
        for name, (documentation, value) in counters.items():
            yield CounterMetricFamily(PREFIX + name, documentation, value=value)
        preemptions = CounterMetricFamily(
            PREFIX + "num_preemptions",
            "Running requests that lost their KV blocks to make room.",
            labels=["mode"],
        )
        preemptions.add_metric(["recompute"], stats.num_preemptions_recompute)
        preemptions.add_metric(["swap"], stats.num_preemptions_swap)
        yield preemptions


@dataclass
class RequestTimes:
    """When one request arrived, was first computed, and produced its tokens."""

    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0

    def record_tokens(self, num_new_tokens: int, now: float) -> float | None:
        """Notes tokens that arrived at `now`. Returns the gap per token since the previous
        tokens (tokens that arrive together share it), None for the first ones."""
        if num_new_tokens == 0:
            return None
        gap = None
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None:
            gap = (now - self.last_token) / num_new_tokens
        self.last_token = now
        self.num_tokens += num_new_tokens
        return gap


class SchedulerMetrics:
    def __init__(
        self, registry: CollectorRegistry, read_stats: Callable[[], scheduler_pb2.SchedulerStats]
    ) -> None:
        self.registry = registry
        registry.register(_StatsCollector(read_stats))

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, registry=self.registry, buckets=buckets)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "From arrival to the first generated token.", LATENCY_BUCKETS
        )
        self.inter_token_latency = CountedHistogram(
            PREFIX + "inter_token_latency_seconds",
            "Between consecutive tokens of one request.",
            STEP_BUCKETS,
            registry,
        )
        self.time_per_output_token = histogram(
            "request_time_per_output_token_seconds",
            "Per request: (end - first token) / (generated tokens - 1).",
            STEP_BUCKETS,
        )
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "From arrival to the last token.", LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "From arrival to the first step that computes the request.",
            LATENCY_BUCKETS,
        )
        self.step_duration = histogram(
            "step_duration_seconds", "One batch step, sent to its result.", STEP_BUCKETS
        )
        self.batch_size = Histogram(
            PREFIX + "step_batch_size",
            "Sequences in one step.",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.request_success = Counter(
            PREFIX + "request_success",
            "Finished requests, by finish reason.",
            ["finished_reason"],
            registry=self.registry,
        )
        self.worker_failures = Counter(
            PREFIX + "worker_failures",
            "Times the engine's workers failed (exited or stopped answering); its requests were "
            "held and recomputed once they served again.",
            registry=self.registry,
        )
        self.requests_recomputed = Counter(
            PREFIX + "requests_recomputed_after_worker_failure",
            "Requests held through a worker failure and recomputed on the restarted workers.",
            registry=self.registry,
        )

    def on_step(self, num_sequences: int, duration_s: float) -> None:
        self.batch_size.observe(num_sequences)
        self.step_duration.observe(duration_s)

    def on_tokens(self, times: RequestTimes, num_new_tokens: int, gap: float | None) -> None:
        """After `times.record_tokens` returned `gap`."""
        if num_new_tokens and times.num_tokens == num_new_tokens and times.first_token is not None:
            self.time_to_first_token.observe(times.first_token - times.arrival)
        if gap is not None:
            self.inter_token_latency.observe(gap, num_new_tokens)

    def on_finished(self, times: RequestTimes, finish_reason: common_pb2.FinishReason, now: float) -> None:
        self.request_success.labels(finish_reason_label(finish_reason)).inc()
        self.e2e_latency.observe(now - times.arrival)
        if times.first_token is not None and times.num_tokens > 1:
            self.time_per_output_token.observe((now - times.first_token) / (times.num_tokens - 1))


def record_request_span(span: trace.Span, times: RequestTimes, last: RequestOutput) -> None:
    """What the scheduler's span of a finished request says: its queue time, its first
    token, its token counts and how it ended (OpenTelemetry GenAI names where they fit)."""
    if not span.is_recording():
        return
    span.set_attributes(
        {
            "gen_ai.usage.input_tokens": last.num_prompt_tokens,
            "gen_ai.usage.output_tokens": times.num_tokens,
            "gen_ai.response.finish_reasons": [finish_reason_label(last.finish_reason)],
            "pagedserve.cached_tokens": last.num_cached_tokens,
        }
    )
    if times.first_scheduled is not None:
        span.set_attribute("pagedserve.time_in_queue_s", times.first_scheduled - times.arrival)
    if times.first_token is not None:
        span.set_attribute("pagedserve.time_to_first_token_s", times.first_token - times.arrival)
