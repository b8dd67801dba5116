"""The scheduler's Prometheus metrics, with vLLM's meanings.

Queue lengths, KV usage and the cumulative counters are read from the scheduler's own
stats when Prometheus scrapes, so they have one source of truth; latencies are observed as
requests progress."""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pagedserve.v1 import common_pb2, scheduler_pb2
from services.common.metrics import LATENCY_BUCKETS, PREFIX, STEP_BUCKETS


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
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
            "prompt_tokens": ("Prompt tokens of admitted requests.", stats.num_prompt_tokens),
            "generation_tokens": ("Generated tokens.", stats.num_generation_tokens),
        }
        for name, (documentation, value) in counters.items():
            yield CounterMetricFamily(PREFIX + name, documentation, value=value)
        preemptions = CounterMetricFamily(
            PREFIX + "num_preemptions", "Running requests that lost their KV blocks to make room.", labels=["mode"]
        )
        preemptions.add_metric(["recompute"], stats.num_preemptions_recompute)
        preemptions.add_metric(["swap"], stats.num_preemptions_swap)
        yield preemptions


@dataclass
class RequestTimes:
    """When one request arrived, and when it last produced a token."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0


class SchedulerMetrics:
    def __init__(self, read_stats: Callable[[], scheduler_pb2.SchedulerStats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(read_stats))
        histogram = lambda name, doc, buckets: Histogram(  # noqa: E731 - four alike
            PREFIX + name, doc, registry=self.registry, buckets=buckets)
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "From arrival to the first generated token.", LATENCY_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Between consecutive tokens of one request.", STEP_BUCKETS)
        self.time_per_output_token = histogram(
            "request_time_per_output_token_seconds",
            "Per request: (end - first token) / (generated tokens - 1).", STEP_BUCKETS)
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "From arrival to the last token.", LATENCY_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "From arrival to the first step that computes the request.",
            LATENCY_BUCKETS)
        self.step_duration = histogram(
            "step_duration_seconds", "One batch step, sent to its result.", STEP_BUCKETS)
        self.batch_size = Histogram(
            PREFIX + "step_batch_size", "Sequences in one step.", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests, by finish reason.", ["finished_reason"],
            registry=self.registry)

    def on_tokens(self, times: RequestTimes, num_new_tokens: int, now: float) -> None:
        if num_new_tokens == 0:
            return
        if times.first_token is None:
            times.first_token = now
            self.time_to_first_token.observe(now - times.arrival)
        elif times.last_token is not None:
            # Tokens that arrive together share the gap since the previous ones.
            gap = (now - times.last_token) / num_new_tokens
            for _ in range(num_new_tokens):
                self.inter_token_latency.observe(gap)
        times.last_token = now
        times.num_tokens += num_new_tokens

    def on_finished(self, times: RequestTimes, finish_reason: int, now: float) -> None:
        self.request_success.labels(common_pb2.FinishReason.Name(finish_reason).removeprefix("FINISH_REASON_").lower()).inc()
        self.e2e_latency.observe(now - times.arrival)
        if times.first_token is not None and times.num_tokens > 1:
            self.time_per_output_token.observe((now - times.first_token) / (times.num_tokens - 1))
